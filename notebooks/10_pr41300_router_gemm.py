# %% [markdown]
# # 10 · vLLM #41300: `torch.mm(out_dtype=fp32)` replaces a custom cuBLAS GEMM
#
# DSv4 computes its **router logits** and the **compressor / indexer-compressor** `kv_score` projections as
# `x [T, D] bf16 @ W [N, D]^T bf16 -> [T, N] fp32`: bf16 inputs, fp32 accumulation, fp32 output, no rounding of
# the result to bf16. Before PR #41300 vLLM did this with its own CUDA op (`csrc/moe/router_gemm.cu`:
# `cublasGemmEx`, `CUBLAS_COMPUTE_32F`, `CUBLAS_GEMM_DEFAULT_TENSOR_OP`, registered as
# `torch.ops._moe_C.router_gemm_bf16_fp32`). After it, one ATen call: `torch.mm(x, w.T, out_dtype=torch.float32)`.
#
# **The PR's claim.** Same math (bf16 x bf16 -> fp32, fp32 accumulation), no custom `.cu` to build and bind, and no
# slower. Its only evidence was a profiler run on SM100 showing one `nvjet` kernel (refactors.md 2.e).
#
# Shapes (V4-Flash unless noted): router 256 x 4096 (Pro: 384 x 7168), compressor 2048 x 4096 (ratio-4 layers) and
# 1024 x 4096 (ratio-128 layers), indexer compressor 512 x 4096; T from 1 (decode) to 16384 (prefill chunks).

# %%
import inspect

import pandas as pd
import plotly.express as px
import torch
from IPython.display import HTML, display

from dsv4lab.kernels.cuda import cublas_gemm
from dsv4lab.kernels.torch import mm_fp32
from dsv4lab.lab import results
from dsv4lab.refactors import pr41300_router_gemm as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device: {DEVICE} | torch {torch.__version__}")

# %% [markdown]
# ## Before and after, side by side
#
# Left: the re-created "before" (our own `cublasGemmEx` call in a `TORCH_LIBRARY` op, built at run time with
# nvcc) and the variant that calls it through the dispatcher. Right: the "after" call and the registry backend
# that wraps it with the shared input contract.

# %%
def _pre(title: str, code: str) -> str:
    esc = code.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<div style='flex:1;min-width:0'><b>{title}</b><pre style='font-size:11px'>{esc}</pre></div>"


src = cublas_gemm.CUDA_SOURCE
cublas_call = src[src.index("  cublasHandle_t handle"):src.index("  return out;\n}") + len("  return out;\n")]
left = _pre("before: C++ (dsv4lab.kernels.cuda.cublas_gemm.CUDA_SOURCE)", cublas_call) + \
    _pre("before: variant", inspect.getsource(R.before))
right = _pre("after: variant", inspect.getsource(R.after)) + \
    _pre("after: registry backend", inspect.getsource(mm_fp32.router_gemm_torch))
display(HTML(f"<div style='display:flex;gap:12px'><div style='flex:1'>{left}</div><div style='flex:1'>{right}</div></div>"))

# %% [markdown]
# The notebook also measures three alternatives: `bf16_linear` = `F.linear(x, w).float()` (vLLM's Tier-3 router:
# the logits are **rounded to bf16** first), and `upcast_fp32` / `upcast_tf32` = `torch.mm(x.float(), w.float().T)`
# with TF32 off / on. Which of them can run here:

# %%
avail = pd.DataFrame([{"variant": v, "runs here": ok, "reason": why, "doc": R.VARIANTS[v].__doc__.splitlines()[0]}
                      for v in R.VARIANTS for ok, why in [R.variant_availability(v, DEVICE)]]).set_index("variant")
print("cuBLAS extension status:", cublas_gemm.status())
avail

