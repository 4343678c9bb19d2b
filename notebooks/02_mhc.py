# %% [markdown]
# # 02 · mHC: four residual streams, mixed by Sinkhorn
#
# DeepSeek-V4 keeps **n = 4 residual streams** per token instead of one (manifold-constrained hyper-connections,
# dsv4-layers.md section 2). Every sublayer (attention, then MoE) reads a weighted collapse of the streams and
# writes its output back into all of them through a 4x4 mixing matrix that is pushed towards doubly stochastic by
# 20 Sinkhorn-Knopp iterations.
#
# | tensor | shape | dtype | what |
# |---|---|---|---|
# | `R` | `[T, n, D]` | bf16 | residual state; created as 4 copies of the embedding |
# | `fn` | `[24, nD]` = `[(2+n)n, nD]` | fp32 | per sublayer: 4 pre + 4 post + 16 comb mix rows |
# | `base`, `scale` | `[24]`, `[3]` | fp32 | per sublayer |
# | `hc_head_fn`, `_base`, `_scale` | `[n, nD]`, `[n]`, `[1]` | fp32 | the final collapse before the LM head |
#
# Per token, all math in fp32 (sections 2.2-2.5):
#
# ```
# x      = flatten(R)                                   [nD]
# m      = (x @ fn.T) * rsqrt(mean(x^2) + eps)          [24]   RMS factor applied AFTER the GEMM, no weight
# pre_i  = sigmoid(m[i]   * scale[0] + base[i]) + hc_eps          i < 4   in (eps, 1 + eps), NOT normalised
# post_i = sigmoid(m[4+i] * scale[1] + base[4+i]) * 2             i < 4   in (0, 2)
# C[j,k] = m[8+4j+k] * scale[2] + base[8+4j+k]  ->  Sinkhorn(C)           4x4
# y      = bf16(sum_i pre_i R[i])  ->  RMSNorm(y; attn_norm | ffn_norm)   [D]   the sublayer input (fused in vLLM)
# f      = sublayer(y)                                                    [D]
# R'[k]  = bf16(post[k] f + sum_j C[j,k] R[j])                           output stream k gathers COLUMN k of C
# ```
#
# This notebook runs that math step by step on the toy preset, watches Sinkhorn converge, draws the mixes, and
# then compares the fused TileLang kernels (live on an SM90 GPU, stored H100 results elsewhere).

# %%
import time

import pandas as pd
import torch
from IPython.display import display

from dsv4lab import sweep
from dsv4lab.config import get_config
from dsv4lab.kernels import registry
from dsv4lab.kernels.reference import mhc as ref
from dsv4lab.kernels.reference.norms import rmsnorm
from dsv4lab.lab import results, roofline, viz
from dsv4lab.lab.widgets import explore
from dsv4lab.layers.model import Model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NB_START = time.perf_counter()
cfg = get_config("toy")
print(f"device: {DEVICE} | torch {torch.__version__} | preset toy: D={cfg.hidden_size}, n={cfg.hc_mult}, "
      f"layers={cfg.num_hidden_layers}, Sinkhorn iters={cfg.hc_sinkhorn_iters}, hc_eps={cfg.hc_eps}")

# %% [markdown]
# ## Sizes per preset
#
# The mix GEMM is tiny in N (24 columns) and long in K (nD): at Flash size `fn` alone is 1.5 MB of fp32 per
# sublayer, and each token's `R` is 32 KB of bf16. That is why the mHC ops are memory-bound (section 7).

# %%
pd.DataFrame([dict(preset=p, n=c.hc_mult, D=c.hidden_size, fn=f"[{c.hc_mix_dim}, {c.hc_mult * c.hidden_size}]",
                   fn_MB=c.hc_mix_dim * c.hc_mult * c.hidden_size * 4 / 1e6,
                   R_bytes_per_token=c.hc_mult * c.hidden_size * 2, mhc_calls_per_forward=2 * c.num_hidden_layers + 2)
              for p in ("toy", "flash", "pro") for c in [get_config(p)]]).set_index("preset")

