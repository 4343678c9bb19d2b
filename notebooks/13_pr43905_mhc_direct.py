# %% [markdown]
# # 13 · vLLM #43905: mHC TileLang kernels called directly instead of through CustomOps
#
# DSv4's residual stream is four streams (mHC, dsv4-layers.md section 2). Every decoder layer mixes them twice:
# `mhc_pre` (24 mixes from a prenorm GEMM, a 20-step Sinkhorn, collapse to one stream, fused RMSNorm) before a
# sublayer and `mhc_post` after it; vLLM fuses each post with the next pre (`mhc_fused_post_pre`) and ends with
# `hc_head`. Before #43905 the nvidia decoder layer owned `MHCPreOp` / `MHCPostOp` / `MHCFusedPostPreOp` and the model
# an `HCHeadOp`: `nn.Module`s (vLLM `CustomOp`) whose `forward_cuda` called a registered op,
# `torch.ops.vllm.mhc_pre_tilelang(...)` etc., and for hc_head the **mutating**
# `hc_head_fused_kernel_tilelang(..., out, ...)` with `out` allocated by the module.
#
# **The PR's claim** (refactors.md 5): move the TileLang kernels to `model_executor/kernels/mhc/` and "remove custom ops
# in deepseek_v4/nvidia and call the TileLang kernels directly"; hc_head now allocates and returns its output. The
# AMD path keeps the CustomOps. No numbers were attached.
#
# This notebook has two halves: the refactor (both paths run the same implementation: the TileLang kernels on an
# SM90 GPU, the fp32 references elsewhere) and the kernels themselves (dsv4lab's TileLang mHC kernels, measured
# against the roofline, tile_kernels 2.1.0, torch eager and torch.compile on the H100).

# %%
import inspect
import shutil
import time

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from IPython.display import HTML, display

from dsv4lab.config import get_config
from dsv4lab.kernels import registry
from dsv4lab.lab import results, roofline, timing
from dsv4lab.refactors import pr43905_mhc_direct as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = list(R.OPS)
avail = {op: registry.availability(op, "tilelang") for op in OPS}
print(f"device: {DEVICE} | torch {torch.__version__}")
for op, (ok, why) in avail.items():
    print(f"  {op:<19} tilelang backend: {'available' if ok else 'unavailable: ' + why}")

# %% [markdown]
# ## Before and after, side by side
#
# Left: the registered schemas, a CustomOp module (the platform picks `forward_cuda` once, at construction) and the
# mutating hc_head op. Right: what the layer calls after #43905. Both sides end in the same launcher (`R.impl`).

# %%
def _pre(title: str, code: str) -> str:
    esc = code.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<div style='flex:1;min-width:0'><b>{title}</b><pre style='font-size:11px'>{esc}</pre></div>"


def side_by_side(left, right) -> None:
    col = lambda items: "".join(_pre(t, o if isinstance(o, str) else inspect.getsource(o)) for t, o in items)  # noqa: E731
    display(HTML(f"<div style='display:flex;gap:12px'><div style='flex:1'>{col(left)}</div>"
                 f"<div style='flex:1'>{col(right)}</div></div>"))


schemas = "\n".join(f"{R.NAMESPACE}::{name}{schema}" for name, (schema, _, _) in R._SCHEMAS.items())
side_by_side([("before: schemas (torch.library, fake impls registered)", schemas),
              ("before: the CustomOp shape", R.CustomOpLike), ("before: MHCPreOp", R.MHCPreOp),
              ("before: HCHeadOp (allocates out, calls the mutating op)", R.HCHeadOp),
              ("before: the op's kernel", R._op_mhc_pre)],
             [("after: the same calls in a forward (variant='after' branch)", R.mhc_forward),
              ("both: which launcher runs", R.impl)])

