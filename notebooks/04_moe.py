# %% [markdown]
# # 04 · MoE: sqrt-softplus routing (hash or bias), MXFP4 SwiGLU experts, a shared expert
#
# The FFN of every DSv4 layer is a mixture of experts (dsv4-layers.md section 4). The router scores each token
# against E experts; the first `num_hash_layers` layers do not choose by score at all but look the experts up in a
# fixed table indexed by the **token id**; later layers take the top-k of the scores plus a per-expert bias. The
# weights always come from the unbiased scores.
#
# ```
# logits = x @ gate.T                          fp32 [T, E]     (bf16 x bf16 -> fp32 GEMM: vLLM #41300, notebook 10)
# s      = sqrt(softplus(logits))              fp32 [T, E]
# ids    = tid2eid[input_ids]                  [T, k]          hash layers (layer < num_hash_layers)
#        = topk(s + bias, k)                   [T, k]          other layers ("noaux_tc" bias, fp32 [E])
# w      = s.gather(ids); w = w / sum(w) * routed_scaling_factor                  [T, k]
# expert_e(x) = (silu(min(x w1_e^T, L)) * clamp(x w3_e^T, -L, L)) w2_e^T        w1, w3 [E, I, D], w2 [E, D, I]; L = 10
# y      = bf16(sum_j w_j expert_{ids_j}(x) + shared(x))                          [T, D]
# ```
#
# Routed experts are stored as MXFP4 (e2m1 values, one UE8M0 scale per 32 along K): `w1` is `[E, I, D/2]` uint8
# plus `[E, I, D/32]` scale bytes. This notebook runs the router and the experts step by step on the toy preset,
# looks at the scores and at how evenly the tokens spread over the experts (hash vs bias layers, two kinds of
# prompt), and compares the fused kernels (Triton router live; DeepGEMM experts and the router GEMM from stored H100
# results).

# %%
import time

import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display

from dsv4lab.config import get_config
from dsv4lab.kernels import registry
from dsv4lab.kernels.reference import moe as ref
from dsv4lab.lab import numerics, results, roofline, viz
from dsv4lab.lab.widgets import explore
from dsv4lab.layers.model import Model
from dsv4lab.quant import dequant_fp4, ue8m0_to_float

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NB_START = time.perf_counter()
cfg = get_config("toy")
E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
print(f"device: {DEVICE} | toy: E={E}, k={K}, I={cfg.moe_intermediate_size}, shared={cfg.n_shared_experts}, "
      f"hash layers={cfg.num_hash_layers} of {cfg.num_hidden_layers}, routed_scaling_factor={cfg.routed_scaling_factor}")

# %% [markdown]
# ## Sizes per preset

# %%
pd.DataFrame([dict(preset=p, D=c.hidden_size, E=c.n_routed_experts, k=c.num_experts_per_tok,
                   I=c.moe_intermediate_size, shared=c.n_shared_experts, hash_layers=c.num_hash_layers,
                   layers=c.num_hidden_layers, routed_scaling=c.routed_scaling_factor, swiglu_limit=c.swiglu_limit,
                   expert_MB_fp4=3 * c.moe_intermediate_size * c.hidden_size * (0.5 + 1 / 32) / 1e6,
                   tokens_per_expert_at_T4096=4096 * c.num_experts_per_tok / c.n_routed_experts)
              for p in ("toy", "flash", "pro") for c in [get_config(p)]]).set_index("preset").round(2)

# %% [markdown]
# ## The reference, step by step (toy, T = 256)
#
# A toy model with random weights reads a 256-token prompt; forward hooks catch what each MoE sublayer receives
# (the ffn_norm-ed activation and the token ids). Two prompts: token ids drawn **uniformly** from the vocabulary,
# and drawn from a **Zipf** law (a few ids very frequent, like real text).

# %%
T = 256
model = Model(cfg, mtp=False).eval()


