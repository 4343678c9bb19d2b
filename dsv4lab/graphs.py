"""A small breakable CUDA graph (refactors.md section 1; vLLM #42304's mechanism, re-implemented).

Capture runs the uncompiled forward once inside a ``BreakableCapture``. Work between breaks is captured into
graph *segments*; a function decorated with ``@eager_break`` ends the current segment, runs eagerly, and a new
segment begins after it. The captured artifact is an ordered list of steps::

    [segment 0] -> eager fn 0 -> [segment 1] -> eager fn 1 -> ... -> [segment L]

and ``replay()`` runs them in that order. Rules (section 1.4), which the code enforces where it can:

- All segments of one capture share one memory pool (``backend.new_pool()``), safe because they always run
  in capture order, never concurrently.
- Tensors crossing a break live at fixed addresses: inputs are static buffers the caller refills before each
  replay; segment outputs live in the pool (kept alive by the recorded steps); an eager function writes into
  caller-provided buffers. An eager break that returns a fresh tensor is rejected at capture (its address
  would change on every replay, and the next segment would read the capture-time tensor).
- On replay a segment re-runs its recorded work with the host values frozen at capture; an eager function is
  called again with the SAME arguments, so tensor arguments are the same buffers and a mutable Python object
  passed in (a metadata holder) is read afresh: that is how per-step host state reaches attention.
- Breaking is decided per capture (``breaks=True``), not at import: with ``breaks=False`` (a full graph) or
  outside any capture, the decorated function is just called, and under a full capture it is captured inline.

Backends implement ``new_pool / enter / exit / begin_segment / end_segment / replay``: ``CudaGraphBackend``
(torch 2.11 API only: ``CUDAGraph()``, ``capture_begin(pool=...)``, ``capture_end()``, ``replay()``,
``graph_pool_handle()``) and ``FakeGraphBackend``, which records the aten ops of a segment with a
``TorchDispatchMode`` and replays them as Python thunks, so the bookkeeping is testable on a CPU. The fake
rejects host syncs and data-dependent shapes inside a segment (what a real capture cannot take) and, by
default, fills fresh segment outputs with NaN at capture time, because a CUDA capture records kernels without
running them: only a replay produces values.
"""
from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["BreakableCapture", "BreakableGraph", "CaptureError", "CudaGraphBackend", "FakeGraphBackend",
           "capture", "current_capture", "default_backend", "eager_break", "is_eager_break"]


class CaptureError(RuntimeError):
    """Something a graph capture cannot take (host sync, data-dependent shape, nesting, a fresh eager output)."""


_local = threading.local()


def current_capture() -> "BreakableCapture | None":
    """The capture active on this thread, or None."""
    return getattr(_local, "capture", None)