# %% [markdown]
# ## Prediction (before measuring)
#
# * **Numerics.** bf16 x bf16 products are exact in fp32 (8 + 8 significand bits <= 24), so `before`, `after`,
#   `upcast_fp32` and `upcast_tf32` (bf16 is exact in TF32 too) differ only in fp32 **summation order**: each is
#   within `gamma_K * |x| @ |w|^T` (`gamma_K = K 2^-24 / (1 - K 2^-24)`) of the exact result, and their
#   normwise error `max|y - y64| / max|y64|` should be ~1e-7. `before` vs `after` are bitwise equal only if cuBLAS
#   and cuBLASLt pick kernels with the same reduction order: not guaranteed.
# * `bf16_linear` adds one bf16 rounding: at most 2^-8 relative per element, **~2^-9 on average**.
# * **Routing.** Rounding is monotonic, so it never reverses two logits, but it **merges** near-equal ones into a
#   tie that the bias (or the index) then decides. On the near-tie inputs (`R.near_tie_case`: two expert rows that
#   differ by 2^-11 in one weight, the pair competing for the 6th slot) we expect `bf16_linear` to flip the top-6
#   set for ~0.98 x 0.98 ≈ 96 % of tokens, every fp32-output path for none. On random inputs flips need an
#   accidental near tie: rare but not zero for bf16, zero for fp32 paths.
# * **Time.** Both `before` and `after` launch one cuBLAS(Lt) GEMM; at decode sizes both are launch/latency
#   bound and the kernel choice may differ (different tiles or split-K). `after` skips a Python wrapper and a custom
#   dispatcher entry; a graph replay hides that host cost. The upcast variants add 2 cast kernels and materialise
#   fp32 copies (4 MiB for the Flash router weight per call), and `upcast_fp32` runs a non-tensor-core GEMM: slower.

# %% [markdown]
# ## Measurement
#
# `R.run` on this device (quick mode on the CPU: a few seconds). On a CPU the GPU-only variants come back as
# `unavailable` records with their reasons; the CPU timings are labelled `cpu-clock` and are not comparable to GPU
# times. Stored H100 results (from `bench/pr41300_router_gemm.py`) are loaded with `lab.results.load` when present.

# %%
live = pd.DataFrame(R.run(device=DEVICE, quick=True))
stored = results.load(slug="h100", experiment=R.EXPERIMENT, strict=False)
stored_note = (f"stored H100 results ({len(stored)} records, {stored['timestamp'].min()} .. {stored['timestamp'].max()})"
               if len(stored) else "no stored H100 results yet (run bench/pr41300_router_gemm.py on the H100)")
print(stored_note)
live[live.metric == "unavailable"][["variant", "reason"]]

# %% [markdown]
# ### Error per variant vs fp64 (live)

# %%
err = live[live.metric == "max_rel"][["variant", "shape", "tokens", "value"]]
fig = px.bar(err.groupby(["shape", "variant"], as_index=False)["value"].max(), x="shape", y="value",
             color="variant", barmode="group", log_y=True,
             title=f"max |y - y64| / max |y64| per variant, live on {DEVICE} (largest over T)")
fig.add_hline(y=2 ** -9, line_dash="dot", annotation_text="2^-9")
fig

# %% [markdown]
# ### Expert flips under sqrt-softplus + bias top-6 (live: the routing math is device-independent)
#
# `bf16_emulated` rounds the fp32 reference logits to bf16: the shortcut's arithmetic without depending on which
# GEMM kernel produced them.

# %%
flips = live[live.metric == "topk_flip_rate"][["variant", "case", "tokens", "value"]]
if len(stored):
    st = stored[stored.metric == "topk_flip_rate"][["variant", "case", "preset", "value"]]
    flips = pd.concat([flips.assign(source=f"live {DEVICE}"),
                       st.assign(source="stored H100 " + st["preset"])], ignore_index=True)
else:
    flips = flips.assign(source=f"live {DEVICE}")
fig = px.bar(flips, x="variant", y="value", color="case", barmode="group", facet_col="source",
             title=f"top-6 flip rate vs the fp64 oracle ({stored_note})")
fig.update_yaxes(title="fraction of tokens whose expert set changed")
fig

# %% [markdown]
# ### Time vs T

# %%
def time_frame() -> tuple[pd.DataFrame, str]:
    src = stored if len(stored) else live
    t = src[(src.metric == "time")]
    if "case" in t.columns:
        t = t[t["case"].isna()]
    label = stored_note if len(stored) else f"live on {DEVICE} ({t['timing_mode'].iloc[0] if len(t) else 'none'})"
    return t[["variant", "shape", "tokens", "timing_mode", "value", "p20", "p80"]], label