def prompt(kind: str, tokens: int = T, seed: int = 0) -> torch.Tensor:
    """Token ids: "uniform" over the vocabulary, or "zipf" (p(rank r) ~ 1/r^1.2, ranks shuffled over the ids)."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab_size
    if kind == "uniform":
        return torch.randint(0, v, (tokens,), generator=g)
    rank_p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) ** 1.2
    return torch.randperm(v, generator=g)[torch.multinomial(rank_p, tokens, replacement=True, generator=g)]


@torch.no_grad()
def ffn_inputs(ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (x [T, D] bf16, input_ids [T]) as each MoE sublayer receives them."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.ffn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args)))
    try:
        model.hidden_states(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


ids = {kind: prompt(kind) for kind in ("uniform", "zipf")}
inputs = {kind: ffn_inputs(i) for kind, i in ids.items()}
print({kind: f"{len(torch.unique(i))} distinct ids, most frequent x{int(torch.bincount(i).max())}"
       for kind, i in ids.items()})

# %% [markdown]
# **The router of a bias layer (layer 2), uniform prompt.** Scores, the biased selection and the unbiased weights.

# %%
LAYER = 2
moe = model.layers[LAYER].ffn
x, tok = inputs["uniform"][LAYER]
logits = ref.router_logits(x, moe.gate.weight)                        # [T, E] fp32
s = torch.sqrt(F.softplus(logits))                                    # [T, E]
chosen = torch.topk(s + moe.gate.bias, K, dim=-1).indices             # [T, k] selected with the bias
w = s.gather(1, chosen)
w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor           # [T, k] weights without it
ref_w, ref_ids = registry.get("moe_routing", "reference")(logits, k=K, routed_scaling_factor=cfg.routed_scaling_factor,
                                                          bias=moe.gate.bias)
print("step by step == registry moe_routing (reference):", torch.equal(chosen, ref_ids) and torch.equal(w, ref_w))
unbiased = torch.topk(s, K, dim=-1).indices
changed = (chosen.sort(-1).values != unbiased.sort(-1).values).any(-1).float().mean().item()
print(f"tokens whose expert set the bias changed: {changed:.1%}")
viz.describe(x=x, gate_weight=moe.gate.weight, logits=logits, scores=s, bias=moe.gate.bias, ids=chosen, weights=w,
             weight_sums=w.sum(-1))

# %% [markdown]
# **One expert.** The MXFP4 weights dequantise to e2m1 values (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) times a
# power-of-two scale per 32 inputs. The SwiGLU clamps the gate from above and the up projection on both sides at
# L = 10; with unit-RMS inputs and N(0, 1/K) weights the pre-activations are O(1), so the clamp should almost never
# bite here.

# %%
e = int(chosen[0, 0])
ex = moe.experts
w1 = dequant_fp4(ex.w1[e], ex.w1_scale[e], 32)
w3 = dequant_fp4(ex.w3[e], ex.w3_scale[e], 32)
w2 = dequant_fp4(ex.w2[e], ex.w2_scale[e], 32)
rows = torch.nonzero((chosen == e).any(-1)).flatten()
gate = x[rows].float() @ w1.T
up = x[rows].float() @ w3.T
h = F.silu(gate.clamp(max=cfg.swiglu_limit)) * up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
y_e = h @ w2.T
block_scale = ue8m0_to_float(ex.w1_scale[e])                          # [I, D/32] powers of two
grid = (w1.view(w1.shape[0], -1, 32) / block_scale[..., None]).unique()
print(f"expert {e}: {len(rows)} tokens; w1 / its block scale takes the values {grid.tolist()}")
print("step by step == reference swiglu_expert:",
      torch.equal(y_e, ref.swiglu_expert(x[rows], w1, w3, w2, cfg.swiglu_limit)))
viz.describe(w1_packed=ex.w1[e], w1_scale_bytes=ex.w1_scale[e], w1=w1, gate=gate, up=up, h=h, y_e=y_e,
             clamped_gate=(gate > cfg.swiglu_limit).float(), clamped_up=(up.abs() > cfg.swiglu_limit).float())

# %% [markdown]
# **The whole sublayer.** All routed experts plus the shared one, combined in fp32 and rounded once.

# %%
with torch.no_grad():
    y = moe(x, tok)
shared = (moe.shared_experts.w1, moe.shared_experts.w3, moe.shared_experts.w2)
print("module == registry moe_experts (reference):",
      torch.equal(y, registry.get("moe_experts", "reference")(x, w, chosen, ex.w1, ex.w1_scale, ex.w3, ex.w3_scale,
                                                              ex.w2, ex.w2_scale, swiglu_limit=cfg.swiglu_limit,
                                                              shared=shared)))
viz.describe(y=y, shared_part=ref.swiglu_expert(x, *shared, cfg.swiglu_limit))

# %% [markdown]
# ## Prediction: how evenly do tokens spread?
#
# Stated before the next cells run. With T = 256, k = 2, E = 8 the uniform share is `T k / E = 64` tokens per expert.
#
# * **Hash layers (0, 1), uniform prompt**: the table maps each id to k random distinct experts, ids are uniform, so
#   each expert gets a Binomial(256, 1/4) count: 64 +- 7 (coefficient of variation ~0.11).
# * **Hash layers, Zipf prompt**: the expert set depends only on the id, so the frequent ids drag their two experts
#   up together: the spread should grow several-fold (the most frequent id alone appears dozens of times).
# * **Bias layers (2, 3)**: the choice depends on the activation. With random gate rows the logits are N(0, 1)-ish per
#   expert and the bias (N(0, 0.1^2)) nudges them, so load should be about as even as a random choice on the uniform
#   prompt; on the Zipf prompt repeated ids give near-identical activations, so bias layers inherit part of the skew
#   too, but less than hash layers (the mHC streams and attention mix context into the activation).

# %%
def routing(kind: str, layer: int, backend: str = "reference") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores s [T, E], weights [T, k], ids [T, k]) of ``layer`` for prompt ``kind``."""
    xx, tt = inputs[kind][layer]
    m = model.layers[layer].ffn
    lg = ref.router_logits(xx, m.gate.weight)
    fn = registry.get("moe_routing", backend)
    kw = dict(k=K, routed_scaling_factor=cfg.routed_scaling_factor)
    wts, eids = (fn(lg, tid2eid=m.gate.tid2eid, input_ids=tt, **kw) if m.hash_layer else fn(lg, bias=m.gate.bias, **kw))
    return torch.sqrt(F.softplus(lg)), wts, eids