# %% [markdown]
# ## The kernels (dsv4lab/kernels/tilelang/)
#
# | op | kernels | notes |
# |---|---|---|
# | `mhc_pre` | split-K prenorm GEMM + epilogue | GEMM `[T, 4D] x [4D, 24]` on the tensor cores in fp32-equivalent precision: x is bf16 (exact), fn's fp32 chunk is split in shared memory into `hi + mid + lo` bf16 terms and one `m64n80k16` wgmma accumulates all three (72 columns + 8 zero); TMA loads, a producer warpgroup. Epilogue per token: reduce splits, sigmoid mixes, Sinkhorn (one thread per token), collapse (re-reads R, in reverse token order so the first blocks hit L2), bf16, RMSNorm. |
# | `mhc_post` | one streaming kernel | `R'[k] = post[k] f + sum_j comb[j, k] R[j]`; 16-byte loads, TMA store; 18TD bytes. |
# | `mhc_fused_post_pre` | post in the GEMM's prologue + the pre epilogue | a stage covers 16 columns of all 4 streams; the consumer forms the bf16 new residual (to HBM and to the wgmma A tile). |
# | `hc_head` | the same GEMM with 4 mixes (`m64n16k16`) + a collapse epilogue | launcher returns `out`; `hc_head_into` is the mutating form. |
#
# Why two kernels for pre: the collapse needs all 24 mixes (a full-K reduction) before it can read R again, and a
# block holding a few tokens on chip would re-stream all of fn (1.5 MB Flash, 2.75 MB Pro) from L2 per few tokens.
# So R is read twice: ~18TD bytes instead of the roofline's 10TD at large T, which caps `mhc_pre` near 55 % of the
# copy bandwidth by construction (mhc_fused_post_pre: ~28TD vs 20TD, ~70 %). Why not FMAs: 25 FMAs per loaded
# element exceed what an H100 SM issues at HBM speed. Why not TF32 (DeepGEMM's `tf32_hc_prenorm_gemm`): ~1e-3
# relative error vs ~1e-6 for the 3-term split.
#
# The CUDA TileLang generates for `mhc_post` (compiled for sm_90a on this machine when tilelang and nvcc are here;
# compiling needs no GPU, running does):

# %%
try:
    import tilelang  # noqa: F401
    have_compiler = shutil.which("nvcc") is not None
except Exception:
    have_compiler = False
if have_compiler:
    from dsv4lab.kernels.tilelang import mhc_post as tl_post

    t0 = time.perf_counter()
    src = tl_post.post_kernel(get_config("flash").hidden_size, "sm_90a").get_kernel_source()
    body = src[src.index('extern "C" __global__ void __launch_bounds__'):]
    print(f"// mhc_post, D = 4096, sm_90a ({time.perf_counter() - t0:.1f} s incl. compile or cache load)\n"
          + "\n".join(body.splitlines()[:45]))
else:
    print("tilelang and/or nvcc not installed here: no generated source to show "
          "(pip install tilelang==0.1.15; nvcc on PATH).")

# %% [markdown]
# ## Prediction (before measuring)
#
# **Refactor.**
# * Numerics: bitwise identical (same launcher, same arguments; the dispatcher only boxes them).
# * Host time per call: before = `nn.Module.__call__` + `forward` -> `forward_cuda` + `OpOverloadPacket.__call__` +
#   boxing of 4-12 schema arguments (`Tensor?`, floats, an int) + the kernel's Python frame; after = one Python
#   call. A few microseconds per call.
# * Per forward: `2 L + 2` mHC calls (layer 0: pre + fused; every later layer: two fused; then post and hc_head):
#   **Flash 88, Pro 124** -> a few hundred microseconds per eager forward, nothing under CUDA-graph replay.
# * Allocations: unchanged (hc_head allocates one `out` on either side; the kernels' split-K partials are the same).
#
# **Kernels** (minimum bytes from lab.roofline; the time at the measured copy bandwidth is the floor):

# %%
peaks = roofline.load_peaks("h100")
bw = peaks.copy_bw if peaks else None
rows = []
for preset in ("flash", "pro"):
    d = get_config(preset).hidden_size
    for op in OPS:
        for t in (1, 1024, 4096, 16384):
            c = roofline.cost(op, T=t, D=d)
            rows.append(dict(preset=preset, op=op, T=t, MB=c.bytes / 1e6, flop_per_byte=c.intensity,
                             floor_us=(c.bytes / bw * 1e6) if bw else None))
pred = pd.DataFrame(rows)
print(f"copy bandwidth: {peaks.summary() if peaks else 'no stored H100 peaks (data/results/h100/peaks.jsonl)'}")
pred.pivot_table(index=["op", "T"], columns="preset", values=["MB", "floor_us"]).round(2)

# %% [markdown]
# Targets (measured on the H100, not asserted): `mhc_post`, `hc_head` >= 80 % of the copy bandwidth at T >= 4096;
# `mhc_pre`, `mhc_fused_post_pre` >= 60 % (the design argument above says pre will land below that at large T);
# each >= 0.9x tile_kernels at T >= 1024; T = 1 under 15 us per op in graph replay; mixes within 1e-5 of the fp32
# reference, bf16 outputs within 2x the eager error against an fp64 oracle.