# %% [markdown]
# ## The Sinkhorn order, exactly
#
# quote: dsv4lab.kernels.reference.mhc:sinkhorn
#
# ```python
# def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
#     """Sinkhorn-Knopp in the exact DSv4 order (dsv4-layers.md 2.3), on the last two dims ``[..., n, n]``.
#
#         C = softmax(logits, -1) + eps                 # the first row pass is the softmax itself
#         C = C / (C.sum(-2) + eps)                     # columns
#         repeat iters - 1 times:  rows, then columns   # C / (C.sum(-1) + eps);  C / (C.sum(-2) + eps)
#
#     The last pass normalises columns, so columns sum to ``S/(S+eps) = 1 - O(eps)``; rows only approximately.
#     """
#     chk.tensor("logits", logits, _F32)
#     if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
#         raise ValueError(f"logits: expected [..., n, n], got shape {tuple(logits.shape)}")
#     chk.positive_int("iters", iters)
#     chk.positive_float("eps", eps)
#     c = torch.softmax(logits, dim=-1) + eps
#     c = c / (c.sum(dim=-2, keepdim=True) + eps)
#     for _ in range(iters - 1):
#         c = c / (c.sum(dim=-1, keepdim=True) + eps)
#         c = c / (c.sum(dim=-2, keepdim=True) + eps)
#     return c
# ```

# %% [markdown]
# ## The reference, step by step (toy preset)
#
# A toy model with random (deterministic) weights; a 64-token prompt. We run layers 0 and 1 (unfused wiring:
# pre -> norm -> sublayer -> post, twice per layer) and stop at the entrance of layer 2's attention sublayer.

# %%
T, LAYER = 64, 2
model = Model(cfg, mtp=False).eval()
ids = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
positions = torch.arange(T)
n, D = cfg.hc_mult, cfg.hidden_size


@torch.no_grad()
def residual_before(layer: int) -> torch.Tensor:
    """R entering decoder layer ``layer`` (layer 0: the 4 embedding copies)."""
    r = model.embed_tokens(ids).unsqueeze(1).expand(T, n, D).contiguous()
    for blk in model.layers[:layer]:
        r = blk(positions, r, input_ids=ids, wiring="unfused")
    return r


R = residual_before(LAYER)
hc = model.layers[LAYER].hc_attn
viz.describe(R=R, stream0=R[:, 0], stream3=R[:, 3], fn=hc.fn, base=hc.base, scale=hc.scale)

# %% [markdown]
# **Step 1: the mix logits.** One `[T, nD] x [nD, 24]` GEMM, then the RMS factor of the whole flattened row.

# %%
eps = cfg.rms_norm_eps
x = R.flatten(1).float()                                    # [T, nD]
rho = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)    # [T, 1]
m = (x @ hc.fn.T) * rho                                     # [T, 24]
viz.describe(x=x, rho=rho, m=m, m_pre=m[:, :n], m_post=m[:, n:2 * n], m_comb=m[:, 2 * n:])

# %% [markdown]
# **Step 2: the three mixes.** `pre` and `post` are sigmoids; `comb` goes through Sinkhorn.

# %%
pre = torch.sigmoid(m[:, :n] * hc.scale[0] + hc.base[:n]) + cfg.hc_eps
post = torch.sigmoid(m[:, n:2 * n] * hc.scale[1] + hc.base[n:2 * n]) * cfg.hc_post_mult
comb_logits = (m[:, 2 * n:] * hc.scale[2] + hc.base[2 * n:]).view(T, n, n)
comb = ref.sinkhorn(comb_logits, cfg.hc_sinkhorn_iters, cfg.hc_eps)
ref_pre, ref_post, ref_comb = ref.mhc_mixes(R, hc.fn, hc.scale, hc.base, **hc.kwargs)
print("step-by-step == reference mhc_mixes:",
      all(torch.equal(a, b) for a, b in ((pre, ref_pre), (post, ref_post), (comb, ref_comb))))
viz.describe(pre=pre, pre_sum=pre.sum(-1), post=post, comb_logits=comb_logits, comb=comb,
             comb_diagonal=comb.diagonal(dim1=-2, dim2=-1), comb_row_sums=comb.sum(-1), comb_col_sums=comb.sum(-2))

# %% [markdown]
# **Step 3: collapse, norm, sublayer, post.** The collapse is rounded to bf16 once; the RMSNorm (vLLM fuses it into
# the kernel) rounds once more. The attention output `f` goes back into all four streams.

# %%
layer = model.layers[LAYER]
y = (pre.unsqueeze(-1) * R.float()).sum(1).to(torch.bfloat16)            # [T, D]
layer_input = rmsnorm(y, layer.attn_norm.weight, eps)                  # [T, D]
fused_input, _, _ = registry.get("mhc_pre", "reference")(R, hc.fn, hc.scale, hc.base, layer.attn_norm.weight,
                                                          **hc.kwargs)
