"""vLLM #43746, part 2: breakable CUDA graphs instead of torch.compile + piecewise graphs, on a DSv4 stack.

Before #43746 the DSv4 model ran under ``@support_torch_compile``: Dynamo traced the forward, the FX graph was split
at the attention custom op, Inductor compiled each piece and each piece was captured as a PIECEWISE CUDA graph,
with attention running eagerly between pieces. After it, the uncompiled model runs inside a breakable capture
(refactors.md 1, 3.c): the same L+1 segments and L eager attention calls, without Dynamo or Inductor.

Four modes of ``dsv4lab.layers.stack.DecoderStack`` on the same decode steps (``MODES``):

- ``eager``: the uncompiled forward, op by op.
- ``before``: each inter-attention piece (``piece_first / piece_mid / piece_last``) compiled separately with
  ``torch.compile(mode="default", fullgraph=True)`` -- the "simplest honest version" of vLLM's FX split -- and
  the attention core called as a ``torch.library`` custom op (mutated ``out``/``cache`` + fake impl) between them;
  every compiled piece is captured into a CUDA graph (one pool), attention eager in between. Non-reference mHC
  kernels are wrapped as custom ops too (Dynamo cannot trace a TileLang launch; vLLM did the same before #43905).
  Weights are piece *arguments*, so one compiled ``piece_mid`` serves every layer; the token dimension is marked
  dynamic for T >= 2 (one compile for 2..256; T = 1 is specialised), like vLLM's one dynamic compile.
- ``after``: ``dsv4lab.graphs`` breakable capture of the uncompiled forward (``DecoderStack.attend`` is the break).
- ``full``: one graph with no break (the attention captured inline). Valid only for uniform decode with the
  metadata's launch width fixed, so it runs with ``pad=True`` (always W candidate columns).

Equality: every mode runs 100 steps with fresh index lists, positions and launch width per step and is compared to
``eager`` on the same steps (``full`` to eager with ``pad=True``). Bitwise where the kernels are deterministic and the
same (eager/after/full run the same kernels); Inductor re-fuses and re-rounds, so ``before`` is judged by a
tolerance (``TOL_REL_RMS``). Which verdict applied is recorded.

``run`` is the ``dsv4lab compare`` entry (CPU: ``FakeGraphBackend``); ``sweep`` is what
``bench/pr43746_breakable_graphs.py`` runs on the H100. Notebook helpers (mechanism timeline, tables, figures)
are at the bottom.
"""
# no `from __future__ import annotations`: torch.library.custom_op reads the real annotations of the op functions
import copy
import functools
import statistics
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from .. import graphs
from ..layers.stack import (DecodeStep, DecoderStack, MhcOps, attention_core, random_positions, stack_config)

EXPERIMENT = "pr43746_breakable_graphs"
TITLE = "#43746: breakable CUDA graphs vs torch.compile + piecewise CUDA graphs vs eager (DSv4 decoder stack)"
OP = "decoder_stack"
MODES = ("eager", "before", "after", "full")
BACKEND = {"eager": "torch-eager", "before": "inductor+piecewise-cudagraph", "after": "breakable-cudagraph",
           "full": "cudagraph"}
GPU_TOKENS = (1, 8, 64, 256)
STEPS = 100
NS = "dsv4lab_graphs"
# Tolerance for modes that do not run eager's kernels (Inductor re-fuses and re-rounds): ~10 bf16 re-rounding
# sites per layer x 8 layers, each ~2^-9 relative, add up to ~0.02 in quadrature; a stale buffer or stale metadata
# gives an O(1) relative error, so 0.05 separates the two.
TOL_REL_RMS = 0.05
TARGETS = {"after_vs_full": 1.3, "after_vs_eager": 0.5, "max_tokens": 64, "startup_vs_compile": 0.2}


# ---- torch.library ops (the "before" split point and opaque mHC kernels) -----------------------------
@functools.lru_cache(maxsize=None)
def attention_op() -> Callable[..., None]:
    """``torch.ops.dsv4lab_graphs.attention_core``: the attention core as a custom op mutating ``out`` and ``cache``
    (vLLM's ``torch.ops.vllm.deepseek_v4_attention``: an opaque FX node whose fake impl does nothing)."""
    Tensor = torch.Tensor

    @torch.library.custom_op(f"{NS}::attention_core", mutates_args=("out", "cache"))
    def _op(q: Tensor, kv: Tensor, out: Tensor, cache: Tensor, slots: Tensor, idx: Tensor, sink: Tensor,
            width: int, scale: float) -> None:
        attention_core(q, kv, out, cache, slots, idx, sink, width, scale)

    @_op.register_fake
    def _fake(q, kv, out, cache, slots, idx, sink, width, scale) -> None:
        return None

    return torch.ops.dsv4lab_graphs.attention_core.default