loads, cv = {}, []
for kind in ("uniform", "zipf"):
    for L in range(cfg.num_hidden_layers):
        _, _, eids = routing(kind, L)
        c = viz.expert_load(eids, E)
        loads[f"{kind}, layer {L} ({'hash' if cfg.is_hash_layer(L) else 'bias'})"] = c
        cv.append(dict(prompt=kind, layer=L, routing="hash" if cfg.is_hash_layer(L) else "bias",
                       min=int(c.min()), max=int(c.max()), cv=float(c.double().std() / c.double().mean())))
cv = pd.DataFrame(cv)
cv.pivot_table(index=["layer", "routing"], columns="prompt", values=["cv", "max"]).round(3)

# %% [markdown]
# Why a bias layer can be uneven even on a uniform prompt: per expert, the mean selection score over the tokens.
# A fixed random gate row that lines up with a direction all activations share scores high for every token.

# %%
diag = []
for L in range(cfg.num_hidden_layers):
    s_l, _, ids_l = routing("uniform", L)
    m = model.layers[L].ffn
    sel_score = s_l + (0 if m.hash_layer else m.gate.bias)
    diag.append(pd.DataFrame({"layer": L, "routing": "hash" if m.hash_layer else "bias", "expert": range(E),
                              "mean selection score": sel_score.mean(0).tolist(),
                              "bias": (m.gate.bias.tolist() if m.gate.bias is not None else [None] * E),
                              "tokens": viz.expert_load(ids_l, E).tolist()}))