print("collapse + norm == registry mhc_pre (reference):", torch.equal(layer_input, fused_input))
with torch.no_grad():
    f = layer.attn(layer_input, positions)                             # [T, D]
R_new = ref.mhc_post(f, R, post, comb)                                 # [T, n, D]
R_bug = (post.unsqueeze(-1) * f.float().unsqueeze(1)
         + torch.einsum("tjk,tkd->tjd", comb, R.float())).to(R.dtype)  # C @ R: the porting bug (rows, not columns)
viz.describe(y=y, layer_input=layer_input, f=f, R_new=R_new, R_new_minus_R=(R_new.float() - R.float()),
             porting_bug_diff=(R_bug.float() - R_new.float()))

# %% [markdown]
# `porting_bug_diff` is what using `C @ R` instead of `C^T @ R` would change: not zero, because `C` is only
# approximately doubly stochastic and not symmetric.
#
# ## Prediction: Sinkhorn convergence and the mixes
#
# Stated before the next cells run:
#
# * **Columns** are normalised last, so after every column pass the column sums are `S/(S+eps)`: off by
#   `eps/S ~ 1e-6` (plus fp32 rounding), at every iteration.
# * **Rows** are off after a column pass, and the error shrinks geometrically with the iterations. The
#   initialisation here puts the comb logits near `eye(4) + N(0, 0.3^2)` (times `scale[2]`), a matrix already close
#   to doubly stochastic after the softmax, so the row error should reach ~1e-3 or below well before 20 iterations.
#   Layer 0 differs: all four streams are equal there, but the 16 comb rows of `fn` are different, so its mixes
#   are no simpler.
# * **pre** sits near `sigmoid(ln(1/3)) = 0.25` per stream (so the collapse is roughly the mean of the streams),
#   **post** near 1 (`2 sigmoid(0)`), and **comb** leans diagonal (about 0.4-0.5 on the diagonal).

# %% [markdown]
# ## Measurement: Sinkhorn, pass by pass
#
# `viz.sinkhorn_history` replays the reference's passes (same ops, same order; the test suite checks it is bitwise the
# reference after each column pass) and records the worst row and column sum error over all T tokens.

# %%
def comb_logits_of(r: torch.Tensor, h) -> torch.Tensor:
    """Steps 1-2 for the comb rows only: the Sinkhorn input [T, n, n] of mHC module ``h`` at residual ``r``."""
    xr = r.flatten(1).float()
    mr = (xr @ h.fn.T) * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + eps)
    return (mr[:, 2 * n:] * h.scale[2] + h.base[2 * n:]).view(-1, n, n)


R0 = residual_before(0)
hist = pd.concat([viz.sinkhorn_history(comb_logits_of(r, h), cfg.hc_sinkhorn_iters, cfg.hc_eps).assign(label=name)
                  for name, r, h in ((f"layer {LAYER}", R, hc), ("layer 0", R0, model.layers[0].hc_attn))])
viz.sinkhorn_figure(hist, eps=cfg.hc_eps, title=f"Sinkhorn on the attention comb of T={T} tokens (toy, reference)")

# %%
last = hist[hist.step == hist.step.max()].set_index("label")[["row_err", "col_err"]]
last.columns = ["row error after 20 iterations", "column error after 20 iterations"]
last

# %% [markdown]
# ## Measurement: the mixes
#
# Left and middle: `pre` and `post` of every token (stream on x). Right: one token's `comb` (source stream j on y,
# output stream k on x; output stream k is column k).

# %%
viz.mix_heatmaps(pre, post, comb, token=T - 1, title=f"layer {LAYER} attention mixes (toy, reference)")

