# %% [markdown]
# # 11 · vLLM #43746 (part 1): fused Triton MTP-input RMSNorm and shared-head RMSNorm
#
# The DSv4 multi-token-prediction (MTP) draft layer starts with three small steps per token
# (dsv4-layers.md section 5):
#
# ```
# e = RMSNorm(where(pos == 0, 0, embed); enorm)     # [T, D]      the row at position 0 is zeroed first
# h = RMSNorm(prev.view(T, 4, D); hnorm)            # [T, 4, D]   one norm per residual stream
# ... MTP block ...;   logits = head(RMSNorm(hc_head(R); shared_head.norm))
# ```
#
# Before PR #43746 the MTP model ran under `torch.compile`, so Inductor fused these small ops. The PR removed
# the compile dependency (breakable CUDA graphs instead; part 2 of the experiment) and, so that the draft path
# would not fall back to a string of tiny eager kernels, added **"manual fusions for MTP"**: one Triton kernel
# with grid `(T, hc_mult + 1)` for the mask + enorm + 4 hnorms, and a grid-`(T,)` kernel for the shared-head norm.
#
# **The PR's claim.** Performance "remains the same or gets slightly faster" (no numbers given); the kernel's
# docstring says it replaces "~6 small kernels" on the breakable-cudagraph path; GSM8K accuracy with MTP (k=3)
# 0.9522 (refactors.md 3). The kernels round once (`bf16(x * rrms * w)`) where vLLM's RMSNorm rounded twice, so
# outputs may differ by one bf16 ulp on some elements.

# %%
import pandas as pd
import torch
from IPython.display import HTML, display

from dsv4lab.lab import roofline
from dsv4lab.refactors import pr43746_mtp_norm as X

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device: {DEVICE} | torch {torch.__version__}")

# %% [markdown]
# ## Before and after, side by side
#
# Quoted from the package source, so the code shown is the code measured. Left: the eager op sequence (`X.before_eager`;
# `X.before_compiled` is the same function under `torch.compile(fullgraph=True)` with the token dimension
# dynamic, as vLLM compiled it). Right: the fused kernel (`dsv4lab.kernels.triton.mtp_norm`).

# %%
display(HTML(X.code_side_by_side()))

# %% [markdown]
# The variants all take the same inputs; `after_two_rounding` runs the fused kernel with vLLM's eager rounding,
# which separates the effect of fusing from the effect of rounding once. `before_kernel_norms` is the eager mask
# plus one two-rounding RMSNorm launch per norm: the launch structure of vLLM's CUDA RMSNorm op, with our Triton
# row kernel standing in for vLLM's C++ kernel.

# %%
pd.DataFrame([{"op": op, "variant": v, "what": (f.__doc__ or "").strip().splitlines()[0]}
              for op in X.OPS for v, f in X.variants(op).items()])

# %% [markdown]
# ## Prediction (stated before measuring)
#
# * **Launches per call** (MTP input block), counted from the code:

# %%
pd.Series(X.predicted_launches("mtp_input_rmsnorm"), name="predicted launches").to_frame()

# %% [markdown]
# * **Bytes.** The fused kernel reads `embed` and the 4 streams once and writes them once: `4 T (n+1) D` bytes
#   in bf16 (dsv4-layers.md section 7, row 22), plus the weights. Each eager bf16 RMSNorm goes through fp32
#   temporaries and moves ~36 bytes per element, ~9x the fused traffic. At decode sizes everything is a few
#   hundred KB and the time is launch latency: `after` should win by about the launch count (18 -> 1) in eager
#   mode, and by less inside a CUDA graph (no host launch cost there, only per-kernel GPU latency). At prefill
#   sizes all paths are bandwidth-bound: `after` and `before_compiled` should approach the copy bandwidth,
#   `before_eager` should be ~9x slower.
# * **Numerics.** `after` rounds once, so it is closer to the fp64 oracle than `before_eager` (err_ratio < 1) and
#   differs from it by at most 1 ulp, on a fraction of elements. `after_two_rounding` should be **bitwise equal**
#   to `before_eager` on a GPU, except where the fp32 reductions (a different summation order) land on opposite
#   sides of a rounding tie. Rows at position 0 are exactly zero in every variant.
#
# Predicted times on an H100 at the copy bandwidth (stored peaks if present, else the ~2.97 TB/s measured in
# stack.md):

# %%
peaks = roofline.load_peaks("h100")
copy_bw = peaks.copy_bw if peaks else 2.97e12
pred = pd.DataFrame([{"D": D, "T": T, "variant": v, "MB moved": b / 1e6, "roofline us": b / copy_bw * 1e6}
                     for D in (4096, 7168) for T in (1, 64, 4096, 16384)
                     for v, b in X.predicted_bytes("mtp_input_rmsnorm", T, D).items()])
pred.pivot_table(index=["D", "T"], columns="variant", values="roofline us").round(2)

# %% [markdown]
# ## Live measurement on this device
#
# `X.run` (the `dsv4lab compare` entry). On a CPU it uses the toy size (D = 256) and T in (1, 4): the Triton
# kernels run in the interpreter, so the times below are **CPU timings of an interpreter**, only a check that
# everything runs; interpreter casts to bf16 truncate instead of rounding, which inflates the Triton variants'
# errors by up to one ulp. On a GPU it runs the Flash size at T in (1, 64, 4096), compile included.