diag = pd.concat(diag)
diag[diag.routing == "bias"].pivot_table(index="expert", columns="layer",
                                         values=["mean selection score", "tokens"]).round(3)

# %%
viz.expert_load_figure({k: v for k, v in loads.items() if k.startswith("uniform")}, ideal=T * K / E,
                       title=f"Tokens per expert, uniform prompt (T={T}, k={K}, E={E})")

# %%
viz.expert_load_figure({k: v for k, v in loads.items() if k.startswith("zipf")}, ideal=T * K / E,
                       title=f"Tokens per expert, Zipf prompt (T={T}, k={K}, E={E})")

# %% [markdown]
# Scores of the first 48 tokens (uniform prompt): a hash layer ignores them when choosing; a bias layer takes the
# top-2 of `s + bias`.

# %%
sc, idd = {}, {}
for L in (0, LAYER):
    s_l, _, ids_l = routing("uniform", L)
    name = f"layer {L} ({'hash' if cfg.is_hash_layer(L) else 'bias'})"
    sc[name], idd[name] = s_l[:48], ids_l[:48]
viz.router_scores_figure(sc, idd)

# %% [markdown]
# ## Interpretation
#
# * **Hash layers** behaved as predicted: on the uniform prompt their coefficient of variation is near the
#   binomial ~0.11 (0.10-0.17 in our run), and on the Zipf prompt it grows several-fold (~0.6): the choice is a
#   function of the id, so the load is the id-frequency histogram folded through the table. No load balancing is
#   possible there, which is why DSv4 hashes only its first layers.
# * **Bias layers** did not: on the uniform prompt their load was about 3x less even than a random choice (CV ~0.37
#   in our run), and on the Zipf prompt layer 2 was as skewed as the hash layers while layer 3 was not. The
#   per-expert table shows why: with a fixed random gate, some experts score higher for almost every token (the
#   activations share directions), and the small random bias does not correct it. In a trained model that is
#   exactly the bias's job (noaux_tc load balancing adjusts it during training); random weights cannot show it.
# * **Weights from unbiased scores**: the bias only moves the selection (it changed the expert set of the fraction of
#   tokens printed above); the weights renormalise the raw `sqrt(softplus)` scores. A vLLM comment notes that Flash's
#   biases are all about 8.08, which is why weighting by biased scores would be a bug.
# * **Clamp**: with these magnitudes the SwiGLU clamp does not bite (the `clamped_*` rows above); it matters for the
#   large activations of trained checkpoints.
#
# ## The fused kernels
#
# Which backends exist for the MoE ops and whether they run here:

# %%
MOE_OPS = ["router_gemm", "moe_router_logits", "moe_routing", "moe_experts", "mega_moe"]
pd.DataFrame([dict(op=op, backend=b, available=ok, reason=why)
              for op in MOE_OPS if op in registry.ops() for b in registry.backends(op)
              for ok, why in [registry.availability(op, b)]])

# %% [markdown]
# ### Prediction (before measuring)
#
# * **Triton router** (`moe_routing`): sqrt-softplus evaluated with a series instead of `log1p`, top-k by k argmax
#   rounds, a tree-summed normaliser. Expert ids identical to the reference except at near ties (none expected on
#   random inputs); weights within a few fp32 ulps, not bitwise.
# * **Router GEMM on the H100** (#41300, stored): `[T, 4096] x [4096, 256]` with fp32 output is tiny; a few
#   microseconds and flat in T up to a few hundred tokens (latency-bound), then growing with the bytes of x.
# * **Grouped experts** (DeepGEMM, stored): MXFP4 weights converted once to fp8 blocks, tokens permuted into
#   per-expert groups, two grouped fp8 GEMMs. At small T the cost is reading the touched experts' weights (each of
#   the up to T*k distinct experts is ~25 MB in fp8 at Flash size, 13 MB as stored MXFP4), so time grows with the
#   number of distinct experts hit and then flattens once all 256 are touched; the eager reference (a Python loop
#   over experts) should be far slower.

