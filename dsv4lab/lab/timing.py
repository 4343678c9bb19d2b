"""One timing harness (design.md, "Timing").

``bench(fn)`` calls ``fn()`` ``warmup`` times (so JIT compilation, autotuning, cuBLAS workspaces and the caching
allocator never land in a timing), then times ``rep`` calls one by one and reports the 20th/50th/80th
percentiles of the per-call times in microseconds. Modes:

- ``'cuda-events'``: a CUDA event pair around each ``fn()`` on the current stream. With ``flush_l2`` a 256 MiB
  buffer is written (memset) before each call, outside the event pair, so every call starts with a cold L2
  (H100/H200 L2 is 50 MB). Host launch gaps inside ``fn`` are included.
- ``'cuda-graph'``: ``fn`` is warmed up on a side stream, captured once into a ``torch.cuda.CUDAGraph``, and each
  ``replay()`` is timed with an event pair (the L2 flush is replayed outside the pair). This excludes the
  Python/dispatcher cost of ``fn``; one graph launch remains.
- ``kernel_time(fn)`` (mode ``'kernel-sum'``): the summed CUPTI durations of the GPU activities of one call
  (``torch.profiler``), no launch or event overhead; for kernels near the ~5 us event/graph floor.
- ``'cpu-clock'``: on a CPU device, ``time.perf_counter_ns`` around each call. No cache flush. These are CPU
  timings and are labelled as such in every record; never compare them with GPU times.

``host_overhead(fn, n)`` = wall time of ``n`` back-to-back calls / n (with a device synchronise before and after
on a GPU): with tiny GPU work this is the per-call dispatch cost. ``kernels_per_call(fn)`` counts the GPU
activities (kernels, memcpy, memset) of one call with ``torch.profiler``; on a CPU it counts the top-level
``aten::`` ops instead and says so in ``.kind``.

Only the torch 2.11 CUDA-graph signatures are used (``CUDAGraph()``, ``torch.cuda.graph(g)``, ``replay``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import torch

L2_FLUSH_BYTES = 256 * 2**20
_flush_buffers: dict[str, torch.Tensor] = {}


@dataclass
class Timing:
    """Per-call time percentiles in microseconds and how they were measured."""

    p20: float
    p50: float
    p80: float
    mode: str            # 'cuda-graph' | 'cuda-events' | 'kernel-sum' | 'cpu-clock'
    rep: int
    warmup: int
    flush_l2: bool
    device: str
    times_us: list[float] = field(default_factory=list, repr=False)

    @property
    def median(self) -> float:
        return self.p50

    def to_record(self, *, cost: Any = None, peaks: Any = None, **fields: Any) -> dict[str, Any]:
        """A ``metric="time"`` record (value = p50, unit "us"). ``fields`` must hold experiment, op, backend,
        variant, preset, tokens, dtype. With ``cost`` (a ``roofline.OpCost``) the record gets ``bytes``,
        ``flops`` and, with measured ``peaks`` on a GPU, ``pct_of_peak`` plus which peak it is against."""
        from . import results, roofline

        extra: dict[str, Any] = dict(p20=self.p20, p80=self.p80, timing_mode=self.mode, rep=self.rep,
                                     warmup=self.warmup, l2_flush=self.flush_l2)
        if cost is not None:
            extra.update(roofline.roofline_fields(self.p50, cost, None if self.mode == "cpu-clock" else peaks))
        extra.update(fields)
        return results.record(metric="time", unit="us", value=self.p50, **extra)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA requested but torch.cuda.is_available() is False")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device}")
    return device


def percentiles(times_us: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 with linear interpolation (numpy's default)."""
    p20, p50, p80 = np.percentile(np.asarray(times_us, dtype=np.float64), [20, 50, 80])
    return float(p20), float(p50), float(p80)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _flush_buffers[key]


