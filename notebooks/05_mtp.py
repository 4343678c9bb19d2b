# %% [markdown]
# # 05 · MTP: the multi-token-prediction draft layer
#
# DeepSeek-V4 ships one extra decoder block, the MTP layer, that proposes the token after next for speculative
# decoding (dsv4-layers.md section 5). For row t it combines what the target model knew at position t (its residual
# just before `hc_head`, all four streams) with the embedding of the token at t + 1, runs one full decoder block,
# and predicts token t + 2 through the target's LM head.
#
# ```
# prev   = target residual before hc_head at position t          [T, n*D]   (vLLM's _mtp_hidden_buffer)
# e      = embed(token t+1);  e = where(pos == 0, 0, e)            [T, D]     vLLM only: position-0 rows zeroed
# e      = RMSNorm(e; enorm)                                       [T, D]     a zeroed row stays exactly 0
# h      = RMSNorm(prev.view(T, n, D); hnorm)                      [T, n, D]  one norm per stream
# R      = h @ h_proj.T + (e @ e_proj.T)[:, None, :]              [T, n, D]  e added to every stream
# f, R, post, comb = DecoderLayer(R, residual=None)                          window-only attention, non-hash MoE
# R      = mhc_post(f, R, post, comb)                              [T, n, D]  (re-fed as prev for a further step)
# logits = head(RMSNorm(hc_head(R; mtp.hc_head); mtp.norm))        [T, V]     head shared with the target
# ```
#
# vLLM #43746 fused the mask + enorm + 4 hnorms into one Triton kernel and the shared-head norm into another
# (notebook 11 measures that refactor). This notebook runs the layer step by step on the toy preset, shows the masking,
# compares the draft's logits with the target's, and checks the fused kernels against the reference.

# %%
import time

import pandas as pd
import torch
from IPython.display import display

from dsv4lab.config import get_config
from dsv4lab.kernels import registry
from dsv4lab.kernels.inputs import positions_with_restarts
from dsv4lab.lab import numerics, results, roofline, viz
from dsv4lab.lab.widgets import explore
from dsv4lab.layers.model import Model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NB_START = time.perf_counter()
cfg = get_config("toy")
n, D, V = cfg.hc_mult, cfg.hidden_size, cfg.vocab_size
mtp_layer = cfg.num_hidden_layers
print(f"device: {DEVICE} | toy: D={D}, n={n}, V={V}, MTP = decoder index {mtp_layer}, "
      f"compress ratio {cfg.compress_ratio(mtp_layer)} (window only), hash-routed: {cfg.is_hash_layer(mtp_layer)}")

# %% [markdown]
# ## Sizes per preset

# %%
pd.DataFrame([dict(preset=p, D=c.hidden_size, n=c.hc_mult, V=c.vocab_size,
                   prev_bytes_per_token=2 * c.hc_mult * c.hidden_size,
                   mtp_layers=c.num_nextn_predict_layers, mtp_compress_ratio=c.compress_ratio(c.num_hidden_layers),
                   e_h_proj_params_M=2 * c.hidden_size ** 2 / 1e6,
                   input_norm_bytes_at_T1=roofline.cost("mtp_input_rmsnorm", T=1, D=c.hidden_size, n=c.hc_mult).bytes)
              for p in ("toy", "flash", "pro") for c in [get_config(p)]]).set_index("preset")

# %% [markdown]
# ## The reference, step by step (toy, one 64-token sequence)
#
# A toy model (random, deterministic weights) runs the prompt; row t of the draft gets token t + 1 (the last row
# takes the target's own greedy next token, as a spec-decode proposer would).

# %%
T = 64
model = Model(cfg).eval()
ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(0))
positions = torch.arange(T)
with torch.no_grad():
    hidden = model.hidden_states(ids)                                # [T, n, D]: the target's pre-hc_head residual
    target_logits = model.compute_logits(hidden)                     # [T, V]
next_ids = torch.cat([ids[1:], target_logits[-1:].argmax(-1)])
mtp = model.mtp
viz.describe(ids=ids, next_ids=next_ids, prev=hidden, target_logits=target_logits)

# %% [markdown]
# **Step 1: the input norms** (the op #43746 fused). Row 0 is at position 0, so its `e` is exactly zero.

# %%
eps = cfg.rms_norm_eps
embeds = model.embed_tokens(next_ids)                                 # [T, D]
e, h = registry.get("mtp_input_rmsnorm", "reference")(embeds, positions, hidden.flatten(1), mtp.enorm.weight,
                                                      mtp.hnorm.weight, eps)