# %%
live = pd.DataFrame(X.run(device=DEVICE, quick=True, preset="toy" if DEVICE == "cpu" else "flash"))
live_mode = "cpu" if DEVICE == "cpu" else "graph"
print(f"{len(live)} records")
X.numerics_table(live)

# %%
X.time_table(live, mode=live_mode)

# %% [markdown]
# ## Stored H100 results
#
# Written by `python bench/pr43746_mtp_norm.py --out $OUT` on the H100 and kept in `data/results/h100/`.

# %%
stored = X.load_results(slug="h100")
if stored.empty:
    display(HTML("<b>No stored H100 results yet</b> (data/results/h100/pr43746_mtp_norm.jsonl is missing): the "
                 "charts below show the live run on this device instead. Run "
                 "<code>python bench/pr43746_mtp_norm.py --out $OUT</code> on the H100 and copy the .jsonl there."))
    df, D_default, T_default, mode = live, int(live.D.dropna().iloc[0]), 4, live_mode
else:
    print(f"stored H100 results: {len(stored)} records, {stored['timestamp'].min()} .. {stored['timestamp'].max()}")
    df, D_default, T_default, mode = stored, 4096, 4096, "graph"

# %% [markdown]
# ### Time vs T, with the roofline (bytes / measured copy bandwidth)

# %%
X.time_figure(df, D_default, mode=mode)

# %% [markdown]
# ### Launches per call

# %%
X.launches_figure(df)

# %% [markdown]
# ### ulp distance to `before_eager` (and to the correctly rounded fp64 result)

# %%
X.ulp_figure(df, D_default, T_default)

# %%
X.ulp_figure(df, D_default, T_default, vs="oracle")

# %% [markdown]
# ### Targets (recorded, not asserted)
#
# `after` >= 85 % of the measured copy bandwidth at T >= 4096; >= 3x faster than `before_eager` in eager mode at
# T <= 64; never slower than `before_compiled`. Compile time of `before_compiled` next to it.

# %%
if "target_met" in set(df.metric):
    tgt = df[df.metric == "target_met"]
    display(tgt.pivot_table(index=["op", "D", "tokens"], columns=["target", "mode"], values="observed",
                            aggfunc="last").round(2))
    print({t: f"{int(g.value.astype(bool).sum())}/{len(g)} met" for t, g in tgt.groupby("target")})
else:
    print("no target records here (they need GPU timings: graph and eager modes)")
comp = df[df.metric.isin(["compile_time", "recompile_time"])]
comp[["op", "D", "tokens", "metric", "value"]] if len(comp) else print("no compile-time records here")

# %% [markdown]
# ## Explore
#
# Pick D, T and the variants to compare. Without ipywidgets (headless runs) the default view is drawn once.

# %%
Ds = sorted(int(d) for d in df.D.dropna().unique())
Ts = sorted(int(t) for t in df.tokens.dropna().unique())


def explore(D: int = D_default, T: int = T_default, variants: tuple = ("before_eager", "before_compiled", "after")):
    display(X.time_figure(df, D, mode=mode, names=variants))
    display(X.ulp_figure(df, D, T))


try:
    import ipywidgets as widgets

    from dsv4lab.lab.widgets import interact  # headless runs call explore() once, no Output widget

    interact(explore, D=widgets.Dropdown(options=Ds, value=D_default),
                     T=widgets.Dropdown(options=Ts, value=T_default),
                     variants=widgets.SelectMultiple(options=list(X.VARIANTS),
                                                     value=("before_eager", "before_compiled", "after")))
except ImportError:
    explore()

# %% [markdown]
# ## Interpretation
#
# * **Numerics** (device-independent in kind; measured live above): every variant zeroes the position-0 rows
#   exactly; `after` stays within 1 ulp of the eager path and closer to the fp64 oracle; on a GPU,
#   `after_two_rounding` vs `before_eager` shows how much of the ulp difference is rounding (bitwise equal where
#   the reductions agree) rather than fusion. Under the CPU interpreter the Triton casts truncate, so their
#   err_ratio is inflated there (about 1.4x for one rounding): read the H100 records for the real ratio.
# * **Launches**: the stored `kernels_per_call` records show how many kernels each path really launches
#   (the prediction was 18 eager, 2-3 compiled, 1 fused).
# * **Time**: in eager mode the fused kernel's advantage at small T is the launch count; inside a CUDA graph it
#   shrinks to per-kernel GPU latency. At large T the chart's dashed roofline shows how close each path gets
#   to the copy bandwidth; `before_compiled` is the fair baseline there, since Inductor fuses the same way.
#   The `target_met` table says, per (D, T), whether the PR's "same or slightly faster" holds against it.
# * **Eager mode is host time**: at T <= 64 every variant is launch-bound on the H100, so the stored records time it
#   two ways: `eager` (an event pair around each call) and `eager-loop` (100 back-to-back calls / 100, the cost an
#   eager model pays per call). The fused kernels are launched through a cached Triton binary
#   (`dsv4lab/kernels/triton/_launch.py`): Triton's own launch path costs tens of microseconds of Python per call,
#   as much as the kernel. Measured: 5-13x (input norm) and 3.6-6.3x (shared-head norm) faster than eager in
#   `eager-loop`. In graph replay at small T both the fused kernel and Inductor's sit at the ~5-6 us launch floor,
#   and there the shared-head kernel is 2-7 % slower than the compiled one at 9 of 26 (D, T).