times, time_label = time_frame()
fig = px.line(times.sort_values("tokens"), x="tokens", y="value", color="variant", line_dash="timing_mode",
              facet_col="shape", facet_col_wrap=3, log_x=True, log_y=True, markers=True,
              title=f"p50 time per call (us) -- {time_label}")
fig.update_layout(height=600)
fig

# %% [markdown]
# Stored H100 runs carry one `target_met` record per (shape, T): `after` within 5 % of `before` in CUDA-graph
# replay, with both kernel names where it is not.

# %%
if len(stored) and (stored.metric == "target_met").any():
    tgt = stored[stored.metric == "target_met"]
    display(tgt[["shape", "tokens", "ratio", "value", "before_kernels", "after_kernels"]].sort_values(["shape", "tokens"]))
    print(f"after <= 1.05 x before at {int(tgt.value.sum())} of {len(tgt)} (shape, T) cases")
else:
    print("No H100 target records stored yet: run `python bench/pr41300_router_gemm.py --out $OUT` on the H100 "
          "and copy the .jsonl to data/results/h100/.")

# %% [markdown]
# ## Explore one case
#
# Pick a GEMM shape, a token count and a variant: the error against fp64 (and, for a router shape, the near-tie
# flip rate) is computed live. Without ipywidgets the default case runs once.

# %%
SHAPES = {s.name: s for s in R.bench_shapes()}
RUNNABLE = [v for v in R.VARIANTS if R.variant_availability(v, DEVICE)[0]]


def explore(shape_name: str = "router-flash", tokens: int = 64, variant: str = "bf16_linear") -> None:
    s = SHAPES[shape_name]
    x, w = R.make_inputs(tokens, s.n, s.k, device=DEVICE, seed=tokens)
    out = R.VARIANTS[variant](x, w)
    stats = R.error_stats(out, R.oracle(x, w), R.fp32_accumulation_bound(x, w))
    line = f"{shape_name} T={tokens} {variant}: max_rel {stats['max_rel']:.3g}, err/fp32-bound {stats['err_over_fp32_bound']:.3g}"
    if s.name.startswith("router"):
        case = R.near_tie_case(tokens, s.n, s.k, device=DEVICE, seed=1)
        ids_ref = R.selection_scores(R.oracle(case.x, case.weight), case.bias).topk(6, dim=-1).indices
        ids = R.select_experts(R.VARIANTS[variant](case.x, case.weight), case.bias)
        line += f", near-tie top-6 flip rate {R.flip_rate(ids_ref, ids):.3f}"
    print(line)


try:
    import ipywidgets as widgets

    from dsv4lab.lab.widgets import interact  # headless runs call explore() once, no Output widget

    interact(explore, shape_name=widgets.Dropdown(options=list(SHAPES), value="router-flash"),
                     tokens=widgets.SelectionSlider(options=[1, 4, 16, 64, 256, 1024], value=64),
                     variant=widgets.Dropdown(options=RUNNABLE, value="bf16_linear"))
except ImportError:
    explore()

# %% [markdown]
# ## Interpretation
#
# * The numerics part is device-independent and measured above: the fp32-output paths stay within the fp32
#   accumulation bound with ~1e-7 normwise error, the bf16-output shortcut sits at ~2^-9, and on near-tie inputs
#   only the bf16 shortcut changes which experts a token goes to. That is the semantic the PR had to keep, and
#   `torch.mm(out_dtype=fp32)` keeps it by construction (fp32 output, no bf16 rounding step).
# * Whether `before` and `after` are **bitwise** equal depends on the kernels cuBLAS and cuBLASLt pick; the H100
#   records (`bitwise_equal_before_after`, `kernels_per_call` names) say which, per shape and T.
# * Time: read the chart and the `target_met` table from the H100 run; where `after` is more than 5 % slower, the
#   two kernel names show whether a different tile or split-K was chosen. The aux-stream records
#   (`stream_overlap`: sum of kernel times / union span) show whether both paths still overlap the compressor
#   GEMMs on side streams the way vLLM's parallel execution needs.