# %% [markdown]
# ### Measurement: live on this device
#
# Every non-reference router backend that runs here, on the router logits of a hash and a bias layer for both
# prompts, against the reference: same expert sets (`topk_overlap`; mismatches explained by near ties are allowed)
# and the weights' distance in fp32 ulps where the ids agree slot by slot.

# %%
rows_live = []
for kind in ("uniform", "zipf"):
    for L in (0, LAYER):                      # one hash and one bias layer (the interpreter takes ~1 s per call)
        xx, tt = inputs[kind][L]
        m = model.layers[L].ffn
        lg = ref.router_logits(xx, m.gate.weight)
        _, w_ref, id_ref = routing(kind, L)
        for b in registry.backends("moe_routing"):
            ok, why = registry.availability("moe_routing", b)
            if b == "reference" or not ok:
                continue
            t0 = time.perf_counter()
            _, w_b, id_b = routing(kind, L, backend=b)
            secs = time.perf_counter() - t0
            ov = numerics.topk_overlap(id_ref, id_b, scores=torch.sqrt(F.softplus(lg))
                                       + (0 if m.hash_layer else m.gate.bias))
            # compare weights slot by slot only where the ids agree in order
            same = (id_ref == id_b)
            ulps = numerics.ulp_diff(w_b[same], w_ref[same])
            rows_live.append(dict(prompt=kind, layer=L, routing="hash" if m.hash_layer else "bias", backend=b,
                                  ids_equal=bool(torch.equal(id_ref, id_b)), topk_overlap=ov.mean_overlap,
                                  unexplained_rows=ov.unexplained_rows,
                                  weight_ulp_max=int(ulps.max()) if ulps.numel() else 0,
                                  weight_max_abs=float((w_b[same] - w_ref[same]).abs().max()) if same.any() else 0.0,
                                  seconds=round(secs, 2), note=why))
pd.DataFrame(rows_live) if rows_live else print("no non-reference moe_routing backend runs here")

# %% [markdown]
# ### Measurement: stored H100 results
#
# The router GEMM before/after vLLM #41300 (`data/results/h100/pr41300_router_gemm.jsonl`, CUDA-graph replay) and,
# where recorded, the MoE expert path (`pr44367_megamoe`).

# %%
gpu_moe = any(registry.availability(op, b)[0] for op in ("moe_experts", "mega_moe") if op in registry.ops()
              for b in registry.backends(op) if b != "reference")
stored = results.load(slug="h100", experiment="pr41300_router_gemm", strict=False)
stored_moe = results.load(slug="h100", experiment="pr44367_megamoe", strict=False)
print(("" if gpu_moe else "NOTE: no GPU MoE backend runs on this machine -- the charts below are STORED H100 "
       "results, not a live measurement. | ") + viz.stored_label(stored))
peaks = roofline.load_peaks("h100")


def router_gemm_chart(preset: str = "flash", mode: str = "cuda-graph"):
    c = get_config(preset)
    df = stored[(stored.get("shape") == f"router-{preset}") & stored.variant.isin(["before", "after"])]
    floor = (lambda t: viz.floor_us(roofline.cost("router_gemm", T=t, N=c.n_routed_experts, K=c.hidden_size), peaks)
             ) if peaks else None
    return viz.stored_time_figure(df, "router_gemm", preset=preset, mode=mode, floor_us=floor, floor_name="roofline floor",
                                  title=f"router GEMM [T, {c.hidden_size}] x [{c.hidden_size}, {c.n_routed_experts}] "
                                        f"-> fp32, {preset}, {mode}")


def moe_chart(op: str = "moe_experts", preset: str = "flash"):
    c = get_config(preset)
    floor = (lambda t: viz.floor_us(roofline.cost(op, cfg=c, T=t, n_shared=c.n_shared_experts)
                                    if op == "moe_experts" else roofline.cost(op, cfg=c, T=t), peaks)) if peaks else None
    return viz.stored_time_figure(stored_moe[~stored_moe.variant.isin(["before", "after"])], op,
                                  preset=preset, mode="cuda-events", floor_us=floor,
                                  floor_name="roofline floor (max of bytes / copy BW, FLOPs / fp8 rate)",
                                  title=f"{op}, {preset}")