# %% [markdown]
# ## Interpretation
#
# * Columns hit `1 - O(eps)` after every column pass, exactly as the order predicts; the rows' error falls
#   geometrically and what remains after 20 iterations is the row error the kernels inherit. It is not zero: `comb`
#   is only approximately doubly stochastic, which is why `C @ R` and `C^T @ R` differ (the porting bug above).
# * `pre` (mean ~0.24) and `post` (mean ~1) sit where predicted. `pre` is not normalised: its row sums are near 1
#   only because of the initialisation; a trained model is free to scale the collapse. `post` in (0, 2) lets a
#   sublayer write more or less than its output into each stream. The comb diagonal is centred where predicted
#   (mean ~0.5, the `comb_diagonal` row of step 2) but spreads from ~0.1 to ~0.8 across tokens: the token-dependent
#   mix logits sharpen some matrices and flatten others.
# * Sinkhorn is sequential (40 dependent normalisations of a 4x4 matrix, ~1.3 kFLOP per token): negligible work,
#   but latency inside a kernel epilogue -- one of the reasons `mhc_pre` is hard to fuse well (notebook 13).
#
# ## The fused kernels
#
# vLLM fuses each `mhc_post` with the next sublayer's `mhc_pre` (`mhc_fused_post_pre`) and ends with `hc_head`.
# dsv4lab has TileLang versions of all four (dsv4lab/kernels/tilelang/). Which backends can run here:

# %%
OPS = ["mhc_pre", "mhc_post", "mhc_fused_post_pre", "hc_head"]
pd.DataFrame([dict(op=op, backend=b, available=ok, reason=why)
              for op in OPS for b in registry.backends(op) for ok, why in [registry.availability(op, b)]])

# %% [markdown]
# ### Prediction (before measuring)
#
# * **Numerics**: the TileLang kernels compute the mix GEMM in fp32-equivalent precision (3-term bf16 split), so
#   the mixes agree with the fp32 reference to ~1e-6 relative, and the bf16 outputs are within 1 ulp: an error
#   ratio vs the eager path near 1 (bar: 2).
# * **Time**: memory-bound. The floor is the minimum bytes over the measured copy bandwidth (lab.roofline):

# %%
peaks = roofline.load_peaks("h100")
bw = peaks.copy_bw if peaks else None
floors = pd.DataFrame([dict(op=op, preset=p, T=t, MB=c.bytes / 1e6, floor_us=c.bytes / bw * 1e6 if bw else None)
                       for op in OPS for p in ("flash", "pro") for t in (1, 1024, 16384)
                       for c in [roofline.cost(op, T=t, D=get_config(p).hidden_size)]])
print(f"H100 copy bandwidth: {peaks.summary() if peaks else 'no stored peaks'}")
floors.pivot_table(index=["op", "T"], columns="preset", values="floor_us").round(1)

# %% [markdown]
# ### Measurement: live on this device
#
# `dsv4lab.sweep.bench` (the `dsv4lab bench` harness): every backend of each op, the same inputs, timed with
# `lab.timing` and compared with `lab.numerics` against an fp64 oracle. Toy sizes on a CPU; a backend that cannot
# run here is a record with the reason.

# %%
live = pd.DataFrame([r for op in OPS for r in sweep.bench(op, preset="toy", tokens=[1, 64], device=DEVICE)])
show = live[live.metric.isin(["time", "err_ratio", "bitwise_equal", "unavailable"])]
show[["op", "backend", "tokens", "metric", "value", "unit", "timing_mode", "reason"]].fillna(
    {"unit": "", "timing_mode": "", "reason": ""})

# %% [markdown]
# ### Measurement: stored H100 results
#
# Where the TileLang backend is unavailable (any machine without an SM90 GPU) the kernels' numbers come from
# `data/results/h100/pr43905_mhc_direct.jsonl` (written by `bench/pr43905_mhc_direct.py`): p50 time per call with
# CUDA events and the L2 flushed, against the roofline floor.

# %%
stored = results.load(slug="h100", experiment="pr43905_mhc_direct", strict=False)
live_tilelang = registry.availability("mhc_post", "tilelang")[0]
print(("TileLang runs here: the live table above has its numbers; the charts below are the stored H100 run."
       if live_tilelang else "NOTE: TileLang cannot run on this machine -- the charts below are STORED H100 results, "
       "not a live measurement."), "|", viz.stored_label(stored))


def kernel_chart(op: str, preset: str = "flash"):
    """Eager calls (CUDA events, L2 flushed) and CUDA-graph replays; tile_kernels-style runs without the norm
    weight are left out so each line is one configuration."""
    df = stored[stored.variant.isin(["eager", "graph"])
                & stored.get("norm_weight", pd.Series(index=stored.index, dtype=object)).ne(False)]
    d = get_config(preset).hidden_size
    floor = (lambda t: roofline.cost(op, T=t, D=d).bytes / bw * 1e6) if bw else None
    return viz.stored_time_figure(df, op, preset=preset, color=("backend", "timing_mode"), floor_us=floor,
                                  floor_name="roofline floor (min bytes / copy BW)", title=f"{op}, {preset}")


