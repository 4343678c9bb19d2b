# %% [markdown]
# # 12 · vLLM #43891: direct calls instead of `torch.ops` wrappers (and the attention output path they wrap)
#
# Until #43746 the DSv4 forward was compiled by Dynamo, so every call Dynamo could not trace had to be an opaque
# custom op: `torch.ops.vllm.deepseek_v4_attention` (the sparse attention core, an eager break under the breakable
# CUDA graph), `torch.ops.vllm.deepseek_v4_fp8_einsum` (DeepGEMM's `fp8_einsum("bhr,hdr->bhd")` for the grouped
# low-rank `wo_a`) and `torch.ops.vllm.deepseek_v4_mega_moe_experts`. Each had a schema with a mutated `out`, a fake
# impl, and (attention, MoE) looked its layer up by name in the forward context.
#
# **The PR's claim** (its whole description): "Now that DSv4 does not rely on torch compile, we don't need to wrap
# the deepgemm kernel calls with the torch op registration." No tests and no numbers were attached (refactors.md 4.e).
#
# Here both paths call the same dsv4lab implementations: `sparse_attention_with_sink` (attention core),
# `fp8_einsum_wo_a` (DeepGEMM on an SM90 GPU, the dequantised reference elsewhere) and the MoE reference `moe`
# (routed + shared SwiGLU experts, standing in for MegaMoE, which needs SM100). The attention output path around
# the einsum is implemented too: a Triton kernel for inverse RoPE + per-(token, 128-chunk) fp8 quantisation with
# power-of-two scales (dsv4-layers.md 3.7), then the fp8 einsum, then `wo_b`.

# %%
import dsv4lab.kernels.triton  # noqa: F401  -- first: picks the Triton interpreter on a CPU before triton loads

import inspect
import time

import pandas as pd
import plotly.express as px
import torch
from IPython.display import HTML, display

from dsv4lab.kernels.deep_gemm import fp8_einsum as dg
from dsv4lab.kernels.reference import attn_out as ref
from dsv4lab.lab import results, timing
from dsv4lab.refactors import pr43891_op_registration as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device: {DEVICE} | torch {torch.__version__} | fp8 einsum backend here: {R.prepare(DEVICE)}")

# %% [markdown]
# ## Before and after, side by side
#
# Left: the registered op and the call through `torch.ops.dsv4lab.*` (vLLM's `direct_register_custom_op` pattern:
# schema with `Tensor(a!) out`, CPU and CUDA kernels, a fake). Right: the direct call #43891 left.

# %%
def _pre(title: str, code: str) -> str:
    esc = code.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<div style='flex:1;min-width:0'><b>{title}</b><pre style='font-size:11px'>{esc}</pre></div>"


def side_by_side(left: list[tuple[str, object]], right: list[tuple[str, object]]) -> None:
    col = lambda items: "".join(_pre(t, o if isinstance(o, str) else inspect.getsource(o)) for t, o in items)
    display(HTML(f"<div style='display:flex;gap:12px'><div style='flex:1'>{col(left)}</div>"
                 f"<div style='flex:1'>{col(right)}</div></div>"))


schemas = "\n".join(f"dsv4lab::{name}{schema}" for name, (schema, _) in R._SCHEMAS.items())
side_by_side([("before: schemas", schemas), ("before: registration", R._register_ops),
              ("before: attention", R.attention_before), ("before: its op impl", R._attention_op),
              ("before: fp8 einsum", R.fp8_einsum_before), ("before: its op impl", R._fp8_einsum_op),
              ("before: MoE experts", R.moe_before), ("before: its op impl", R._moe_op)],
             [("after: attention", R.attention_after), ("after: fp8 einsum", R.fp8_einsum_after),
              ("after: MoE experts", R.moe_after), ("both: the einsum entry point", R.fp8_einsum),
              ("both, on an SM90 GPU: the DeepGEMM backend", dg.fp8_einsum_wo_a)])