if len(stored):
    display(router_gemm_chart())
if len(stored_moe):
    display(moe_chart("moe_experts"))
    display(moe_chart("moe_routing"))
else:
    print("no stored H100 MoE-expert results yet (data/results/h100/pr44367_megamoe.jsonl): run "
          "`python bench/pr44367_megamoe.py --out $OUT` on the H100 and copy the .jsonl there")

# %% [markdown]
# ## Explore
#
# **Routing**: pick the prompt kind, T, the layer and the router backend; the toy model runs the prompt and the
# load histogram and the scores are redrawn. **Stored H100 kernels**: pick a chart and a preset.
# (`lab.widgets.explore`: without ipywidgets, as in headless runs, each explorer draws its default once.)

# %%
def explore_routing(prompt_kind: str = "zipf", tokens: int = 256, layer: int = 0, backend: str = "reference"):
    ok, why = registry.availability("moe_routing", backend)
    if not ok:
        return f"moe_routing/{backend} cannot run here: {why}"
    seen = inputs[prompt_kind] if tokens == T else ffn_inputs(prompt(prompt_kind, tokens))
    xx, tt = seen[layer]
    m = model.layers[layer].ffn
    lg = ref.router_logits(xx, m.gate.weight)
    fn = registry.get("moe_routing", backend)
    kw = dict(k=K, routed_scaling_factor=cfg.routed_scaling_factor)
    _, eids = fn(lg, tid2eid=m.gate.tid2eid, input_ids=tt, **kw) if m.hash_layer else fn(lg, bias=m.gate.bias, **kw)
    kind = "hash" if m.hash_layer else "bias"
    return [viz.expert_load_figure({f"layer {layer} ({kind})": viz.expert_load(eids, E)}, ideal=tokens * K / E,
                                   title=f"{prompt_kind} prompt, T={tokens}, {backend} router"),
            viz.router_scores_figure({f"layer {layer} ({kind})": torch.sqrt(F.softplus(lg))[:48]},
                                     {f"layer {layer} ({kind})": eids[:48]})]


def explore_stored(chart: str = "moe_experts", preset: str = "flash"):
    if chart == "router_gemm":
        return router_gemm_chart(preset) if len(stored) else "no stored H100 router GEMM results"
    return moe_chart(chart, preset) if len(stored_moe) else "no stored H100 MoE results"


explore(explore_routing, prompt_kind=["uniform", "zipf"], tokens=[64, 128, 256, 512],
        layer=list(range(cfg.num_hidden_layers)), backend=registry.backends("moe_routing"))

# %%
explore(explore_stored, chart=["moe_experts", "moe_routing", "router_gemm", "mega_moe", "swiglu_quant"],
        preset=["flash", "pro"])

# %% [markdown]
# ## Interpretation
#
# * **Reference**: the step-by-step cells reproduce the registry's router and expert ops bitwise; the module docstrings
#   at the top are the code.
# * **Load**: read the coefficient-of-variation table against the prediction. Hash routing is blind to content, so a
#   skewed token distribution becomes a skewed expert load one for one; the bias layers' selection moves with the
#   activation, and their bias is the knob a trainer turns to balance load (noaux_tc), which random weights do not
#   exercise.
# * **Fused router**: the Triton kernel (interpreter on a CPU) picks the same experts and weights within a few ulps;
#   on a GPU it replaces the softplus/sqrt/topk/gather/normalise chain of eager kernels with one launch.
# * **Router GEMM (stored)**: before (cuBLAS custom op) and after (`torch.mm(out_dtype=fp32)`) sit on the same
#   latency plateau at small T; notebook 10 has the full #41300 analysis.

# %%
print(f"notebook ran in {time.perf_counter() - NB_START:.1f} s on {DEVICE}")
