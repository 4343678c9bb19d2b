# %% [markdown]
# # 11b · #43746 part 2: breakable CUDA graphs vs torch.compile piecewise graphs vs eager
#
# **Claim (vLLM #43746, enabled by #42304).** DSv4 can drop `torch.compile`: run the *uncompiled* model inside a
# breakable CUDA-graph capture whose segments are cut at the attention call, and get the same piecewise graph
# structure as Dynamo's FX split (L+1 graphs, L eager attention calls per forward) without Dynamo, Inductor or
# the compile wait. The PR says performance "remains the same or gets slightly faster" (no numbers given);
# field reports after the default flip (refactors.md section 8) are mixed: #49370 saw ~1.57x more throughput
# with the breakable path turned off on a B300, #41834 saw decode slow down with output length on GB10, while
# #54677 traced a TTFT "regression" to turning it off (no graph at all for prefill).
#
# **Here.** A DSv4 decoder stack at Flash width (`dsv4lab.layers.stack`: D 4096, 64 heads x 512, mHC with 4
# streams, 8 local experts top-6 + shared, default L = 8, bf16, window attention over a per-sequence KV ring)
# runs decode steps in four modes (`dsv4lab.refactors.pr43746_breakable_graphs`):
#
# | mode | what runs | graphs per forward |
# |---|---|---|
# | `eager` | the uncompiled forward, op by op | 0 |
# | `before` | each inter-attention piece `torch.compile`d (mode "default", fullgraph, T dynamic) and captured as its own CUDA graph; attention a `torch.library` custom op in between | L+1 |
# | `after` | `dsv4lab.graphs` breakable capture of the uncompiled forward | L+1 |
# | `full` | one graph, attention captured inline (metadata padded to the max width) | 1 |
#
# H100 caveats: the PR was validated on SM100 (B200/B300/GB200); here linear layers are bf16 GEMMs, not
# fp8/fp4, MoE is "dense over local experts" (capturable: no host sync, no data-dependent shapes), and
# attention is window-only (its compressor/indexer are outside this experiment).

# %%
import pandas as pd

from dsv4lab.refactors import pr43746_breakable_graphs as exp

# %% [markdown]
# ## Mechanism
#
# A function decorated with `@eager_break` ends the current graph segment when it is called inside a
# breaking capture, runs eagerly, is kept (with its arguments) as a replay step, and a new segment begins.
# Outside a capture, or inside a full capture, it is a plain call.
#
# quote: dsv4lab.graphs:BreakableCapture.add_eager
#
# ```python
#     def add_eager(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
#         """End the segment, run ``fn(*args, **kwargs)`` now (capture suspended), keep it as a replay step, and
#         begin the next segment. Returns what ``fn`` returned."""
#         name = getattr(fn, "__qualname__", repr(fn))
#         self._end()
#         self.in_eager = True
#         try:
#             result = fn(*args, **kwargs)
#         finally:
#             self.in_eager = False
#         _check_eager_result(name, result, args, kwargs)
#         self.graph.steps.append(GraphStep("eager", functools.partial(fn, *args, **kwargs), name))
#         self._begin()
#         return result
# ```
#
# In the stack, `DecoderStack.attend` is the break. It reads `step.launch_width` (host state: the longest
# candidate list this step) when it runs, so every replay sees that step's width; the index lists and
# positions are static device buffers refilled in place. Below, a 3-layer toy stack is captured on the
# `FakeGraphBackend` (it records the aten ops of each segment and replays them on the same tensors, so it
# runs on a CPU) and replayed on new steps: one row per capture, graph segments in blue, eager attention
# breaks in orange, along the host timeline of one replay.

# %%
trace = exp.mechanism_trace(num_layers=3, tokens=4, replays=2)
exp.timeline_figure(trace)

# %%
steps = pd.DataFrame(trace["after"]["steps"])
print("backend calls during the breakable capture:", [e for e in trace["after"]["log"] if e[0] in ("begin", "end")])
print("replays equal to eager (bitwise):", {k: v["matches"] for k, v in trace.items()},
      "| launch widths per replay:", trace["after"]["launch_widths"])
steps