# %% [markdown]
# ## The attention output path: inverse RoPE + fp8 quant (Triton), fp8 einsum, `wo_b`
#
# `o[t, h, 448:] = RoPE^-1(o[t, h, 448:], pos_t)` in fp32; every 128-chunk of the flattened `[H*d]` row gets a
# scale `2^ceil(log2(max(amax, 1e-10)/448))` and is cast to e4m3 with round-to-nearest-even; the groups
# `[T, G, (H/G)*d]` then go through `z = fp8_einsum("bhr,hdr->bhd", (o_fp8, o_scale), (wo_a_fp8, wo_a_scale))`
# (wo_a quantised once in 128x128 blocks, fp32 power-of-two scales: the SM90 form) and `out = z.flatten(1) @ wo_b.T`.
#
# The Triton kernel is **bit for bit** equal to the reference on the CPU (interpreter) and is meant to be on the GPU:
# cos/sin come from a shared fp32 table, fp-fusion is off, and the e4m3 rounding is done with integer ops because the
# interpreter's own fp32->e4m3 cast rounds ties away from zero and drops mantissa carries (125.95 -> 64).

# %%
from dsv4lab.kernels.triton.inv_rope_fp8_quant import inv_rope_fp8_quant as quant_triton  # noqa: E402
from dsv4lab.rope import base_inv_freq  # noqa: E402

cs = ref.rope_cos_sin_cache(base_inv_freq(64, 10000.0), 4096)
o = (torch.randn(4, 4, 128) * torch.logspace(-2, 2, 4)[:, None, None]).to(torch.bfloat16)   # toy heads, d = 128
pos = torch.randint(0, 4096, (4,))
q_ref, s_ref = ref.inv_rope_fp8_quant(o, pos, cs)
q_tri, s_tri = quant_triton(o.to(DEVICE), pos.to(DEVICE), cs.to(DEVICE))
print("Triton == reference, fp8 bytes:", torch.equal(q_tri.view(torch.uint8).cpu(), q_ref.view(torch.uint8)),
      "| scales:", torch.equal(s_tri.cpu(), s_ref), "| scales of token 0:", s_ref[0].tolist())

# %% [markdown]
# What the fp8 activation costs in accuracy, live on toy shapes (H=4, d=128, G=2, o_l=128, D=256): the fp64 oracle
# of the same inputs and the same (dequantised) weight values vs the fp8 path and the bf16 path (DS-ref's bf16
# einsum). e4m3 keeps 4 significant bits, so expect ~2^-4 / sqrt(12) relative RMS per element, ~10x the bf16 path.

# %%
from dsv4lab.lab.numerics import compare  # noqa: E402
from dsv4lab.quant import dequant_fp8  # noqa: E402

inp = R.make_inputs("toy", tokens=32, device="cpu", seed=3)
w_deq = dequant_fp8(inp.wo_a_q, inp.wo_a_scale, (128, 128), torch.float64)
oracle = ref.o_proj_oracle(inp.q, inp.positions, inp.cos_sin_cache, w_deq, inp.wo_b)
fp8 = ref.o_proj_fp8(inp.q, inp.positions, inp.cos_sin_cache, inp.wo_a_q, inp.wo_a_scale, inp.wo_b)
x_bf16 = ref.inv_rope(inp.q, inp.positions, inp.cos_sin_cache).to(torch.bfloat16).view(32, 2, -1)
bf16 = ref.wo_a_einsum_bf16(x_bf16, w_deq.to(torch.bfloat16)).flatten(1) @ inp.wo_b.T
cmp = compare(oracle, bf16, fp8)
print(f"rel_rms vs fp64: fp8 path {cmp.rel_rms:.3e}, bf16 path {cmp.eager_rel_rms:.3e}, ratio {cmp.err_ratio:.1f}x "
      "(the 2x bar of compare() is for same-precision kernels; here the formats differ on purpose)")