viz.describe(embeds=embeds, e=e, e_row0=e[0], h=h, h_row_rms=viz.row_rms(h))

# %% [markdown]
# **Step 2: the projections and the block.** `e` goes into all four streams; then one full decoder block
# (vLLM wiring: it returns the state with its last `mhc_post` pending, which the MTP layer applies).

# %%
R = (h.float() @ mtp.h_proj.weight.float().T).to(h.dtype) + (e.float() @ mtp.e_proj.weight.float().T).to(e.dtype)[:, None]
with torch.no_grad():
    f, res, post, comb = mtp.block(positions, R, input_ids=next_ids, wiring="vllm")
    R_out = mtp.block.hc_ffn.post(f, res, post, comb)                  # [T, n, D]
viz.describe(R_in=R, f=f, post=post, comb=comb, R_out=R_out)

# %% [markdown]
# **Step 3: the draft logits** through the MTP's own `hc_head` and norm and the target's LM head.

# %%
with torch.no_grad():
    collapsed = mtp.hc_head(R_out)                                     # [T, D]
    normed = registry.get("mtp_shared_head_rmsnorm", "reference")(collapsed, mtp.norm.weight, eps)
    draft_logits = normed.float() @ model.head.weight.float().T        # [T, V]
    module_logits, _ = model.mtp_forward(next_ids, positions, hidden)
print("step by step == Model.mtp_forward:", torch.equal(draft_logits, module_logits))
viz.describe(collapsed=collapsed, normed=normed, draft_logits=draft_logits)

# %% [markdown]
# ## Prediction (before looking)
#
# * **Masking**: every row whose position is 0 has `e` exactly 0 (not small: zero, because the mask is applied before
#   the norm and eps keeps the rsqrt finite); its `h` rows are untouched. In a packed batch of requests, that is the
#   first row of each request.
# * **Draft vs target**: row t of the draft predicts token t + 2, as row t + 1 of the target does. With trained weights
#   they agree most of the time (that agreement is the speculative-decoding acceptance rate). With **random** weights
#   there is nothing to learn from: the two logit vectors come from unrelated hidden states through the same head, so
#   top-1 agreement should sit near chance (1/V = 0.1 %) and the cosine near 0. The mechanics are what this notebook
#   can show, not the acceptance rate.
# * **Fused vs reference draft**: swapping in the Triton kernels (MTP norms, router) changes each norm output by at
#   most one bf16 ulp on some elements; through one block and the head that should leave the top-1 token unchanged on
#   nearly every row and the logits within ~1e-2.

# %% [markdown]
# ## Measurement: the masking, on a packed batch
#
# Two requests of 32 tokens packed into one batch (positions 0..31, 0..31), as vLLM hands them to the MTP layer.