if len(stored):
    for op in ("mhc_pre", "mhc_post"):
        display(kernel_chart(op))
    num = stored[(stored.metric == "err_ratio") & (stored.backend == "tilelang")]
    print("TileLang err_ratio vs the eager path, per output (bar 2; < 1 = closer to the fp64 oracle than eager):")
    display(viz.latest(num, ["op", "variant", "preset", "tokens"])
            .pivot_table(index=["op", "variant"], columns=["preset", "tokens"], values="value").round(2))
else:
    print("no stored H100 results (data/results/h100/pr43905_mhc_direct.jsonl): only the floors above exist")

# %% [markdown]
# ## Explore
#
# Two explorers. **Mixes**: pick the layer, the sublayer (attention or FFN mixes), a token and the number of Sinkhorn
# iterations; the residual entering that layer is recomputed with the reference. **Kernels**: pick an op, a preset,
# T and a backend: a backend that runs here is measured live, otherwise the stored H100 chart is drawn.
# (`lab.widgets.explore`: without ipywidgets, as in headless runs, each explorer draws its default once.)

# %%
_residuals = {0: R0, LAYER: R}


def explore_mixes(layer: int = LAYER, sublayer: str = "attn", token: int = T - 1, iters: int = 20):
    if layer not in _residuals:
        _residuals[layer] = residual_before(layer)
    r = _residuals[layer]
    blk = model.layers[layer]
    if sublayer == "ffn":          # the FFN mixes see the residual after the attention sublayer's post
        with torch.no_grad():
            a = blk.hc_attn
            xin, p_, c_ = a.pre(r, None)
            r = a.post(blk.attn(rmsnorm(xin, blk.attn_norm.weight, eps), positions), r, p_, c_)
    h = getattr(blk, "hc_ffn" if sublayer == "ffn" else "hc_attn")
    p, q, c = ref.mhc_mixes(r, h.fn, h.scale, h.base, **dict(h.kwargs, sinkhorn_iters=iters))
    return [viz.sinkhorn_figure(viz.sinkhorn_history(comb_logits_of(r, h), iters, cfg.hc_eps), eps=cfg.hc_eps,
                                title=f"layer {layer} {sublayer}: Sinkhorn, {iters} iterations"),
            viz.mix_heatmaps(p, q, c, token=token, title=f"layer {layer} {sublayer} mixes, token {token}")]


def explore_kernel(op: str = "mhc_post", preset: str = "flash", tokens: int = 64, backend: str = "tilelang"):
    ok, why = registry.availability(op, backend)
    if ok:
        recs = pd.DataFrame(sweep.bench(op, preset=preset, tokens=[tokens], device=DEVICE, backends=[backend]))
        return recs[["op", "backend", "tokens", "metric", "value", "unit"]]
    note = f"{op}/{backend} cannot run here ({why}); stored H100 results instead."
    return [note, kernel_chart(op, preset)] if len(stored) else [note, "no stored H100 results"]


explore(explore_mixes, layer=(0, cfg.num_hidden_layers - 1), sublayer=["attn", "ffn"], token=(0, T - 1),
        iters=(1, 40))

# %%
explore(explore_kernel, op=OPS, preset=["toy", "flash", "pro"], tokens=[1, 4, 16, 64, 256, 1024],
        backend=["reference", "tilelang"])

# %% [markdown]
# ## Interpretation
#
# * **Reference**: the step-by-step cells reproduce `mhc_mixes` and `mhc_pre` bitwise, so the formulas at the top are
#   the code. Columns of `comb` sum to 1 within ~1e-6 after every column pass; rows converge geometrically and keep a
#   small residual error after 20 iterations, which is why the transpose in `mhc_post` matters.
# * **Kernels**: read the stored charts against the dotted floor. `mhc_post` is a pure stream (18TD bytes) and should
#   approach it at large T; `mhc_pre` re-reads R after the full-K mix reduction, so it stays further from the
#   minimum-bytes floor by construction (notebook 13 has the detailed analysis and the tile_kernels comparison).
#   At small T every op is launch/latency bound, and the flat part of each curve is that latency.

# %%
print(f"notebook ran in {time.perf_counter() - NB_START:.1f} s on {DEVICE}")