# %% [markdown]
# ## Prediction (before measuring)
#
# * **Numerics: bitwise identical.** The same implementation runs with the same arguments; the dispatcher only boxes
#   them (`list(recipe)` -> `int[]` -> `tuple(recipe)` round-trips exactly).
# * **Host time per call.** Before = `OpOverloadPacket.__call__` + dispatcher boxing of 5-7 arguments (tensors,
#   `str`, `int[]`, `float`) + the Python impl frame + a dict lookup of the layer by name; after = one Python call.
#   Expect single-digit microseconds per call, more for the einsum (7 arguments incl. an `int[]`).
# * **Per forward** (op calls removed): attention core + fp8 einsum per decoder layer, 43 (Flash) / 61 (Pro) layers,
#   the MTP layer not counted, plus one MegaMoE experts call per layer when MegaMoE runs (SM100 only):
#   **Flash 86 (129 with MegaMoE), Pro 122 (183 with MegaMoE)** calls. At ~3-6 us each: a few hundred us per eager
#   forward step -- comparable to a decode step's GPU time at small batch, invisible at large prefill.
# * **GPU time under graph replay: unchanged.** Host code does not run at replay; the captured kernels are the same.
# * **torch.compile(fullgraph=True):** the before path traces (each op is one FX node whose shapes come from the
#   fake); the after path has to trace into DeepGEMM's pybind call and fails -- the registration is what made
#   compiling possible, so the PR is a one-way door for compile (vLLM #53455).

# %% [markdown]
# ## Measurement
#
# `R.run` on this device (quick: bitwise checks, the work-free probes -- each op's schema and glue without its
# work, isolating exactly what #43891 removed -- and per-forward totals). On a CPU the graph-replay timing comes back
# as `unavailable`. Stored H100 results (`bench/pr43891_op_registration.py`) are loaded when present.

# %%
t0 = time.perf_counter()
live = pd.DataFrame(R.run(device=DEVICE, quick=True))
print(f"R.run: {len(live)} records in {time.perf_counter() - t0:.1f} s")
stored = results.load(slug="h100", experiment=R.EXPERIMENT, strict=False)
if len(stored):   # several GPU runs may be stored: keep the latest record of each measurement
    key = [c for c in ("op", "backend", "variant", "preset", "tokens", "metric", "mega_moe") if c in stored.columns]
    stored = stored.sort_values("timestamp").drop_duplicates(subset=key, keep="last")
stored_note = (f"stored H100 results ({len(stored)} records, {stored['timestamp'].min()} .. {stored['timestamp'].max()})"
               if len(stored) else "no stored H100 results yet (run bench/pr43891_op_registration.py on the H100)")
print(stored_note)
live[live.metric == "bitwise_equal"][["op", "backend", "tokens", "value"]]

# %% [markdown]
# ### Host overhead per call

# %%
def overhead_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    h = df[df.metric == "host_overhead"][["op", "backend", "variant", "value"]].copy()
    h["what"] = h["backend"].map(lambda b: "probe (registration only)" if b == "probe" else f"full op ({b})")
    return h.assign(source=source)


frames = [overhead_frame(live, f"live {DEVICE}")]
if len(stored):
    frames.append(overhead_frame(stored, "stored H100"))
over = pd.concat(frames, ignore_index=True)
fig = px.bar(over, x="op", y="value", color="variant", barmode="group", facet_col="what", facet_row="source",
             log_y=True, title=f"host time per call (us), toy shapes, T=1 -- live on {DEVICE}; {stored_note}")
fig.update_yaxes(title="us / call")
fig

# %% [markdown]
# ### Per forward step: per-call savings x op calls

# %%
fwd = [live[live.metric == "host_overhead_per_forward"].assign(source=f"live {DEVICE}")]
if len(stored):
    fwd.append(stored[stored.metric == "host_overhead_per_forward"].assign(source="stored H100"))