# %% [markdown]
# ## Measurement: the refactor, live on this device
#
# `R.run` (quick): bitwise before == after per op and for a 2-layer mHC forward, allocations per call, host time per
# call of the work-free probes (the CustomOp module + `torch.ops` with the kernel removed vs a plain call: exactly
# what #43905 removed), per layer and per forward. On a CPU both paths run the reference and the TileLang backend is
# reported unavailable. Stored H100 results (bench/pr43905_mhc_direct.py) are loaded when present.

# %%
t0 = time.perf_counter()
live = pd.DataFrame(R.run(device=DEVICE, quick=True, preset="flash"))
print(f"R.run: {len(live)} records in {time.perf_counter() - t0:.1f} s")
stored = results.load(slug="h100", experiment=R.EXPERIMENT, strict=False)
stored_note = (f"stored H100 results ({len(stored)} records, {stored['timestamp'].min()} .. {stored['timestamp'].max()})"
               if len(stored) else "no stored H100 results yet (run bench/pr43905_mhc_direct.py on the H100)")
print(stored_note)
live[live.metric.isin(["bitwise_equal", "unavailable"])][["op", "backend", "metric", "value", "reason"]]

# %%
alloc = live[live.metric == "allocations_per_call"].pivot_table(index="op", columns="variant", values="value")
print(f"allocations per call, live on {DEVICE} ({live[live.metric == 'allocations_per_call'].source.iloc[0]})")
alloc

# %%
def overhead_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    h = df[df.metric == "host_overhead"][["op", "backend", "variant", "value"]].copy()
    h["what"] = h["backend"].map(lambda b: "probe (wrapper only)" if b == "probe" else f"full op ({b})")
    return h.assign(source=source)


frames = [overhead_frame(live, f"live {DEVICE}")]
if len(stored):
    frames.append(overhead_frame(stored[stored.op.isin(OPS + ["mhc_forward"])], "stored H100"))
over = pd.concat(frames, ignore_index=True)
fig = px.bar(over, x="op", y="value", color="variant", barmode="group", facet_col="what", facet_row="source",
             log_y=True, title=f"host time per call (us), Flash shapes, T=1 -- live on {DEVICE}; {stored_note}")
fig.update_yaxes(title="us / call")
fig

# %%
fwd = [live[live.metric.isin(["host_overhead_per_forward", "host_overhead_per_layer"])].assign(source=f"live {DEVICE}")]
if len(stored):
    fwd.append(stored[stored.metric.isin(["host_overhead_per_forward", "host_overhead_per_layer"])]
               .assign(source="stored H100"))
fwd = pd.concat(fwd, ignore_index=True)
fwd["case"] = fwd["preset"] + " " + fwd["op"] + " (" + fwd["calls"].astype(int).astype(str) + " calls)"
fig = px.bar(fwd, x="case", y="value", color="source", barmode="group",
             title="host time removed (us) = calls x (before - after), from the probes")
fig.update_yaxes(title="us")
fig

# %% [markdown]
# ## Measurement: the kernels (stored H100 results)
#
# Time per call vs T (CUDA events, L2 flushed before every call) for TileLang, tile_kernels, torch eager and
# torch.compile of the reference, against the roofline floor (minimum bytes at the measured copy bandwidth).
# tile_kernels' pre has no RMSNorm weight (its line is compared with ours without one where both exist).

# %%
def kernel_chart(df: pd.DataFrame, preset: str, op: str):
    t = df[(df.metric == "time") & (df.preset == preset) & (df.op == op) & (df.variant == "eager")].copy()
    if not len(t):
        return None
    t["label"] = t["backend"] + t.get("norm_weight", pd.Series(True, index=t.index)).map(
        lambda w: "" if w is True or pd.isna(w) else " (no norm weight)")
    fig = px.line(t.sort_values("tokens"), x="tokens", y="value", color="label", log_x=True, log_y=True,
                  markers=True, title=f"{op}, {preset}: p50 us per call (H100, stored) -- {stored_note}")
    if peaks is not None:
        d = get_config(preset).hidden_size
        ts = sorted(t.tokens.unique())
        fig.add_trace(go.Scatter(x=ts, y=[roofline.cost(op, T=int(x), D=d).bytes / peaks.copy_bw * 1e6 for x in ts],
                                 name="roofline floor (min bytes / copy BW)", line=dict(dash="dot", color="black")))
    fig.update_yaxes(title="us")
    return fig