def _check_args(fn: Any, warmup: int, rep: int) -> None:
    if not callable(fn):
        raise TypeError(f"fn: expected a callable taking no arguments, got {type(fn).__name__}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    if not isinstance(rep, int) or rep < 1:
        raise ValueError(f"rep: expected an int >= 1, got {rep!r}")


def _cpu_clock(fn: Callable[[], Any], warmup: int, rep: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def _flush_l2(flush: torch.Tensor, kind: str) -> None:
    # "write": memset (triton.testing.do_bench does the same); leaves up to an L2's worth of dirty lines whose
    # write-back can land inside the next timed kernel. "read": a reduction over the buffer; leaves clean lines.
    if kind == "write":
        flush.zero_()
    else:
        flush.view(torch.float32).sum()


def _cuda_events(fn: Callable[[], Any], warmup: int, rep: int, flush: torch.Tensor | None,
                 flush_kind: str = "write") -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(starts, ends):
        if flush is not None:
            _flush_l2(flush, flush_kind)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def _cuda_graph(fn: Callable[[], Any], warmup: int, rep: int, flush: torch.Tensor | None,
                flush_kind: str = "write") -> list[float]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture will run on one
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()  # noqa: F841 -- keep the captured outputs alive while replaying
    graph.replay()  # one untimed replay: first launch uploads the graph
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(starts, ends):
        if flush is not None:
            _flush_l2(flush, flush_kind)
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    del graph, static_out
    return times


def bench(fn: Callable[[], Any], *, graph: bool = False, flush_l2: bool = True, warmup: int = 5, rep: int = 30,
          device: str | torch.device | None = None, flush_kind: str = "write") -> Timing:
    """Time ``fn()`` (no arguments; bind inputs with a closure or functools.partial). See the module docstring.
    ``flush_kind``: how the L2 is flushed, "write" (memset, the default) or "read" (a reduction: clean lines).

    ``device`` defaults to CUDA when available, else CPU ('cpu-clock'). ``graph=True`` needs CUDA.
    """
    _check_args(fn, warmup, rep)
    if flush_kind not in ("write", "read"):
        raise ValueError(f"flush_kind: expected 'write' or 'read', got {flush_kind!r}")
    dev = resolve_device(device)
    if dev.type == "cpu":
        if graph:
            raise ValueError("graph: CUDA-graph timing needs a CUDA device; this run is on the CPU")
        times, mode, flushed = _cpu_clock(fn, warmup, rep), "cpu-clock", False
    else:
        with torch.cuda.device(dev):
            flush = _flush_buffer(dev) if flush_l2 else None
            if graph:
                times, mode = _cuda_graph(fn, warmup, rep, flush, flush_kind), "cuda-graph"
            else:
                times, mode = _cuda_events(fn, warmup, rep, flush, flush_kind), "cuda-events"
        flushed = flush_l2
    p20, p50, p80 = percentiles(times)
    return Timing(p20=p20, p50=p50, p80=p80, mode=mode, rep=rep, warmup=warmup, flush_l2=flushed,
                  device=str(dev), times_us=times)


def bench_interleaved(cases: Mapping[Hashable, Callable[[], Any]], *, flush_l2: bool = True, warmup: int = 5,
                      rep: int = 100, device: str | torch.device | None = None,
                      graph: bool = True) -> dict[Hashable, Timing]:
    """Times of several ``cases`` that should be compared with each other, taken alternately (a, b, c, a, b, c,
    ...), each sample with its own L2 flush (if ``flush_l2``) and event pair. Slow drift of the GPU (clocks,
    temperature, power) then lands on every case alike, which timing the cases one after another does not give
    (two 750 us graphs timed back to back differed by 5 % from drift alone).

    ``graph=True``: each case is captured once into a CUDA graph and replayed (GPU time, mode 'cuda-graph').
    ``graph=False``: each case is called directly (launch and host cost included where the GPU waits for the
    host, mode 'cuda-events')."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: bench_interleaved replays CUDA graphs and needs a CUDA device, got {dev}")
    if not cases:
        raise ValueError("cases: expected at least one case, got none")
    for fn in cases.values():
        _check_args(fn, warmup, rep)
    with torch.cuda.device(dev):
        flush = _flush_buffer(dev) if flush_l2 else None
        runs, keep = {}, []
        side = torch.cuda.Stream()
        for key, fn in cases.items():
            if not graph:
                for _ in range(warmup):
                    fn()
                runs[key] = fn
                continue
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(warmup, 1)):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                keep.append(fn())
            g.replay()
            runs[key] = g.replay
        torch.cuda.synchronize()
        events = {key: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        for _ in range(rep)] for key in cases}
        for i in range(rep):
            for key, run in runs.items():
                if flush is not None:
                    flush.zero_()
                start, end = events[key][i]
                start.record()
                run()
                end.record()
        torch.cuda.synchronize()
    out = {}
    for key in cases:
        times = [s.elapsed_time(e) * 1e3 for s, e in events[key]]
        p20, p50, p80 = percentiles(times)
        out[key] = Timing(p20=p20, p50=p50, p80=p80, mode="cuda-graph" if graph else "cuda-events", rep=rep,
                          warmup=warmup, flush_l2=flush_l2, device=str(dev), times_us=times)
    del runs, keep
    return out


def bench_sweep(cases: Mapping[Hashable, Callable[[], Any]], *, warmup: int = 5, **kw: Any) -> dict[Hashable, Timing]:
    """``bench`` every case, after first warming up ALL cases (every shape compiles before any timing)."""
    for fn in cases.values():
        _check_args(fn, warmup, 1)
        for _ in range(warmup):
            fn()
    return {key: bench(fn, warmup=min(warmup, 2), **kw) for key, fn in cases.items()}


def host_overhead(fn: Callable[[], Any], n: int = 100, *, warmup: int = 10, repeats: int = 5,
                  device: str | torch.device | None = None) -> float:
    """Microseconds per call: median over ``repeats`` of (perf_counter around ``n`` calls) / n.

    On a GPU the device is synchronised before and after the ``n`` calls, so with small GPU work the result is
    the host (Python + dispatcher + launch) cost per call; with large GPU work it tends to the GPU time.
    """
    _check_args(fn, warmup, n)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(per_call)


class KernelCount(tuple):
    """``(count, names)`` of one call; ``.kind`` says what was counted ('cuda-kernels' or 'cpu-aten-ops')."""

    kind: str

    def __new__(cls, count: int, names: list[str], kind: str) -> "KernelCount":
        self = super().__new__(cls, (count, names))
        self.kind = kind
        return self

    @property
    def count(self) -> int:
        return self[0]

    @property
    def names(self) -> list[str]:
        return self[1]

    def to_record(self, **fields: Any) -> dict[str, Any]:
        from . import results

        unit = "kernels" if self.kind == "cuda-kernels" else "aten ops"
        return results.record(metric="kernels_per_call", unit=unit, value=self.count,
                              names=compact_names(self.names), count_kind=self.kind, **fields)


def compact_names(names: list[str], keep: int = 16) -> list[str] | dict[str, int]:
    """Kernel names for a record: the list itself when short, else ``{name: count}`` in order of first launch
    (a 1000-kernel forward stays a few KB instead of a few hundred)."""
    if len(names) <= keep:
        return list(names)
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return counts


def _is_gpu_activity(evt: Any) -> bool:
    from torch.autograd import DeviceType

    if evt.device_type != DeviceType.CUDA:
        return False
    activity = getattr(evt, "activity_type", None) or ""
    return "annotation" not in str(activity).lower()  # record_function ranges mirrored on the GPU timeline


def kernels_per_call(fn: Callable[[], Any], *, device: str | torch.device | None = None,
                     warmup: int = 2) -> KernelCount:
    """GPU activities (kernels, memcpy, memset) launched by one ``fn()`` call, in start order.

    On a CPU device there are no kernels; the top-level ``aten::`` ops of one call are counted instead
    (ops called inside another aten op are not counted) and ``.kind`` is 'cpu-aten-ops'.
    """
    from torch.profiler import ProfilerActivity, profile

    _check_args(fn, warmup, 1)
    dev = resolve_device(device)
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        gpu = sorted((e for e in prof.events() if _is_gpu_activity(e)), key=lambda e: e.time_range.start)
        names = [e.name for e in gpu]
        return KernelCount(len(names), names, "cuda-kernels")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.events())

    def nested_in_aten(e: Any) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    top = sorted((e for e in events if e.name.startswith("aten::") and not nested_in_aten(e)),
                 key=lambda e: e.time_range.start)
    names = [e.name for e in top]
    return KernelCount(len(names), names, "cpu-aten-ops")


def kernel_time(fn: Callable[[], Any], *, warmup: int = 3, rep: int = 30, flush_l2: bool = True,
                device: str | torch.device | None = None) -> Timing:
    """GPU busy time of ``fn()``: the summed durations of the GPU activities (kernels, memcpy, memset) one call
    launches, from ``torch.profiler`` (CUPTI) timestamps, per call -> p20/p50/p80 (mode 'kernel-sum'). Launch
    latency, host gaps and the graph/event overhead are not in it, so it resolves kernels of a few microseconds
    that event timing puts on a ~5 us floor (DeepGEMM's benchmarks time kernels the same way).

    Each call is preceded by a marker activity (the L2 flush memset with ``flush_l2``, else a one-element fill)
    that separates the calls on the GPU timeline and is not counted; its kernel names are learnt by profiling the
    marker alone first, so a ``fn`` that launches the very same kernel would lose it from its sum."""
    from torch.profiler import ProfilerActivity, profile

    _check_args(fn, warmup, rep)
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: kernel_time reads CUDA kernel timestamps and needs a CUDA device, got {dev}")
    with torch.cuda.device(dev):
        flush = _flush_buffer(dev)
        tiny = torch.zeros(1, device=dev)

        def marker() -> None:
            if flush_l2:
                flush.zero_()
            else:
                tiny.zero_()

        for _ in range(warmup):
            fn()
        marker()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            marker()
            torch.cuda.synchronize()
        marker_names = {e.name for e in prof.events() if _is_gpu_activity(e)}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(rep):
                marker()
                fn()
            torch.cuda.synchronize()
    gpu = sorted((e for e in prof.events() if _is_gpu_activity(e)), key=lambda e: e.time_range.start)
    times: list[float] = []
    for e in gpu:
        if e.name in marker_names:
            times.append(0.0)
        elif times:
            times[-1] += e.time_range.end - e.time_range.start
    if len(times) != rep:
        raise RuntimeError(f"kernel_time: found {len(times)} marker activities on the GPU timeline for {rep} calls "
                           f"(marker kernels {sorted(marker_names)})")
    p20, p50, p80 = percentiles(times)
    return Timing(p20=p20, p50=p50, p80=p80, mode="kernel-sum", rep=rep, warmup=warmup, flush_l2=flush_l2,
                  device=str(dev), times_us=times)


def host_overhead_pairs(calls: Mapping[str, tuple[Callable[[], Any], Callable[[], Any]]], n: int, *,
                        repeats: int = 5, device: str | torch.device | None = None) -> dict[str, dict[str, float]]:
    """``{name: {"before": us, "after": us}}``: ``host_overhead`` of both functions of every (before, after)
    pair -- the measurement of a refactor that only moves host code (a wrapper removed, a method inlined)."""
    return {name: {"before": host_overhead(b, n, repeats=repeats, device=device),
                   "after": host_overhead(a, n, repeats=repeats, device=device)}
            for name, (b, a) in calls.items()}