fwd = pd.concat(fwd, ignore_index=True)
fwd["case"] = fwd["preset"] + fwd["mega_moe"].map({True: " + MegaMoE", False: ""}) + " (" + \
    fwd["calls"].astype(str) + " calls)"
fig = px.bar(fwd, x="case", y="value", color="backend", barmode="group", facet_col="source",
             title="host time removed per eager forward step (us) = sum over ops of calls x (before - after)")
fig.update_yaxes(title="us / forward")
fig

# %% [markdown]
# ### torch.compile(fullgraph=True) of the attention-output block
#
# The block is quant (reference, plain torch) + fp8 einsum + `wo_b`; only the way the einsum is reached differs.
# On a GPU the after path reaches DeepGEMM's pybind function. On a CPU it reaches the reference einsum, which is plain
# torch and traces fine, so a third variant puts the einsum behind `torch.compiler.disable` -- a stand-in for an
# opaque C-extension call, labelled as such.

# %%
t0 = time.perf_counter()
outcomes = R.compile_outcomes(R.make_inputs("toy", tokens=2, device=DEVICE))
print(f"compile checks: {time.perf_counter() - t0:.1f} s")
comp = pd.DataFrame(outcomes).T[["compiled", "graphs", "graph_breaks", "error", "bitwise_equal"]]
if len(stored) and (stored.metric == "compile_fullgraph").any():
    st = stored[stored.metric == "compile_fullgraph"].set_index("variant")
    comp = pd.concat([comp.assign(source=f"live {DEVICE}"),
                      st.rename(columns={"value": "compiled"})[["compiled", "graphs", "graph_breaks", "error"]]
                      .assign(source="stored H100 (" + st["op"] + ")")])
comp

# %% [markdown]
# ### fp8 einsum (DeepGEMM) vs bf16 einsum, and the quant kernel's bandwidth (H100)
#
# Flash (H=64, G=8, o_l=1024) and Pro (H=128, G=16) geometry, T from 1 to 16384. Targets recorded (not asserted):
# fp8 einsum >= 60 % of the measured fp8 matmul peak and the inverse-RoPE quant >= 80 % of the measured copy
# bandwidth, both at T >= 4096. These need the GPU run; CPU timings of these shapes would say nothing.

# %%
if len(stored) and (stored.op == "wo_a_einsum").any():
    sw = stored[(stored.metric == "time") & stored.op.isin(["wo_a_einsum", "inv_rope_fp8_quant"])]
    fig = px.line(sw.sort_values("tokens"), x="tokens", y="value", color="backend", line_dash="op",
                  facet_col="preset", log_x=True, log_y=True, markers=True,
                  title=f"p50 us per call in CUDA-graph replay -- {stored_note}")
    display(fig)
    err = stored[(stored.op == "wo_a_einsum") & (stored.metric == "rel_rms") & (stored.variant == "fp8_vs_bf16")]
    display(err[["preset", "tokens", "value", "eager"]].sort_values(["preset", "tokens"])
            .rename(columns={"value": "rel_rms fp8", "eager": "rel_rms bf16"}))
    tgt = stored[stored.metric == "target_met"]
    display(tgt[["op", "preset", "tokens", "value", "target", "timestamp"]].sort_values(["op", "preset", "tokens"]))
else:
    print("No stored H100 sweep yet: run `python bench/pr43891_op_registration.py --out $OUT` on the H100 and copy "
          "the .jsonl to data/results/h100/.")

# %% [markdown]
# ## Explore one case
#
# Pick an op, a preset (whose op count per forward multiplies the per-call cost) and a token count: the before and
# after host time per call is measured live on toy shapes at that T (the probe and the full op). Without
# ipywidgets (headless) the default case runs once.