if len(stored):
    for preset in ("flash", "pro"):
        for op in OPS:
            f = kernel_chart(stored, preset, op)
            if f is not None:
                display(f)
    pct = stored[(stored.metric == "time") & (stored.backend == "tilelang") & (stored.variant == "eager")]
    display(pct.pivot_table(index=["op", "tokens"], columns="preset", values="pct_of_peak").round(1)
            .rename_axis(columns="% of copy BW, TileLang"))
    ratio = stored[stored.metric == "speedup_vs_tile_kernels"]
    print("speed relative to tile_kernels (> 1 = faster)")
    display(ratio.pivot_table(index=["op", "tokens"], columns=["preset", "variant"], values="value").round(2))
    num = stored[stored.metric.isin(["err_ratio", "mix_rel_err_vs_fp32_ref"]) & (stored.backend == "tilelang")]
    display(num.pivot_table(index=["op", "variant", "metric"], columns=["preset", "tokens"], values="value"))
else:
    print("No stored H100 kernel results yet: run `python bench/pr43905_mhc_direct.py --out $OUT` on the H100 and "
          "copy $OUT/pr43905_mhc_direct.jsonl to data/results/h100/. Until then only the roofline floors above exist.")

# %% [markdown]
# ## Explore one case
#
# Pick a preset, T, an op and a backend. A backend that runs here is timed live (`lab.timing.bench`; on a CPU that
# is `cpu-clock`, not GPU time) and checked against the fp32 reference; one that does not says why and the stored
# H100 record for the same case is shown instead. Without ipywidgets (headless) the default case runs once.

# %%
def _case(preset: str, tokens: int):
    return R.make_inputs(preset, tokens, DEVICE, seed=tokens)


def _call(fn, op: str, inp):
    a, h = inp.attn, inp.head
    kw = dict(rms_eps=inp.rms_eps, hc_eps=inp.hc_eps, post_mult=inp.post_mult, sinkhorn_iters=inp.sinkhorn_iters)
    if op == "mhc_pre":
        return fn(inp.residual, a.fn, a.scale, a.base, a.norm_weight, **kw)
    if op == "mhc_post":
        return fn(inp.f, inp.residual, inp.post, inp.comb)
    if op == "mhc_fused_post_pre":
        return fn(inp.f, inp.residual, inp.post, inp.comb, a.fn, a.scale, a.base, a.norm_weight, **kw)
    return fn(inp.residual, h.fn, h.scale, h.base, rms_eps=inp.rms_eps, hc_eps=inp.hc_eps)


def explore(preset: str = "flash", tokens: int = 4, op: str = "mhc_post", backend: str = "reference") -> None:
    ok, why = registry.availability(op, backend)
    if not ok:
        print(f"{op}/{backend} cannot run here: {why}")
        if len(stored):
            s = stored[(stored.op == op) & (stored.backend == backend) & (stored.preset == preset)
                       & (stored.tokens == tokens) & (stored.metric == "time")]
            print(s[["variant", "value", "p20", "p80", "pct_of_peak", "timestamp"]].to_string() if len(s)
                  else f"no stored H100 time for {op}/{backend} {preset} T={tokens}")
        return
    inp = _case(preset, tokens)
    fn, ref_fn = registry.get(op, backend), registry.get(op, "reference")
    got, want = _call(fn, op, inp), _call(ref_fn, op, inp)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    worst = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
    tm = timing.bench(lambda: _call(fn, op, inp), warmup=2, rep=10 if DEVICE == "cpu" else 30)
    c = roofline.cost(op, T=tokens, D=get_config(preset).hidden_size)
    print(f"{op}/{backend}, {preset}, T={tokens}, live on {DEVICE}: p50 {tm.p50:.1f} us ({tm.mode}); "
          f"max |out - reference| = {worst:.3g}; min bytes {c.bytes / 1e6:.2f} MB")


try:
    import ipywidgets as widgets

    from dsv4lab.lab.widgets import interact  # headless runs call explore() once, no Output widget

    interact(explore, preset=widgets.Dropdown(options=["toy", "flash", "pro"], value="flash"),
                     tokens=widgets.SelectionSlider(options=[1, 2, 4, 16, 64, 256, 1024], value=4),
                     op=widgets.Dropdown(options=OPS, value="mhc_post"),
                     backend=widgets.Dropdown(options=["reference", "tilelang"], value="reference"))