# %% [markdown]
# The full graph above has one segment: the attention was captured inline, so its launch width is the one
# read at capture. That is why `full` runs with `pad=True` (always the maximum width W): with a frozen narrower
# width, later steps would silently drop candidates (`tests/test_pr43746_breakable_graphs.py::
# test_full_graph_without_padding_replays_a_stale_width`).
#
# ## Prediction (written before the H100 run)
#
# - **Structure:** `after` and `before` both give L+1 = 9 graphs and 8 breaks at L = 8; `full` 1 graph.
# - **Kernels per forward:** eager = after = full (same kernels; full pads the attention); `before` fewer,
#   because Inductor fuses the glue (norms, RoPE, casts, the MoE activation) between the cuBLAS GEMMs and the
#   mHC kernels. How many fewer depends on the mHC backend: with TileLang mHC the glue is a small share.
# - **Host time per forward:** eager >> after ~ before > full. Graph modes pay L+1 graph launches plus L Python
#   attention calls (each ~10 small launches); `before` adds a dispatcher round trip per attention call.
# - **Latency at T <= 64:** the stack streams ~5 GiB of bf16 weights per forward, so the GPU time is large
#   (milliseconds) and the graph modes should be within a few percent of each other; eager is host-bound only
#   if its launch time exceeds that GPU time. The targets (after <= 1.3x full, <= 0.5x eager) are therefore
#   likely for the first and uncertain for the second at this width.
# - **Startup:** `before` = Dynamo + Inductor compile (two compiles: T = 1 and dynamic T >= 2, tens of seconds)
#   + captures; `after` = captures only, so well under 20% of `before`.
#
# ## Measurement
#
# Stored H100 results (`python bench/pr43746_breakable_graphs.py --out $OUT`, copied to
# `data/results/h100/`) when present; otherwise a live CPU run on the fake backend, whose "latency" is the CPU
# time of re-running the recorded ops (a correctness demo, not a GPU number). The chart titles say which.

# %%
df = exp.load_results()
gpu = df[df.slug != "cpu"] if not df.empty else df          # stored GPU runs only; CPU records are fake-backend demos
if gpu.empty:
    data = pd.DataFrame(exp.run("cpu", quick=True))
    source = "live CPU run (fake graph backend)"
else:
    data = gpu
    source = f"stored results: {sorted(set(gpu.slug))}"
print(source)
exp.summary_table(data)

# %%
exp.latency_figure(data, "time")

# %%
exp.latency_figure(data, "host_time")

# %%
targets = data[data.metric == "target_met"] if "metric" in data else data
targets[["target", "tokens", "ratio", "value"]] if not targets.empty else "no target records"

# %%
errors = data[data.metric.isin(["error", "unavailable"])] if "metric" in data else data
errors[["variant", "tokens", "metric"] + [c for c in ("message", "reason") if c in errors]] if not errors.empty \
    else "no errors or skipped cases"

# %% [markdown]
# ## Interpretation: when breakable graphs win or lose
#
# Read the table above with these mechanisms in mind (each row is measured, not assumed):
#
# - **Startup** is where breakable graphs win outright: no Dynamo trace, no Inductor compile, only captures.
#   vLLM caches compiled artefacts on disk, so the difference matters most for cold starts and for RL-style
#   frequent restarts (the torchtitan anecdote in refactors.md 3.c: ~30 s vs ~56 min, another model).
# - **Replay vs full graph:** a breakable replay adds, per layer, one graph launch and one eager attention call
#   (Python + its kernel launches). When the GPU work per layer is larger than that host work, the host runs
#   ahead and the breaks are hidden: `after ~ full`. When it is not (small T, few weights per layer, fast
#   GPU), the GPU waits on Python between segments and `after` approaches `eager`-like host-boundness at the
#   breaks. The `host_time` chart shows that per-forward host cost directly.
# - **vs `before`:** same graph structure, so the difference is what Inductor fused inside each segment (fewer
#   kernels, fewer HBM round trips) versus the eager kernels captured as they are. With fused mHC kernels
#   the remaining glue is small, which is the PR's bet ("same or slightly faster"); a model path that still
#   relies on compile-time fusions (RMSNorm+quant, act+quant) loses them, one plausible reason for the
#   throughput drops in #49370 and #41834.
# - **Correctness** needs fresh host state at every break and fixed addresses everywhere else: the equality
#   column checks 100 steps whose index lists, positions and launch widths all change; `eager`, `after` and
#   `full` run the same kernels (bitwise expected), `before` runs Inductor's (judged by a tolerance).