# ---- the decorator ------------------------------------------------------------------------------
def eager_break(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as an eager break. Outside a breaking capture it is a plain call (eager runs, replays, and
    full-graph captures, where it is captured inline). Inside one, the current segment ends, ``fn`` runs with its
    arguments bound for every later replay, and a new segment begins.

    Contract: ``fn`` writes its results into caller-provided tensors and returns None (or one of its argument
    tensors); non-tensor arguments are frozen at capture, so per-step host state must come from a mutable
    object passed in (or a context the replayer updates).
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cap = current_capture()
        if cap is None or not cap.breaks or cap.in_eager:
            return fn(*args, **kwargs)
        return cap.add_eager(fn, args, kwargs)

    wrapper.__eager_break__ = fn
    return wrapper


def is_eager_break(fn: Any) -> bool:
    return getattr(fn, "__eager_break__", None) is not None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_eager_result(name: str, result: Any, args: tuple, kwargs: dict) -> None:
    """An eager break may return None or tensors sharing storage with its arguments (caller buffers)."""
    if result is None:
        return
    outs = _tensors(result)
    if not outs or len(outs) != len(tree_flatten(result)[0]):
        raise CaptureError(f"eager break {name}: returned {type(result).__name__}; it must return None or its "
                           "argument buffers (a host value would be frozen at capture)")
    inputs = {_storage_ptr(t) for t in _tensors((args, kwargs))}
    for t in outs:
        if t.numel() and _storage_ptr(t) not in inputs:
            raise CaptureError(f"eager break {name}: returned a freshly allocated tensor {tuple(t.shape)}; write "
                               "into a caller-provided buffer instead (a fresh tensor moves on every replay)")


# ---- the captured artifact ----------------------------------------------------------------------
@dataclass
class GraphStep:
    """One replay step: a graph segment or an eager function."""

    kind: str                       # "graph" | "eager"
    run: Callable[[], Any]
    label: str
    ops: int | None = None          # recorded aten ops (fake backend only)


@dataclass
class BreakableGraph:
    """Ordered graph segments and eager functions from one capture; ``output`` is what the captured call
    returned (valid after a replay)."""

    backend: Any
    pool: Any
    breaks: bool
    steps: list[GraphStep] = field(default_factory=list)
    output: Any = None
    capture_s: float = math.nan
    last_timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        return sum(s.kind == "graph" for s in self.steps)

    @property
    def num_breaks(self) -> int:
        return sum(s.kind == "eager" for s in self.steps)

    def replay(self, timeline: bool = False) -> Any:
        """Run every step in capture order; returns ``output``. ``timeline=True`` also records host-side start/end
        times of each step (``last_timeline``) -- host issue times on a GPU, execution times on the fake."""
        if not timeline:
            for s in self.steps:
                s.run()
            return self.output
        t_base = time.perf_counter()
        rows = []
        for i, s in enumerate(self.steps):
            t0 = time.perf_counter()
            s.run()
            t1 = time.perf_counter()
            rows.append(dict(step=i, kind=s.kind, label=s.label, ops=s.ops,
                             start_us=(t0 - t_base) * 1e6, end_us=(t1 - t_base) * 1e6))
        self.last_timeline = rows
        return self.output

    def describe(self) -> list[dict[str, Any]]:
        """One row per step: index, kind, label and (fake backend) recorded op count."""
        return [dict(step=i, kind=s.kind, label=s.label, ops=s.ops) for i, s in enumerate(self.steps)]


# ---- the capture context ------------------------------------------------------------------------
class BreakableCapture:
    """Context manager capturing a forward into a ``BreakableGraph`` (``.graph``).

    ``breaks=True``: ``@eager_break`` functions split the capture; ``False``: one segment, breaks captured inline.
    """

    def __init__(self, backend: Any = None, pool: Any = None, *, breaks: bool = True) -> None:
        self.backend = backend if backend is not None else default_backend()
        self.pool = pool if pool is not None else self.backend.new_pool()
        self.breaks = bool(breaks)
        self.graph = BreakableGraph(self.backend, self.pool, self.breaks)
        self.in_eager = False          # an eager break calling another decorated function runs it inline
        self._open = False
        self._t0 = 0.0

    def __enter__(self) -> "BreakableCapture":
        if current_capture() is not None:
            raise CaptureError("a breakable capture is already active on this thread (nesting is not supported)")
        self._t0 = time.perf_counter()
        self.backend.enter()
        _local.capture = self
        try:
            self._begin()
        except BaseException:
            _local.capture = None
            self.backend.exit()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._end()
            elif self._open:                # end a broken capture so the stream leaves capture mode
                self._open = False
                try:
                    self.backend.end_segment()
                except Exception:           # the original error is the one worth reporting
                    pass
        finally:
            _local.capture = None
            self.backend.exit()
            self.graph.capture_s = time.perf_counter() - self._t0
        return False

    def _begin(self) -> None:
        self.backend.begin_segment(self.pool)
        self._open = True

    def _end(self) -> None:
        if not self._open:
            return
        self._open = False
        handle = self.backend.end_segment()
        label = f"graph {self.graph.num_graphs}"
        self.graph.steps.append(GraphStep("graph", functools.partial(self.backend.replay, handle), label,
                                          getattr(handle, "num_ops", None)))

    def add_eager(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """End the segment, run ``fn(*args, **kwargs)`` now (capture suspended), keep it as a replay step, and
        begin the next segment. Returns what ``fn`` returned."""
        name = getattr(fn, "__qualname__", repr(fn))
        self._end()
        self.in_eager = True
        try:
            result = fn(*args, **kwargs)
        finally:
            self.in_eager = False
        _check_eager_result(name, result, args, kwargs)
        self.graph.steps.append(GraphStep("eager", functools.partial(fn, *args, **kwargs), name))
        self._begin()
        return result


def capture(fn: Callable[..., Any], *args: Any, backend: Any = None, breaks: bool = True, warmup: int = 2,
            pool: Any = None, **kwargs: Any) -> BreakableGraph:
    """Warm ``fn(*args, **kwargs)`` up ``warmup`` times on the capture stream (lazy JIT, cuBLAS handles and the
    allocator must not happen inside a capture), then capture it. ``graph.output`` = the captured call's result."""
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    backend = backend if backend is not None else default_backend()
    if warmup:
        backend.enter()
        try:
            for _ in range(warmup):
                fn(*args, **kwargs)
        finally:
            backend.exit()
    with BreakableCapture(backend, pool, breaks=breaks) as cap:
        out = fn(*args, **kwargs)
    cap.graph.output = out
    return cap.graph


# ---- CUDA backend -------------------------------------------------------------------------------
class CudaGraphBackend:
    """Segments are ``torch.cuda.CUDAGraph``s captured with ``capture_begin(pool=pool)`` on one side stream
    (capture needs a non-default stream; a shared pool needs the same stream for every capture)."""

    name = "cuda-graph"

    def __init__(self, device: torch.device | str | None = None) -> None:
        if not torch.cuda.is_available():
            raise CaptureError("CudaGraphBackend: no CUDA device (use FakeGraphBackend on a CPU)")
        self.device = torch.device(device if device is not None else "cuda")
        self.stream = torch.cuda.Stream(self.device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ctx: Any = None

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def enter(self) -> None:
        torch.cuda.synchronize(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()

    def exit(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def begin_segment(self, pool: Any) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=pool)

    def end_segment(self) -> torch.cuda.CUDAGraph:
        g, self._graph = self._graph, None
        g.capture_end()
        self.graphs.append(g)
        return g

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


def default_backend() -> Any:
    """``CudaGraphBackend`` when CUDA is available, else ``FakeGraphBackend`` (its records say 'fake')."""
    return CudaGraphBackend() if torch.cuda.is_available() else FakeGraphBackend()


# ---- fake backend -------------------------------------------------------------------------------
_aten = torch.ops.aten
# ops that need a host sync or produce a data-dependent shape: a CUDA stream capture cannot record them
SYNC_OPS = frozenset(getattr(_aten, n) for n in (
    "_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique", "_unique2", "unique_dim",
    "unique_dim_consecutive", "equal", "is_nonzero") if hasattr(_aten, n))
_INDEX_OPS = frozenset(getattr(_aten, n) for n in ("index", "index_put", "index_put_", "_index_put_impl_")
                       if hasattr(_aten, n))
_NO_REPLAY = frozenset(getattr(_aten, n) for n in ("empty", "empty_strided", "empty_like") if hasattr(_aten, n))


def _data_dependent(packet: Any, overload: str, args: tuple, kwargs: dict) -> bool:
    """Boolean-mask indexing (a nonzero inside the kernel) and repeat_interleave without output_size."""
    if packet in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())
    if packet is getattr(_aten, "repeat_interleave", None):
        return overload in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    return False


@dataclass
class RecordedOp:
    func: Any
    args: tuple
    kwargs: dict
    fresh: list[tuple[int, torch.Tensor]]      # (flat output index, captured tensor) of non-aliasing outputs

    def replay(self) -> None:
        out = self.func(*self.args, **self.kwargs)
        if self.fresh:
            flat = tree_flatten(out)[0]
            for i, captured in self.fresh:
                captured.copy_(flat[i])


class _Recorder(TorchDispatchMode):
    def __init__(self, poison: bool) -> None:
        super().__init__()
        self.poison = poison
        self.ops: list[RecordedOp] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # let torch.compile'd code run under the recorder (Dynamo otherwise skips every frame while a user mode
        # is active); with the eager / aot_eager backends the compiled graph's aten ops still reach this mode
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", None)
        if func in SYNC_OPS or packet in SYNC_OPS or _data_dependent(packet, getattr(func, "_overloadname", ""), args, kwargs):
            raise CaptureError(f"{func} inside a graph segment: it needs a host sync or has a data-dependent "
                               "shape, which a CUDA stream capture cannot record")
        out = func(*args, **kwargs)
        if func in _NO_REPLAY:
            return out
        inputs = {_storage_ptr(t) for t in _tensors((args, kwargs))}
        flat = tree_flatten(out)[0]
        fresh = [(i, t) for i, t in enumerate(flat)
                 if isinstance(t, torch.Tensor) and _storage_ptr(t) not in inputs]
        self.ops.append(RecordedOp(func, args, kwargs, fresh))
        if self.poison:  # a capture only records work: values appear at the first replay
            for _, t in fresh:
                if t.is_floating_point():
                    t.fill_(math.nan)
        return out


@dataclass
class FakeSegment:
    index: int
    pool: Any
    ops: list[RecordedOp]

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    def replay(self) -> None:
        for op in self.ops:
            op.replay()


@dataclass(frozen=True)
class FakePool:
    id: int


class FakeGraphBackend:
    """CPU stand-in for CUDA graphs: a segment records the aten ops run inside it and replays them on the same
    tensors (fresh outputs are refilled in place, so their addresses never change). ``log`` lists every call:
    ``("new_pool", id)``, ``("enter",)``, ``("begin", seg, pool)``, ``("end", seg, n_ops)``, ``("replay", seg)``,
    ``("exit",)``."""

    name = "fake"

    def __init__(self, poison: bool = True) -> None:
        self.poison = poison
        self.log: list[tuple] = []
        self.segments: list[FakeSegment] = []
        self._recorder: _Recorder | None = None
        self._pools = 0

    def new_pool(self) -> FakePool:
        self._pools += 1
        self.log.append(("new_pool", self._pools))
        return FakePool(self._pools)

    def enter(self) -> None:
        self.log.append(("enter",))

    def exit(self) -> None:
        self.log.append(("exit",))

    def begin_segment(self, pool: Any) -> None:
        if self._recorder is not None:
            raise CaptureError("begin_segment: a segment is already open")
        self._recorder = _Recorder(self.poison)
        self._recorder.__enter__()
        self.log.append(("begin", len(self.segments), getattr(pool, "id", pool)))
        self._pool = pool

    def end_segment(self) -> FakeSegment:
        rec, self._recorder = self._recorder, None
        if rec is None:
            raise CaptureError("end_segment: no segment is open")
        rec.__exit__(None, None, None)
        seg = FakeSegment(len(self.segments), self._pool, rec.ops)
        self.segments.append(seg)
        self.log.append(("end", seg.index, seg.num_ops))
        return seg

    def replay(self, seg: FakeSegment) -> None:
        self.log.append(("replay", seg.index))
        seg.replay()