except ImportError:
    explore()

# %% [markdown]
# ## Kernel designs (issue #6): two_pass, one_pass, l2_chunked, and the latency variants
#
# `mhc_pre`, `mhc_fused_post_pre` and `hc_head` have three launcher designs (`_mhc_common.TUNING["design"]`):
# **two_pass** (split-K prenorm GEMM, then an epilogue that re-reads R: ~18TD bytes at large T), **one_pass**
# (a cluster of 8 CTAs keeps a token tile's R in shared memory, exchanges partial mixes through distributed shared
# memory: 10TD bytes, one launch, but fn -- 48 tokens' worth of bytes -- is re-read from L2 per 16-32-token tile)
# and **l2_chunked** (two_pass per 16 MB chunk of R, so the re-read hits L2; more launches). For mhc_pre and the
# fused op's pre half, the latency variants of `_mhc_overlap` add the **v3 epilogue** (one CTA per token, Sinkhorn
# on warp 0 overlapped with the collapse; `*_v3`), the opt-in **small_t** design (FMA split-K projection + v3, T <= 32;
# above it falls back to two_pass + v3) and a **128-token GEMM tile** (`*_bt128`). The H100 bench times them in one
# run (variant `design:<name>`, CUDA-graph replay for T <= 256); the table below shows the stored comparison, with
# tile_kernels timed alike, when the records exist. Labels keep their meaning across runs: `design:two_pass` is the
# launcher default up to the run at commit 42be99d (v1/v2 epilogue, 64-token tile); `design:two_pass_v3_auto` is
# the default since (two_pass, v3 epilogue, 128-token tile from T = 4096 on, `_mhc_common.gemm_block_tokens`).

# %%
des = stored[stored["variant"].astype(str).str.startswith("design:") & (stored["metric"] == "time")] \
    if len(stored) and "variant" in stored else stored.iloc[0:0]
if len(des):
    table = des.pivot_table(index=["preset", "op", "tokens"], columns="variant", values="value", aggfunc="last")
    dd = stored["default_design"].dropna() if "default_design" in stored else []
    print(f"p50 us per design (launcher default in the latest run: {dd.iloc[-1] if len(dd) else 'two_pass'})")
    display(table.round(1))
else:
    print("no stored design-comparison records yet: run bench/pr43905_mhc_direct.py on the H100")

# %% [markdown]
# ## Interpretation
#
# * **Same results.** Before and after are bitwise equal per op and over a whole mHC forward (live above on the
#   reference; the H100 run repeats it with the TileLang kernels), as a refactor that only moves calls must be.
# * **What the PR removed** is host work only: the probes put it at a few microseconds per call, times 88 (Flash) /
#   124 (Pro) calls per forward. That matters for eager forwards (enforce-eager, prefill chunks beyond the captured
#   sizes); under CUDA-graph replay the host code does not run and the GPU time is unchanged (the H100 graph records).
# * **Allocations** do not change in count; what changes is the contract: a functional hc_head with a fake is easier
#   on torch.compile and graph memory planning than a mutating op -- although, after the PR, the nvidia path calls the
#   TileLang launchers from Python, which Dynamo cannot trace (refactors.md 5.c).
# * **The kernels**: read the H100 charts against the floors. `mhc_post` and `hc_head`'s second pass are pure streams;
#   `mhc_pre` pays the second read of R (L2 at small T, HBM at large T), so its % of the minimum-bytes roofline is
#   bounded near 55 % by design, and the comparison that matters there is tile_kernels, which reads R twice too.
# * **The designs** (issue #6): one_pass removes the second read of R and one launch, which is what T = 1 latency
#   and mid-size T need; at large T its fn traffic from L2 (48/BT x the residual bytes) competes with the saved HBM
#   read, and l2_chunked trades launches for L2 hits. In the 42be99d H100 run (table above) neither beat two_pass
#   for mhc_pre / the fused op; the v3 epilogue did at every T, and the 128-token GEMM tile from T = 4096 on (at
#   T = 1024 it tied or lost), so those became the launcher default; small_t lost to two_pass + v3 at T <= 16 and
#   stays opt-in; hc_head keeps two_pass. The numerics and eager/graph bitwise records of the new default come from
#   the run after that switch (step 1a of the bench).