# %%
packed_pos = positions_with_restarts(T, every=T // 2)
e_p, h_p = registry.get("mtp_input_rmsnorm", "reference")(embeds, packed_pos, hidden.flatten(1), mtp.enorm.weight,
                                                          mtp.hnorm.weight, eps)
zero_rows = torch.nonzero(packed_pos == 0).flatten().tolist()
print(f"rows at position 0: {zero_rows}; e exactly zero there: {bool((e_p[zero_rows] == 0).all())}; "
      f"nonzero elsewhere: {bool((e_p[packed_pos != 0].abs().amax(-1) > 0).all())}; "
      f"h unaffected by the mask: {torch.equal(h_p, h)}")
viz.mtp_norm_figure(packed_pos, e_p, h_p, title="MTP input norms on a packed batch of two requests (toy, reference)")

# %% [markdown]
# ## Measurement: draft vs target, and fused vs reference
#
# Agreement per row: top-1 equal, top-5 overlap, cosine of the logit vectors. "draft vs target" pairs draft row t
# with target row t + 1 (both predict token t + 2). "Triton vs reference draft" builds the same model with
# `backend="triton"` (same seed, same weights) and reruns only the MTP on the reference target's `prev`.

# %%
model_t = Model(cfg, backend="triton").eval()
same_weights = all(torch.equal(a, b) for a, b in zip(model.mtp.state_dict().values(), model_t.mtp.state_dict().values()))
print("MTP weights identical across backends:", same_weights, "| ops the triton model runs:",
      {op: b for op, b in model_t.op_backends().items() if b != ["reference"]})
t0 = time.perf_counter()
with torch.no_grad():
    draft_triton, _ = model_t.mtp_forward(next_ids, positions, hidden)
print(f"triton draft: {time.perf_counter() - t0:.1f} s "
      f"({registry.availability('mtp_input_rmsnorm', 'triton')[1] or 'GPU'})")
agree = {"draft vs target (t -> t+1)": viz.logit_agreement(draft_logits[:-1], target_logits[1:]),
         "Triton vs reference draft": viz.logit_agreement(draft_triton, draft_logits)}
display(viz.agreement_figure(agree, title=f"Logit agreement per row (toy, T={T}, random weights)"))
pd.DataFrame({k: dict(top1_agreement=v.top1_equal.mean(), mean_top5_overlap=v.topk_overlap.mean(),
                      mean_cosine=v.cosine.mean(), max_abs_logit_diff=v.max_abs.max()) for k, v in agree.items()}).T

# %% [markdown]
# ## The fused kernels
#
# Backends of the MTP ops and whether they run here:

# %%
MTP_OPS = ["mtp_input_rmsnorm", "mtp_shared_head_rmsnorm"]
pd.DataFrame([dict(op=op, backend=b, available=ok, reason=why)
              for op in MTP_OPS for b in registry.backends(op) for ok, why in [registry.availability(op, b)]])

# %% [markdown]
# ### Prediction (before measuring)
#
# * **Numerics**: the fused kernels round once (`bf16(x * rrms * w)`), like the reference; masked rows are exactly 0 in
#   both. On a GPU they should be bitwise equal to the reference except where the fp32 sum of squares, summed in a
#   different order, lands on the other side of a rounding boundary. Under the CPU interpreter fp32 -> bf16 casts
#   truncate, so expect up to 1 ulp on about half the elements.
# * **Time on the H100**: the input block moves `4 T (n+1) D` bytes; at decode sizes it is launch latency (one launch
#   instead of ~18 eager ones), at prefill sizes the copy bandwidth.

# %% [markdown]
# ### Measurement: live on this device

# %%
args = {"mtp_input_rmsnorm": ((embeds, packed_pos, hidden.flatten(1), mtp.enorm.weight, mtp.hnorm.weight, eps),),
        "mtp_shared_head_rmsnorm": ((collapsed, mtp.norm.weight, eps),)}
rows = []
for op in MTP_OPS:
    (a,) = args[op]
    want = registry.get(op, "reference")(*a)
    want = want if isinstance(want, tuple) else (want,)
    for b in registry.backends(op):
        ok, why = registry.availability(op, b)
        if b == "reference" or not ok:
            rows.append(dict(op=op, backend=b, ran=False, note=why or "the reference itself"))
            continue
        t0 = time.perf_counter()
        got = registry.get(op, b)(*a)
        got = got if isinstance(got, tuple) else (got,)
        secs = time.perf_counter() - t0
        for i, (g, w) in enumerate(zip(got, want)):
            u = numerics.ulp_diff(g, w)
            rows.append(dict(op=op, backend=b, ran=True, output=["e", "h"][i] if op == "mtp_input_rmsnorm" else "out",
                             bitwise_equal=torch.equal(g, w), ulp_max=int(u.max()),
                             frac_elements_off=float((u > 0).float().mean()),
                             masked_rows_zero=bool((g[zero_rows] == 0).all()) if (op, i) == ("mtp_input_rmsnorm", 0)
                             else None, seconds=round(secs, 2), note=why))
pd.DataFrame(rows)

# %% [markdown]
# ### Measurement: stored H100 results
#
# From `data/results/h100/pr43746_mtp_norm.jsonl` (bench/pr43746_mtp_norm.py): the fused kernels (`after`) against
# the eager ops they replaced (`before_eager`) and their `torch.compile` version (`before_compiled`), CUDA-graph replay
# and eager (CUDA events) modes, with the roofline floor.

# %%
stored = results.load(slug="h100", experiment="pr43746_mtp_norm", strict=False)
live_gpu = DEVICE == "cuda" and registry.availability("mtp_input_rmsnorm", "triton")[0]
print(("" if live_gpu else "NOTE: the Triton kernels run here only under the CPU interpreter -- the charts below are "
       "STORED H100 results, not a live measurement. | ") + viz.stored_label(stored))
peaks = roofline.load_peaks("h100")


def stored_chart(op: str = "mtp_input_rmsnorm", preset: str = "flash", mode: str = "cuda-graph"):
    c = get_config(preset)
    floor = None
    if peaks:
        kw = dict(D=c.hidden_size, n=c.hc_mult) if op == "mtp_input_rmsnorm" else dict(D=c.hidden_size)
        floor = lambda t: viz.floor_us(roofline.cost(op, T=t, **kw), peaks)  # noqa: E731
    return viz.stored_time_figure(stored, op, preset=preset, mode=mode, floor_us=floor, floor_name="roofline floor",
                                  title=f"{op}, {preset}, {mode}")


if len(stored):
    display(stored_chart("mtp_input_rmsnorm"))
    display(stored_chart("mtp_input_rmsnorm", mode="cuda-events"))
else:
    print("no stored H100 results (data/results/h100/pr43746_mtp_norm.jsonl)")

# %% [markdown]
# ## Explore
#
# **Draft**: pick T, how many requests are packed into the batch (the masking), the backend of the MTP ops and k of
# the top-k overlap; the draft is rerun and both charts are redrawn. **Stored kernels**: pick an op, a preset and a
# timing mode. (`lab.widgets.explore`: without ipywidgets, as in headless runs, each explorer draws its default once.)

# %%
_models = {"reference": model, "triton": model_t}


def explore_draft(tokens: int = 64, requests: int = 2, backend: str = "reference", k: int = 5):
    ok, why = registry.availability("mtp_input_rmsnorm", backend)
    if not ok:
        return f"{backend} cannot run here: {why}"
    m = _models[backend]
    tok = torch.randint(0, V, (tokens,), generator=torch.Generator().manual_seed(tokens))
    pos = torch.arange(tokens)
    with torch.no_grad():
        hid = model.hidden_states(tok)
        tgt = model.compute_logits(hid)
        nxt = torch.cat([tok[1:], tgt[-1:].argmax(-1)])
        drf, _ = m.mtp_forward(nxt, pos, hid)
        packed = positions_with_restarts(tokens, every=max(1, tokens // requests))
        e_x, h_x = registry.get("mtp_input_rmsnorm", backend)(m.embed_tokens(nxt), packed, hid.flatten(1),
                                                              m.mtp.enorm.weight, m.mtp.hnorm.weight, eps)
    return [viz.mtp_norm_figure(packed, e_x, h_x, title=f"{requests} packed requests, T={tokens}, {backend}"),
            viz.agreement_figure({"draft vs target (t -> t+1)": viz.logit_agreement(drf[:-1], tgt[1:], k=k)}, k=k,
                                 title=f"draft ({backend}) vs target, T={tokens}")]


def explore_stored(op: str = "mtp_input_rmsnorm", preset: str = "flash", mode: str = "cuda-graph"):
    return stored_chart(op, preset, mode) if len(stored) else "no stored H100 results"


explore(explore_draft, tokens=[16, 32, 64, 128], requests=[1, 2, 4, 8], backend=["reference", "triton"], k=[1, 5, 20])

# %%
explore(explore_stored, op=MTP_OPS, preset=["flash", "pro"], mode=["cuda-graph", "cuda-events"])

# %% [markdown]
# ## Interpretation
#
# * **Masking**: exactly the predicted pattern: `e` is identically zero on the position-0 row of every packed
#   request and normal elsewhere, and `h` does not depend on the mask. So the first draft row of a request sees only
#   the target's hidden state, never the embedding of a token from the previous request in the batch.
# * **Draft vs target** with random weights sits at chance level, as predicted; the number to watch with a real
#   checkpoint is the top-1 agreement of this pairing (the acceptance rate of one speculative token).
# * **Fused vs reference**: the Triton kernels keep the masked rows exactly zero and move about half the elements by
#   exactly one ulp here (the interpreter's truncating casts on a CPU). Through the block and the head the draft's
#   top-1 token was unchanged on every row, but the largest logit difference came out a few times larger than the
#   ~1e-2 predicted (see the table): truncation errs in one direction on half the elements, so the errors add up
#   instead of cancelling. On a GPU the casts round to nearest instead; notebook 11 shows the stored H100 ulp
#   histograms for that case.
# * **Time (stored)**: read the two charts against the floor: in CUDA-graph replay the fused kernel's advantage at small
#   T is per-kernel GPU latency (one kernel instead of several); in eager mode it is also the host launches; at large T
#   all variants that fuse (after, before_compiled) approach the copy-bandwidth floor. Notebook 11 has the full analysis.

# %%
print(f"notebook ran in {time.perf_counter() - NB_START:.1f} s on {DEVICE}")