# %%
def explore(op: str = "fp8_einsum", preset: str = "flash", tokens: int = 1) -> None:
    case = R.make_inputs("toy", tokens=tokens, device=DEVICE, seed=tokens)
    calls = R.ops_per_forward(preset, mega_moe=True)[op]
    lines = []
    for label, pairs, n in (("probe", R.probe_calls(case), 2000), ("full op", R.op_calls(case), 20)):
        b, a = pairs[op]
        tb, ta = timing.host_overhead(b, n, repeats=3, device=DEVICE), timing.host_overhead(a, n, repeats=3, device=DEVICE)
        lines.append(f"{label:>8}: before {tb:9.2f} us, after {ta:9.2f} us, delta {tb - ta:8.2f} us/call "
                     f"-> {calls * (tb - ta) / 1e3:7.3f} ms per {preset} forward ({calls} calls)")
    b, a = R.op_calls(case)[op]
    print(f"{op}, T={tokens}, live on {DEVICE}; bitwise equal: {torch.equal(b(), a())}\n" + "\n".join(lines))


try:
    import ipywidgets as widgets

    from dsv4lab.lab.widgets import interact  # headless runs call explore() once, no Output widget

    interact(explore, op=widgets.Dropdown(options=list(R.OPS), value="fp8_einsum"),
                     preset=widgets.Dropdown(options=list(R.LAYERS), value="flash"),
                     tokens=widgets.SelectionSlider(options=[1, 2, 4, 8, 16], value=1))
except ImportError:
    explore()

# %% [markdown]
# ## Interpretation
#
# * **Same results**: every op and the whole layer step are bitwise equal before and after (live above; the H100 run
#   repeats the check with DeepGEMM and the Triton quant), as the refactor requires.
# * **What the registration cost**: the probes isolate the dispatcher round trip + glue + layer lookup. Multiplied by
#   86-183 calls per step it is a few hundred microseconds per *eager* forward -- real for decode steps that run
#   eagerly (batch above the largest captured size, `--enforce-eager`), zero under CUDA-graph replay, where the H100
#   records show the same GPU time and kernel list before and after.
# * **What the registration bought**: an opaque, fake-described node that `torch.compile(fullgraph=True)` can trace;
#   the direct DeepGEMM call cannot be traced, so after #43891 compiling DSv4 again means re-registering these calls
#   (vLLM #53455 found exactly that).
# * **The wrapped path on the H100** (first run, 2026-11-23): DeepGEMM's fp8 einsum reached 81-82 % of the measured
#   fp8 matmul peak (1516 TFLOP/s, `torch._scaled_mm`) at T = 4096 and 61-64 % at T = 16384, 1.3-1.5x faster than the
#   bf16 einsum; the first version of the quant kernel reached only 48-51 % of the copy bandwidth at T >= 4096
#   (target 80 %): it rotated every element and always ran a software e4m3 rounding, ~55 PTX instructions per
#   element. The current kernel rotates the rope lanes only and uses the hardware RNE cast on the GPU (~15
#   instructions per element in the sm_90a PTX). Its final H100 run (tile 2048 elements, 2 warps, picked by the
#   bench's tile sweep) reached 80-86 % of the copy bandwidth at T >= 4096, and 86-87 % when the L2 is flushed by a
#   read instead of a memset (a memset flush leaves dirty lines whose write-back lands inside the timed kernel).
# * **GPU time under graph replay**: timed with the two graphs replayed alternately (`lab.timing.bench_interleaved`),
#   after/before is 0.998-1.000 on all four shapes; timed one after the other, GPU clock drift alone had made one
#   shape differ by 4 %.
# * **The wrapped path itself**: the Triton quant reproduces the reference bit for bit; the fp8 activations cost ~2^-4
#   relative per element (about 10x the bf16 path's error at the output), which is the price of running `wo_a` as an
#   fp8 GEMM. On SM90 that GEMM is DeepGEMM's `fp8_einsum` with FP32 scales and recipe (1, 128, 128); the PR was
#   validated on SM100, where the recipe is (1, 1, 128) with packed UE8M0 scales and MegaMoE exists.