@functools.lru_cache(maxsize=None)
def opaque_mhc_ops(backend: str) -> MhcOps:
    """The four mHC ops of ``backend`` registered as custom ops (``dsv4lab_graphs::mhc_pre_<backend>`` ...) with
    fake impls, so Dynamo keeps each as one opaque node instead of tracing into a kernel launch."""
    ops = MhcOps.of(backend)
    Tensor = torch.Tensor
    f32 = torch.float32

    @torch.library.custom_op(f"{NS}::mhc_pre_{backend}", mutates_args=())
    def pre(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_weight: Optional[Tensor],
            rms_eps: float, hc_eps: float, post_mult: float, sinkhorn_iters: int) -> tuple[Tensor, Tensor, Tensor]:
        return ops.pre(residual, fn, scale, base, norm_weight, rms_eps=rms_eps, hc_eps=hc_eps,
                       post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)

    @pre.register_fake
    def _(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters):
        T, n, D = residual.shape
        return residual.new_empty(T, D), residual.new_empty(T, n, dtype=f32), residual.new_empty(T, n, n, dtype=f32)

    @torch.library.custom_op(f"{NS}::mhc_fused_post_pre_{backend}", mutates_args=())
    def fused(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor, fn: Tensor, scale: Tensor, base: Tensor,
              norm_weight: Optional[Tensor], rms_eps: float, hc_eps: float, post_mult: float, sinkhorn_iters: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return ops.fused_post_pre(f, residual, post, comb, fn, scale, base, norm_weight, rms_eps=rms_eps,
                                  hc_eps=hc_eps, post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)

    @fused.register_fake
    def _(f, residual, post, comb, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters):
        T, n, D = residual.shape
        return (torch.empty_like(residual), residual.new_empty(T, D), residual.new_empty(T, n, dtype=f32),
                residual.new_empty(T, n, n, dtype=f32))

    @torch.library.custom_op(f"{NS}::mhc_post_{backend}", mutates_args=())
    def post(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return ops.post(f, residual, post, comb)

    @post.register_fake
    def _(f, residual, post, comb):
        return torch.empty_like(residual)

    @torch.library.custom_op(f"{NS}::hc_head_{backend}", mutates_args=())
    def head(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, rms_eps: float, hc_eps: float) -> Tensor:
        return ops.head(residual, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps)

    @head.register_fake
    def _(residual, fn, scale, base, rms_eps, hc_eps):
        return residual.new_empty(residual.shape[0], residual.shape[2])

    def pre_kw(residual, fn, scale, base, norm_weight, *, rms_eps, hc_eps, post_mult, sinkhorn_iters):
        return pre(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters)

    def fused_kw(f, residual, post_, comb, fn, scale, base, norm_weight, *, rms_eps, hc_eps, post_mult,
                 sinkhorn_iters):
        return fused(f, residual, post_, comb, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult,
                     sinkhorn_iters)

    def head_kw(residual, fn, scale, base, *, rms_eps, hc_eps):
        return head(residual, fn, scale, base, rms_eps, hc_eps)

    return MhcOps(f"{backend} (custom op)", pre_kw, fused_kw, post, head_kw)


class OpAttention:
    """The "before" attention: the custom op, called per layer with the step's host width read at call time."""

    def __init__(self, stack: DecoderStack) -> None:
        self.stack = stack
        self.op = attention_op()

    def raw(self, layer: int, step: DecodeStep) -> None:
        s = self.stack
        self.op(step.q, step.kv, step.o, s.caches[layer], step.slots, step.idx, s.layers[layer]["sink"],
                step.launch_width, s.scale)

    @graphs.eager_break
    def __call__(self, layer: int, step: DecodeStep) -> None:
        self.raw(layer, step)


# ---- the "before" pieces ------------------------------------------------------------------------
def _set_recompile_limit(n: int = 64) -> None:
    """One compiled piece_mid is re-entered per layer and per token regime; keep Dynamo from giving up."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


class CompiledPieces:
    """``torch.compile`` of the three pieces of ``stack`` (a shallow copy sharing its weights, with opaque mHC ops
    when the backend is not the traceable reference). ``mark_tokens`` marks dim 0 of the token-carrying arguments
    dynamic (T >= 2) so one compile serves every decode size. ``opaque_mhc`` (default: iff the backend is not the
    reference) routes the mHC calls through ``opaque_mhc_ops``."""

    def __init__(self, stack: DecoderStack, *, backend: str = "inductor", mode: str = "default",
                 mark_tokens: bool = True, opaque_mhc: bool | None = None) -> None:
        _set_recompile_limit()
        self.stack = copy.copy(stack)
        if opaque_mhc if opaque_mhc is not None else stack.mhc_backend != "reference":
            self.stack.ops = opaque_mhc_ops(stack.mhc_backend)
        opts: dict[str, Any] = dict(backend=backend, fullgraph=True)
        if backend == "inductor":
            opts["mode"] = mode
        self.backend, self.mode, self.mark_tokens, self.mark_error = backend, mode, mark_tokens, None
        s = self.stack
        self._first = torch.compile(s.piece_first, **opts)
        self._mid = torch.compile(s.piece_mid, **opts)
        self._last = torch.compile(s.piece_last, **opts)

    def _call(self, fn: Callable, marked: tuple[torch.Tensor, ...], *args: Any) -> Any:
        """Call a compiled piece, first marking the token dim of ``marked`` dynamic. If Dynamo refuses the marks
        (a constraint violation: the code specialised T), drop them for good and let automatic dynamic shapes
        recompile instead (``mark_error`` says why)."""
        if self.mark_tokens and marked[0].shape[0] >= 2:
            for t in marked:
                torch._dynamo.mark_dynamic(t, 0)
            try:
                return fn(*args)
            except Exception as e:
                if "onstraint" not in f"{type(e).__name__} {e}":
                    raise
                self.mark_tokens, self.mark_error = False, f"{type(e).__name__}: {str(e)[:500]}"
                for t in marked:
                    getattr(t, "_dynamo_dynamic_indices", set()).discard(0)
        return fn(*args)

    def first(self, h, positions, q_out, kv_out, w):
        return self._call(self._first, (h, positions, q_out, kv_out), h, positions, q_out, kv_out, w)

    def mid(self, o, positions, residual, post, comb, q_out, kv_out, w_prev, w_next):
        return self._call(self._mid, (o, positions, residual, post, comb, q_out, kv_out),
                          o, positions, residual, post, comb, q_out, kv_out, w_prev, w_next)

    def last(self, o, positions, residual, post, comb, w_prev, final):
        return self._call(self._last, (o, positions, residual, post, comb), o, positions, residual, post, comb,
                          w_prev, final)

    @property
    def pieces(self) -> tuple[Callable, Callable, Callable]:
        return self.first, self.mid, self.last


def before_forward(stack: DecoderStack, compiled: CompiledPieces, step: DecodeStep) -> torch.Tensor:
    """The "before" forward: compiled pieces, the custom-op attention as the break between them."""
    return stack.forward(step, pieces=compiled.pieces, attend=OpAttention(stack))


# ---- runners: one per mode ------------------------------------------------------------------------
class Runner:
    """A mode made ready for one step shape: ``run()`` executes one forward on ``step``'s current contents."""

    def __init__(self, mode: str, stack: DecoderStack, step: DecodeStep, *, graph_backend: Any = None,
                 compiled: CompiledPieces | None = None, warmup: int = 2) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode == "full" and not step.pad:
            raise ValueError("step: the full graph freezes the launch width; build the step with pad=True")
        if mode == "before" and compiled is None:
            raise ValueError("compiled: the 'before' mode needs CompiledPieces")
        self.mode, self.stack, self.step, self.graph = mode, stack, step, None
        t0 = time.perf_counter()
        if mode == "eager":
            self.output = stack.forward(step)          # first call: lazy JIT / cuBLAS setup
            self.warmup_s, self.capture_s = time.perf_counter() - t0, 0.0
        else:
            fn = functools.partial(before_forward, stack, compiled) if mode == "before" else stack.forward
            backend = graph_backend if graph_backend is not None else graphs.default_backend()
            self.graph = graphs.capture(fn, step, backend=backend, breaks=mode != "full", warmup=warmup)
            self.output = self.graph.output
            self.capture_s = self.graph.capture_s
            self.warmup_s = time.perf_counter() - t0 - self.capture_s
        _sync(stack.device)
        self.startup_s = time.perf_counter() - t0

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.stack.forward(self.step)
        return self.graph.replay()

    @property
    def num_graphs(self) -> int:
        return 0 if self.graph is None else self.graph.num_graphs

    @property
    def num_breaks(self) -> int:
        return 0 if self.graph is None else self.graph.num_breaks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- steps and equality ----------------------------------------------------------------------------
def step_inputs(stack: DecoderStack, tokens: int, steps: int, seed: int = 0
                ) -> Iterable[tuple[np.ndarray, torch.Tensor]]:
    """``steps`` (positions, h) pairs: synthetic metadata (``random_positions``) and unit-RMS bf16 inputs."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=stack.device).manual_seed(seed)
    for _ in range(steps):
        pos = random_positions(tokens, stack.cfg.sliding_window, rng)
        h = torch.randn(tokens, stack.cfg.hidden_size, generator=gen, device=stack.device).to(torch.bfloat16)
        yield pos, h


def eager_outputs(stack: DecoderStack, tokens: int, steps: int, *, pad: bool, seed: int = 0) -> list[torch.Tensor]:
    """Eager outputs of ``steps`` consecutive steps from a freshly reset KV cache (the reference sequence)."""
    step = stack.new_step(tokens, pad=pad)
    stack.reset_cache()
    outs = []
    for pos, h in step_inputs(stack, tokens, steps, seed):
        step.set(pos, h)
        outs.append(stack.forward(step).clone())
    return outs


def replay_outputs(runner: "Runner", steps: int, seed: int = 0) -> list[torch.Tensor]:
    """The runner's outputs on the same step sequence, from a freshly reset KV cache (capture wrote garbage KV
    at the capture step's slots, exactly as a real capture would; the reset removes it)."""
    runner.stack.reset_cache()
    outs = []
    for pos, h in step_inputs(runner.stack, runner.step.tokens, steps, seed):
        runner.step.set(pos, h)
        outs.append(runner.run().clone())
    return outs


def equality_stats(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, Any]:
    """Per-step bitwise equality and worst-case differences of ``got`` vs ``ref`` (bf16 outputs)."""
    from ..lab.numerics import ulp_diff

    if len(ref) != len(got) or not ref:
        raise ValueError(f"ref/got: expected equally many (>= 1) outputs, got {len(ref)} and {len(got)}")
    equal = [torch.equal(a, b) for a, b in zip(ref, got)]
    r, g = torch.stack(ref), torch.stack(got)
    diff = g.double() - r.double()
    rms = float(r.double().pow(2).mean().sqrt())
    per_step = [float(d.pow(2).mean().sqrt()) / max(float(a.double().pow(2).mean().sqrt()), 1e-30)
                for a, d in zip(ref, diff)]
    ulps = ulp_diff(g, r).abs()
    return dict(steps=len(ref), bitwise_steps=sum(equal), bitwise=all(equal), finite=bool(torch.isfinite(g).all()),
                max_abs=float(diff.abs().max()) if diff.numel() else 0.0,
                rel_rms=float(diff.pow(2).mean().sqrt()) / rms if rms else 0.0,
                worst_step_rel_rms=max(per_step), ulp_max=int(ulps.max()) if ulps.numel() else 0,
                frac_ulp_gt1=float((ulps > 1).double().mean()) if ulps.numel() else 0.0)


def verdict(stats: dict[str, Any]) -> tuple[str, bool]:
    """("bitwise", True) when every step is bitwise equal, else ("tolerance", rel_rms <= TOL_REL_RMS and finite)."""
    if stats["bitwise"]:
        return "bitwise", True
    return "tolerance", bool(stats["finite"] and stats["rel_rms"] <= TOL_REL_RMS)


# ---- timing helpers ----------------------------------------------------------------------------------
def host_time_us(fn: Callable[[], Any], device: torch.device, reps: int = 20, warmup: int = 2) -> float:
    """Median wall time to ISSUE one ``fn()`` with an idle device before each call (GPU work not waited for)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    _sync(device)
    return statistics.median(times)


# ---- records -----------------------------------------------------------------------------------------
def _fields(stack: DecoderStack, mode: str, preset: str, tokens: int | None, **extra: Any) -> dict[str, Any]:
    return dict(experiment=EXPERIMENT, op=OP, backend=BACKEND[mode], variant=mode, preset=preset, tokens=tokens,
                dtype="bfloat16", **stack.describe(), **extra)


def _rec(metric: str, unit: str | None, value: Any, **fields: Any) -> dict:
    from ..lab import results

    return results.record(metric=metric, unit=unit, value=value, **fields)


def _error(exc: BaseException, **fields: Any) -> dict:
    return _rec("error", None, None, message=f"{type(exc).__name__}: {str(exc)[:2000]}", **fields)


def _unavailable(reason: str, **fields: Any) -> dict:
    return _rec("unavailable", None, None, reason=reason, **fields)


def measure_mode(stack: DecoderStack, mode: str, tokens: int, *, preset: str, refs: dict[bool, list[torch.Tensor]],
                 graph_backend_factory: Callable[[], Any] | None, compiled: "CompiledPieces | None", steps: int,
                 rep: int, kernels: bool, timing_kind: str, extra: dict[str, Any], capture_warmup: int = 2
                 ) -> list[dict]:
    """Records of one (mode, T): startup, graph counts, equality over ``steps`` steps, latency, host time and
    (``kernels``) kernels per forward. ``refs[pad]`` are the eager reference outputs of the same steps. Timings
    run on one fixed step with full windows (launch width W in every mode)."""
    from ..lab import timing

    pad = mode == "full"
    f = _fields(stack, mode, preset, tokens, graph_backend=timing_kind, **extra)
    recs: list[dict] = []
    step = stack.new_step(tokens, pad=pad)
    step.set(*next(iter(step_inputs(stack, tokens, 1, seed=12345))))
    backend = graph_backend_factory() if graph_backend_factory is not None and mode != "eager" else None
    runner = Runner(mode, stack, step, graph_backend=backend, compiled=compiled, warmup=capture_warmup)
    compile_info = {} if compiled is None or mode != "before" else dict(
        compile_mode=compiled.mode, dynamic_tokens=compiled.mark_tokens, mark_error=compiled.mark_error)
    recs.append(_rec("startup", "s", runner.startup_s, warmup_s=runner.warmup_s, capture_s=runner.capture_s,
                     **compile_info, **f))
    recs.append(_rec("graphs", "count", runner.num_graphs, breaks=runner.num_breaks, **f))

    stats = equality_stats(refs[pad], replay_outputs(runner, steps))
    kind, ok = verdict(stats)
    recs.append(_rec("equal_to_eager", "bool", ok, verdict=kind, tol_rel_rms=TOL_REL_RMS,
                     reference="eager, pad=True" if pad else "eager", **stats, **f))

    # time every mode on the same work: every sequence past its first W tokens (full windows, width = W)
    W = stack.cfg.sliding_window
    step.set(W + np.arange(tokens) % W, step.h.clone())
    dev = stack.device
    if dev.type == "cuda":
        recs.append(timing.bench(runner.run, flush_l2=False, warmup=3, rep=rep, device=dev).to_record(**f))
    else:
        recs.append(timing.bench(runner.run, warmup=1, rep=rep, device=dev).to_record(
            note="CPU clock of the fake backend's replay: not a GPU number", **f))
    recs.append(_rec("host_time", "us", host_time_us(runner.run, dev, reps=max(3, rep // 2), warmup=1), **f))
    if kernels:
        recs.append(timing.kernels_per_call(runner.run, device=dev, warmup=1).to_record(**f))
    del runner
    return recs


def target_records(records: list[dict]) -> list[dict]:
    """Recorded, never asserted: after <= 1.3 x full and <= 0.5 x eager latency for T <= 64; after startup <=
    20% of before's, both summed over the T where both were measured."""
    from ..lab import results

    def value(metric: str, mode: str, T: int | None) -> float | None:
        for r in records:
            if r["metric"] == metric and r["variant"] == mode and r["tokens"] == T:
                return r["value"]
        return None

    base = dict(experiment=EXPERIMENT, op=OP, backend=BACKEND["after"], variant="after", dtype="bfloat16",
                metric="target_met", unit="bool", preset=records[0]["preset"] if records else None)
    out = []
    timed = sorted({r["tokens"] for r in records if r["metric"] == "time" and r["tokens"] is not None})
    for T in timed:
        if T > TARGETS["max_tokens"]:
            continue
        a = value("time", "after", T)
        for name, other in (("after_vs_full", "full"), ("after_vs_eager", "eager")):
            b = value("time", other, T)
            if a is None or b is None:
                continue
            bound = TARGETS[name]
            out.append(results.record(tokens=T, value=a / b <= bound, target=f"{name} <= {bound}", ratio=a / b, **base))
    both = [T for T in timed if value("startup", "after", T) is not None and value("startup", "before", T) is not None]
    if both:
        sa = sum(value("startup", "after", T) for T in both)
        sb = sum(value("startup", "before", T) for T in both)
        bound = TARGETS["startup_vs_compile"]
        out.append(results.record(tokens=None, value=sa / sb <= bound, target=f"startup_vs_compile <= {bound}",
                                  ratio=sa / sb, after_startup_s=sa, before_startup_s=sb, over_tokens=both, **base))
    return out


def sweep(stack: DecoderStack, *, preset: str, tokens: Iterable[int] = GPU_TOKENS, modes: Iterable[str] = MODES,
          steps: int = STEPS, rep: int = 30, kernel_tokens: Iterable[int] = (1, 64), capture_warmup: int = 2,
          graph_backend_factory: Callable[[], Any] | None = None, compile_backend: str = "inductor",
          deadline_s: float | None = None, sink: Callable[[list[dict]], None] | None = None,
          progress: bool = True) -> list[dict]:
    """Every (T, mode): ``measure_mode`` records; failures become 'error' records and the sweep goes on.

    Order: eager, after and full for every T first, then ``before`` for T >= 2 (one dynamic compile) and T = 1
    (its own compile) last: compiling is the slow, uncertain part. Past ``deadline_s`` no case starts that would
    need a new compile (or is not a ``before`` case); cached-compile ``before`` cases still run (seconds each). ``sink`` receives each batch as it is produced
    (the bench appends it to the JSONL file). Target records at the end."""
    t_start = time.perf_counter()
    modes, tokens, kernel_tokens = tuple(modes), tuple(tokens), set(kernel_tokens)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes: expected a subset of {MODES}, got {bad}")
    timing_kind = "cuda-graph" if stack.device.type == "cuda" else "fake (CPU)"
    if graph_backend_factory is None:
        graph_backend_factory = graphs.CudaGraphBackend if stack.device.type == "cuda" else graphs.FakeGraphBackend
    all_recs: list[dict] = []

    def emit(batch: list[dict]) -> None:
        all_recs.extend(batch)
        if sink is not None and batch:
            sink(batch)

    cases = [(T, m) for T in tokens for m in modes if m != "before"]
    # before: T >= 2 share one dynamic compile, T = 1 needs its own; the T = 1 compile goes last
    cases += [(T, "before") for T in sorted(tokens, key=lambda t: (t == 1, t)) if "before" in modes]
    bar: Iterable = cases
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(cases, desc=EXPERIMENT, leave=False)
        except ImportError:
            pass
    refs: dict[int, dict[bool, list[torch.Tensor]]] = {}
    compiled, compiled_regimes = None, set()

    def regime(T: int) -> str:   # which compile a before case at T needs
        return "static-1" if T == 1 else ("dynamic" if compiled is None or compiled.mark_tokens else f"static-{T}")

    for T, mode in bar:
        extra = dict(compile_backend=compile_backend if mode == "before" else None)
        f = _fields(stack, mode, preset, T, graph_backend=timing_kind, **extra)
        late = deadline_s is not None and time.perf_counter() - t_start > deadline_s
        if late and (mode != "before" or regime(T) not in compiled_regimes):   # a cached compile is cheap: run it
            emit([_unavailable(f"skipped: the sweep passed its {deadline_s:.0f} s deadline", **f)])
            continue
        try:
            if T not in refs:
                refs[T] = {pad: eager_outputs(stack, T, steps, pad=pad) for pad in (False, True)}
            if mode == "before" and compiled is None:
                compiled = CompiledPieces(stack, backend=compile_backend)
            emit(measure_mode(stack, mode, T, preset=preset, refs=refs[T], graph_backend_factory=graph_backend_factory,
                              compiled=compiled, steps=steps, rep=rep, kernels=T in kernel_tokens,
                              timing_kind=timing_kind, capture_warmup=capture_warmup, extra=extra))
            if mode == "before":
                compiled_regimes.add(regime(T))
        except Exception as e:  # one broken case must not lose the others
            emit([_error(e, **f)])
        finally:
            if stack.device.type == "cuda":
                torch.cuda.empty_cache()
    emit(target_records(all_recs))
    return all_recs


def run(device: str = "cpu", quick: bool = True, preset: str = "flash") -> list[dict]:
    """Before vs after on this device.

    CPU: the mechanism on ``FakeGraphBackend`` (its replay re-runs recorded aten ops: CPU times, not GPU times) at
    toy width: quick = L 2, T 4, 4 steps, no ``before`` (recorded as unavailable); otherwise L 3, T in (1, 4, 16),
    20 steps and ``before`` compiled with Dynamo's ``eager`` backend (Inductor only means something on the GPU).
    GPU: the sweep at the preset's width (quick: L 4, T in (1, 64), 20 steps; else L 8, every T, 100 steps)."""
    if device == "cpu":
        cfg = stack_config("toy", num_layers=2 if quick else 3, experts=4)
        stack = DecoderStack(cfg, device="cpu", max_seqs=16)
        modes = ("eager", "after", "full") if quick else MODES
        recs = sweep(stack, preset="toy", tokens=(4,) if quick else (1, 4, 16), modes=modes, steps=4 if quick else 20,
                     rep=2 if quick else 5, kernel_tokens=(4,), capture_warmup=1, compile_backend="eager",
                     progress=False)
        if quick:
            recs.append(_unavailable("skipped in quick mode on the CPU: Dynamo tracing takes tens of seconds here; "
                                     "bench/pr43746_breakable_graphs.py measures torch.compile on the GPU",
                                     **_fields(stack, "before", "toy", None)))
        return recs
    stack = DecoderStack(stack_config(preset, num_layers=4 if quick else 8), device=device)
    return sweep(stack, preset=preset, tokens=(1, 64) if quick else GPU_TOKENS, steps=20 if quick else STEPS,
                 progress=False)


# ---- notebook helpers ---------------------------------------------------------------------------------
def mechanism_trace(num_layers: int = 3, tokens: int = 4, replays: int = 2) -> dict[str, Any]:
    """Capture a toy stack on the ``FakeGraphBackend`` (breakable and full), replay with changing metadata and
    return the bookkeeping: steps, backend call log, the last replay's timeline, and whether each replay matched
    eager bitwise. Runs on a CPU in a few seconds."""
    cfg = stack_config("toy", num_layers=num_layers, experts=4)
    stack = DecoderStack(cfg, device="cpu", max_seqs=max(tokens, 1))
    out: dict[str, Any] = {}
    for name, pad, breaks in (("after", False, True), ("full", True, False)):
        step = stack.new_step(tokens, pad=pad)
        inputs = list(step_inputs(stack, tokens, replays + 1, seed=7))
        step.set(*inputs[0])
        backend = graphs.FakeGraphBackend()
        g = graphs.capture(stack.forward, step, backend=backend, breaks=breaks, warmup=1)
        ref_step = stack.new_step(tokens, pad=pad)
        matches, widths = [], []
        for pos, h in inputs[1:]:
            step.set(pos, h)
            ref_step.set(pos, h)
            stack.reset_cache()
            got = g.replay(timeline=True).clone()
            stack.reset_cache()
            matches.append(torch.equal(got, stack.forward(ref_step)))
            widths.append(step.launch_width)
        out[name] = dict(steps=g.describe(), log=list(backend.log), timeline=g.last_timeline, matches=matches,
                         launch_widths=widths, num_graphs=g.num_graphs, num_breaks=g.num_breaks)
    return out


def timeline_figure(trace: dict[str, Any], title: str | None = None):
    """plotly: one row per capture kind, graph segments and eager breaks as bars along the last replay's host
    timeline (fake backend: CPU execution time of the recorded ops), labelled with the recorded op counts."""
    import plotly.graph_objects as go

    colors = {"graph": "#4c78a8", "eager": "#f58518"}
    fig = go.Figure()
    seen = set()
    for row_name, t in trace.items():
        for r in t["timeline"]:
            label = r["label"] + (f" ({r['ops']} ops)" if r["ops"] is not None else " (eager)")
            fig.add_bar(y=[row_name], x=[r["end_us"] - r["start_us"]], base=[r["start_us"]], orientation="h",
                        marker_color=colors[r["kind"]], name=r["kind"], showlegend=r["kind"] not in seen,
                        hovertext=label, text=r["label"].replace("DecoderStack.", ""), textposition="inside")
            seen.add(r["kind"])
    fig.update_layout(barmode="overlay", height=260, xaxis_title="host time in one replay (us, fake backend on CPU)",
                      title=title or "one replay: graph segments (blue) and eager attention breaks (orange)")
    return fig


def load_results(root: Any = None, slug: str | None = None):
    """Stored records of this experiment (``lab.results.load``); an empty DataFrame if there are none."""
    import pandas as pd

    from ..lab import results

    try:
        return results.load(root=root, slug=slug, experiment=EXPERIMENT)
    except FileNotFoundError:
        return pd.DataFrame()


def summary_table(df):
    """One row per (T, mode): p50 latency, host time, kernels, graphs/breaks, startup, equality verdict."""
    import pandas as pd

    if df.empty or "metric" not in df:
        return pd.DataFrame()
    metrics = {"time": "latency_us", "host_time": "host_us", "kernels_per_call": "kernels", "graphs": "graphs",
               "startup": "startup_s"}
    sub = df[df.metric.isin(list(metrics))]
    if sub.empty:
        return pd.DataFrame()
    table = sub.pivot_table(index=["tokens", "variant"], columns="metric", values="value", aggfunc="last")
    table = table.rename(columns=metrics)
    eq = df[df.metric == "equal_to_eager"]
    if not eq.empty:
        v = eq.set_index(["tokens", "variant"])
        table["equal"] = v["verdict"].where(v["value"].astype(bool), "FAILED " + v["verdict"].astype(str))
        table["bitwise_steps"] = v["bitwise_steps"]
    brk = sub[sub.metric == "graphs"].set_index(["tokens", "variant"])
    if not brk.empty and "breaks" in brk:
        table["breaks"] = brk["breaks"]
    return table.round(2)


def _source_note(df) -> str:
    if df.empty:
        return "no data"
    gpus = sorted(set(df["gpu"].dropna())) if "gpu" in df else []
    kind = "stored" if "_file" in df and df["_file"].notna().any() else "live"
    fake = "graph_backend" in df and df["graph_backend"].astype(str).str.startswith("fake").any()
    return f"{kind} results on {', '.join(map(str, gpus)) or 'unknown'}" + (
        " (CPU fake backend: CPU times, not GPU)" if fake else "")


def latency_figure(df, metric: str = "time"):
    """plotly: p50 latency (``time``) or host issue time (``host_time``) per forward vs T, one line per mode."""
    import plotly.graph_objects as go

    fig = go.Figure()
    t = df[df.metric == metric] if not df.empty else df
    for mode in MODES:
        s = t[t.variant == mode].sort_values("tokens") if not t.empty else t
        if s.empty:
            continue
        err = {}
        if metric == "time" and "p20" in s:
            err = dict(error_y=dict(type="data", symmetric=False, array=s.p80 - s.value, arrayminus=s.value - s.p20))
        fig.add_scatter(x=s.tokens, y=s.value, mode="lines+markers", name=mode, **err)
    what = "latency per forward (us, p50, CUDA events)" if metric == "time" else "host time to issue one forward (us)"
    fig.update_layout(title=f"{what}: {_source_note(t)}", xaxis_title="tokens T (one per sequence)",
                      yaxis_title="us", xaxis_type="log", yaxis_type="log", height=420)
    return fig


def summary_lines(records: list[dict]) -> list[str]:
    """A compact text table for the bench script's end."""
    by = {}
    for r in records:
        by.setdefault((r.get("tokens"), r.get("variant")), {})[r["metric"]] = r
    lines = [f"{'T':>4} {'mode':<7} {'lat us':>9} {'host us':>9} {'kern':>6} {'graphs':>6} {'startup s':>9}  equal"]
    for (T, mode), m in sorted(by.items(), key=lambda kv: (kv[0][0] or -1, MODES.index(kv[0][1])
                                                           if kv[0][1] in MODES else 9)):
        if "error" in m:
            lines.append(f"{T!s:>4} {mode:<7} ERROR {m['error'].get('message', '')[:90]}")
            continue
        if "unavailable" in m:
            lines.append(f"{T!s:>4} {mode:<7} unavailable: {m['unavailable'].get('reason', '')[:80]}")
            continue
        if "time" not in m:
            continue
        eq = m.get("equal_to_eager", {})
        eq_s = f"{eq.get('verdict', '?')}{'' if eq.get('value', False) else ' FAILED'} ({eq.get('bitwise_steps')}/" \
               f"{eq.get('steps')} bitwise, rel_rms {eq.get('rel_rms', float('nan')):.2g})"
        kern = m.get("kernels_per_call", {}).get("value", "")
        lines.append(f"{T!s:>4} {mode:<7} {m['time']['value']:>9.1f} {m.get('host_time', {}).get('value', 0):>9.1f} "
                     f"{kern!s:>6} {m.get('graphs', {}).get('value', ''):>6} "
                     f"{m.get('startup', {}).get('value', float('nan')):>9.2f}  {eq_s}")
    for r in records:
        if r["metric"] == "target_met":
            lines.append(f"target {r['target']} at T={r['tokens']}: ratio {r['ratio']:.2f} -> "
                         f"{'met' if r['value'] else 'NOT met'}")
    return lines
