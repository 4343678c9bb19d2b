"""vLLM #43746, part 1: the MTP layer's input norms and shared-head norm, before and after the manual fusion.

Before #43746 the MTP draft layer ran under ``torch.compile`` (Inductor fused the small ops); the PR removed the
compile dependency and replaced the op sequence by one Triton kernel (refactors.md 3.a):

    before:  e = RMSNorm(where(pos == 0, 0, embed); enorm);  h = RMSNorm(prev.view(T, n, D); hnorm)
    after:   e, h = fused_mtp_input_rmsnorm(embed, pos, prev, enorm.w, hnorm.w, eps)   # grid (T, n + 1)
    shared head:  RMSNorm CustomOp  ->  mtp_shared_head_rmsnorm(h, w, eps)              # grid (T,)

Variants (every one takes the op's reference arguments; MTP input: ``embed, positions, prev, enorm_weight,
hnorm_weight, eps``; shared head: ``h, weight, eps``):

- ``before_eager``: the eager op sequence with vLLM's native RMSNorm (fp32 normalise, round to the input
  dtype, multiply by the weight in that dtype: two roundings). About 18 small kernels on a GPU.
- ``before_compiled``: the same function under ``torch.compile(fullgraph=True)`` (mode "default"), with the
  token dimension dynamic as vLLM compiles it: "before" as it ran.
- ``before_kernel_norms`` (MTP input only): the eager mask followed by one two-rounding RMSNorm launch per
  norm, the launch structure of vLLM's ``forward_cuda`` RMSNorm. Our Triton row kernel stands in for vLLM's C++
  ``rms_norm`` (same math, not the same code).
- ``after``: the fused Triton kernels (one rounding: ``round(x * rrms * w)``).
- ``after_two_rounding``: the fused kernels computing the eager rounding, to separate fusion from rounding.

``run`` is the ``dsv4lab compare`` entry; ``sweep`` is what ``bench/pr43746_mtp_norm.py`` runs on the H100.
The notebook helpers at the bottom (tables and plotly figures) read the records these write.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from typing import Any, Callable, Iterable

import torch

from ..config import get_config
from ..kernels.inputs import positions_with_restarts
from ..kernels.reference.norms import rmsnorm_two_round

EXPERIMENT = "pr43746_mtp_norm"
TITLE = "#43746: fused Triton MTP-input RMSNorm and shared-head RMSNorm"
OPS = ("mtp_input_rmsnorm", "mtp_shared_head_rmsnorm")
VARIANTS = ("before_eager", "before_compiled", "before_kernel_norms", "after", "after_two_rounding")
BACKEND = {"before_eager": "torch", "before_compiled": "inductor", "before_kernel_norms": "torch+triton",
           "after": "triton", "after_two_rounding": "triton"}
GPU_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192, 16384)
# sweep order: the points the targets and the notebook need first, so a time budget cuts the least useful ones
PRIORITY = (1, 64, 4096, 16384, 8, 256, 1024, 8192, 2, 4, 16, 32, 128)
GPU_DIMS = {4096: "flash", 7168: "pro"}
HC_MULT = 4
SEQ_LEN = 128  # packed sequences of 128 tokens: position 0 (masked) at every 128th token, token 0 included
LOOP_MAX_TOKENS = 256   # eager-loop timings at decode sizes (where the targets on eager mode apply)
TARGETS = {"bandwidth_pct": 85.0, "bandwidth_min_tokens": 4096, "eager_speedup": 3.0, "eager_max_tokens": 64}


# ---- inputs -----------------------------------------------------------------------------------------------
def make_inputs(op: str, T: int, D: int, n: int = HC_MULT, dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of ``op`` generated on ``device`` (fast at T = 16384): unit-RMS activations, norm weights
    ~ 1 + N(0, 0.1^2) (RMSNorm weights start at 1), positions of packed 128-token sequences.

    MTP input: ``(embed [T, D], positions [T] int64, prev [T, n*D], enorm_weight [D], hnorm_weight [D])``;
    shared head: ``(h [T, D], weight [D])``.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    if op == "mtp_shared_head_rmsnorm":
        return randn(T, D).to(dtype), (1 + 0.1 * randn(D)).to(dtype)
    positions = positions_with_restarts(T, SEQ_LEN).to(device)
    return (randn(T, D).to(dtype), positions, randn(T, n * D).to(dtype),
            (1 + 0.1 * randn(D)).to(dtype), (1 + 0.1 * randn(D)).to(dtype))


# ---- MTP input block: the variants ------------------------------------------------------------------------
def before_eager(embed: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor, enorm_weight: torch.Tensor,
                 hnorm_weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-#43746 MTP input block as vLLM's layer ran it op by op (native RMSNorm, two roundings)."""
    D = embed.shape[-1]
    hc_mult = prev.shape[1] if prev.dim() == 3 else prev.shape[1] // D
    embed = torch.where(positions.unsqueeze(-1) == 0, 0, embed)
    e = rmsnorm_two_round(embed, enorm_weight, eps)
    h = rmsnorm_two_round(prev.view(-1, hc_mult, D), hnorm_weight, eps)
    return e, h


def before_compiled(embed, positions, prev, enorm_weight, hnorm_weight, eps=1e-6):
    """``before_eager`` under ``torch.compile(fullgraph=True)``; see ``compile_before`` for the first call."""
    return _compiled("mtp_input_rmsnorm")(embed, positions, prev, enorm_weight, hnorm_weight, eps)


def before_kernel_norms(embed, positions, prev, enorm_weight, hnorm_weight, eps=1e-6):
    """Eager mask, then one two-rounding RMSNorm launch per norm (vLLM's forward_cuda launch structure)."""
    from ..kernels.triton.mtp_norm import mtp_shared_head_rmsnorm as row_rmsnorm

    T, D = embed.shape
    embed = torch.where(positions.unsqueeze(-1) == 0, 0, embed)
    e = row_rmsnorm(embed, enorm_weight, eps, two_rounding=True)
    h = row_rmsnorm(prev.reshape(-1, D), hnorm_weight, eps, two_rounding=True)
    return e, h.view(T, -1, D)


def after(embed, positions, prev, enorm_weight, hnorm_weight, eps=1e-6):
    """#43746: one fused Triton launch, grid (T, n + 1), one rounding."""
    from ..kernels.triton.mtp_norm import fused_mtp_input_rmsnorm

    return fused_mtp_input_rmsnorm(embed, positions, prev, enorm_weight, hnorm_weight, eps)


def after_two_rounding(embed, positions, prev, enorm_weight, hnorm_weight, eps=1e-6):
    """The fused launch computing the eager rounding (separates fusion from rounding)."""
    from ..kernels.triton.mtp_norm import fused_mtp_input_rmsnorm

    return fused_mtp_input_rmsnorm(embed, positions, prev, enorm_weight, hnorm_weight, eps, two_rounding=True)


# ---- shared head: the variants ----------------------------------------------------------------------------
def head_before_eager(h: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SharedHead.forward before #43746: vLLM's RMSNorm (native path, two roundings)."""
    return rmsnorm_two_round(h, weight, eps)


def head_before_compiled(h, weight, eps=1e-6):
    """``head_before_eager`` under ``torch.compile(fullgraph=True)`` (Inductor: one fused kernel expected)."""
    return _compiled("mtp_shared_head_rmsnorm")(h, weight, eps)


def head_after(h, weight, eps=1e-6):
    """#43746: mtp_shared_head_rmsnorm, grid (T,), one rounding."""
    from ..kernels.triton.mtp_norm import mtp_shared_head_rmsnorm

    return mtp_shared_head_rmsnorm(h, weight, eps)


def head_after_two_rounding(h, weight, eps=1e-6):
    """mtp_shared_head_rmsnorm computing the eager rounding (separates fusion from rounding)."""
    from ..kernels.triton.mtp_norm import mtp_shared_head_rmsnorm

    return mtp_shared_head_rmsnorm(h, weight, eps, two_rounding=True)


def variants(op: str) -> dict[str, Callable[..., Any]]:
    """Variant name -> function for ``op``, in the order of ``VARIANTS``."""
    if op == "mtp_input_rmsnorm":
        return {"before_eager": before_eager, "before_compiled": before_compiled,
                "before_kernel_norms": before_kernel_norms, "after": after, "after_two_rounding": after_two_rounding}
    if op == "mtp_shared_head_rmsnorm":
        return {"before_eager": head_before_eager, "before_compiled": head_before_compiled,
                "after": head_after, "after_two_rounding": head_after_two_rounding}
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


# ---- torch.compile of the "before" sequence ---------------------------------------------------------------
COMPILE_BACKEND = "inductor"  # what vLLM used; tests swap in "eager" to check the tracing in seconds
_COMPILED: dict[str, Callable[..., Any]] = {}
_EAGER = {"mtp_input_rmsnorm": before_eager, "mtp_shared_head_rmsnorm": head_before_eager}
_TOKEN_ARGS = {"mtp_input_rmsnorm": (0, 1, 2), "mtp_shared_head_rmsnorm": (0,)}  # args with a token dim 0


def _compiled(op: str) -> Callable[..., Any]:
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(_EAGER[op], fullgraph=True, backend=COMPILE_BACKEND)
    return _COMPILED[op]


def reset_compiled() -> None:
    """Forget every compiled graph (``torch._dynamo.reset()``): the next call compiles from scratch."""
    _COMPILED.clear()
    torch._dynamo.reset()


def compile_before(op: str, args: tuple, eps: float = 1e-6) -> float:
    """Compile ``before_compiled`` of ``op`` from scratch on ``args`` and return the first call's seconds.

    The token dimension is marked dynamic (as vLLM compiles), so one graph serves every T >= 2; T = 1 is
    specialised by Dynamo and compiles once more on its first call.
    """
    reset_compiled()
    if args[0].shape[0] >= 2:
        for i in _TOKEN_ARGS[op]:
            torch._dynamo.mark_dynamic(args[i], 0)
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    variants(op)["before_compiled"](*args, eps)
    sync()
    return time.perf_counter() - t0


def graphs_compiled() -> int | None:
    """Dynamo's count of graphs compiled in this process (None if this torch does not expose it)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


# ---- numerics --------------------------------------------------------------------------------------------
def _rms64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.double()


def oracle(op: str, args: tuple, eps: float = 1e-6) -> torch.Tensor:
    """The op in float64, flattened like ``flat_output`` (MTP input: e then h)."""
    if op == "mtp_shared_head_rmsnorm":
        return _rms64(args[0], args[1], eps).reshape(-1)
    embed, positions, prev, enorm_w, hnorm_w = args
    T, D = embed.shape
    e = _rms64(embed.double().masked_fill((positions == 0).unsqueeze(-1), 0), enorm_w, eps)
    h = _rms64(prev.reshape(T, -1, D), hnorm_w, eps)
    return torch.cat([e.reshape(-1), h.reshape(-1)])


def flat_output(out: Any) -> torch.Tensor:
    """One flat tensor per call (MTP input: e then h), so one comparison covers every output element."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return torch.cat([o.reshape(-1) for o in out])


def _fields(op: str, variant: str, preset: str | None, T: int, dtype: Any, D: int, n: int) -> dict[str, Any]:
    return dict(experiment=EXPERIMENT, op=op, backend=BACKEND[variant], variant=variant, preset=preset, tokens=T,
                dtype=str(dtype).removeprefix("torch."), D=D, hc_mult=n)


def numerics_records(op: str, args: tuple, outputs: dict[str, Any], *, preset: str | None, D: int,
                     n: int = HC_MULT, eps: float = 1e-6) -> list[dict]:
    """Each variant vs the float64 oracle and vs ``before_eager`` (``lab.numerics.compare``: max_abs, rel_rms,
    err_ratio, bitwise_equal, ulp histogram), plus ``masked_rows_zero`` for the MTP input op."""
    from ..lab import numerics, results

    T = args[0].shape[0]
    ref = oracle(op, args, eps)
    eager = flat_output(outputs["before_eager"]) if "before_eager" in outputs else None
    recs: list[dict] = []
    for variant, out in outputs.items():
        fields = _fields(op, variant, preset, T, args[0].dtype, D, n)
        flat = flat_output(out)
        cmp = numerics.compare(ref, None if variant == "before_eager" else eager, flat)
        recs += cmp.to_records(**fields)
        if cmp.ulp_hist_oracle is not None:  # vs the correctly rounded result; to_records has it only with eager
            worst = max((int(k.split("-")[-1]) for k in cmp.ulp_hist_oracle if k != "nan"), default=0)
            recs.append(results.record(metric="ulp_max_vs_oracle", unit="ulp", value=worst,
                                       hist=cmp.ulp_hist_oracle, **fields))
        if op == "mtp_input_rmsnorm":
            masked = args[1] == 0
            e = out[0]
            recs.append(results.record(metric="masked_rows_zero", unit="bool",
                                       value=bool((e[masked] == 0).all()), masked_rows=int(masked.sum()),
                                       **fields))
    return recs


# ---- roofline and timing ---------------------------------------------------------------------------------
def roofline_cost(op: str, T: int, D: int, n: int = HC_MULT, dtype: torch.dtype = torch.bfloat16):
    """Minimum HBM traffic: every activation read once and written once, plus the weights (and positions).

    MTP input (dsv4-layers.md 7, row 22): ``2 T (n+1) D s + 2 D s_w + 8 T`` bytes; shared head (row 6):
    ``2 T D s + D s_w``, with s = bytes per activation element. FLOPs ~4 per element (square, sum, 2 muls).
    """
    from ..lab import roofline

    s = torch.empty((), dtype=dtype).element_size()
    if op == "mtp_input_rmsnorm":
        base = roofline.cost("mtp_input_rmsnorm", T=T, D=D, n=n)
        nbytes = 2 * T * (n + 1) * D * s + 2 * D * s + 8 * T
    else:
        base = roofline.cost("rmsnorm", T=T, h=D)
        nbytes = 2 * T * D * s + D * s
    return dataclasses.replace(base, op=op, bytes=float(nbytes))


def timing_records(op: str, fn: Callable[..., Any], args: tuple, *, preset: str | None, D: int, n: int,
                   variant: str, peaks: Any = None, rep: int = 30, warmup: int = 3,
                   modes: Iterable[str] = ("graph", "eager", "eager-loop", "kernel"),
                   eps: float = 1e-6) -> list[dict]:
    """``lab.timing.bench`` records of one variant.

    GPU ``graph``: CUDA-graph replay with the L2 flushed before each replay (GPU time; launch cost excluded).
    GPU ``kernel``: the summed CUPTI durations of the call's kernels, L2 flushed (``lab.timing.kernel_time``): the
    GPU work alone, without the ~5 us graph-launch/event floor every replayed call pays.
    GPU ``eager``: CUDA events around each back-to-back call, no L2 flush: the flush memset would let the host
    run ahead and hide the launch cost this mode is meant to include.
    GPU ``eager-loop`` (``T <= LOOP_MAX_TOKENS``): wall time of 100 back-to-back calls / 100 (device synchronised
    before and after; ``lab.timing.host_overhead``), 7 repeats -> p20/p50/p80. At decode sizes every variant is
    host-bound, so this is the per-call cost an eager model pays, without the event pair that ``eager`` adds to
    each sample. CPU: one ``cpu-clock`` timing.
    """
    from ..lab import timing

    T = args[0].shape[0]
    on_gpu = args[0].is_cuda
    cost = roofline_cost(op, T, D, n, args[0].dtype)
    recs = []
    call = lambda: fn(*args, eps)  # noqa: E731
    for mode in (modes if on_gpu else ("cpu",)):
        if mode == "eager-loop":
            if T <= LOOP_MAX_TOKENS:
                recs.append(_loop_record(op, call, cost, peaks, variant, preset, T, args[0].dtype, D, n))
            continue
        try:
            if mode == "kernel":
                t = timing.kernel_time(call, warmup=warmup, rep=rep, flush_l2=True, device=args[0].device)
            else:
                t = timing.bench(call, graph=mode == "graph", flush_l2=mode == "graph", warmup=warmup, rep=rep,
                                 device=args[0].device)
        except Exception as e:  # e.g. a capture failure: record it, still try the other mode
            recs.append({**_error(op, variant, e, preset=preset, T=T, dtype=args[0].dtype, D=D, n=n), "mode": mode})
            continue
        extra: dict[str, Any] = {"mode": mode}
        if peaks is not None:
            extra["roofline_us"] = cost.bytes / peaks.copy_bw * 1e6
            extra["copy_bw"] = peaks.copy_bw
        recs.append(t.to_record(cost=cost, peaks=peaks, **_fields(op, variant, preset, T, args[0].dtype, D, n),
                                **extra))
    return recs


def interleaved_timing_records(op: str, fns: dict[str, Callable[..., Any]], args: tuple, *, preset: str | None,
                               D: int, n: int, peaks: Any = None, rep: int = 30, warmup: int = 3,
                               eps: float = 1e-6) -> tuple[list[dict], tuple[str, ...]]:
    """GPU ``graph`` records (as in ``timing_records``) of all variants ``fns`` of one case, taken with
    ``lab.timing.bench_interleaved``: the variants' replays alternate, so GPU clock drift between one variant's
    timing and the next cannot decide a comparison between them (these kernels sit at a ~5 us floor where the
    variants differ by tenths of a microsecond). Returns ``(records, modes still to time per variant)``; graph mode
    falls back to per-variant timing if the interleaved run fails (e.g. a capture error). The ``eager`` mode stays
    per variant: interleaved with before_eager's 8-19 host-bound launches, each per-call event pair measured the
    queue state the previous variant left (H100, 42be99d: after's T=1 shared-head call read 56-86 us eager vs
    6 us replayed), not the variant."""
    from ..lab import timing

    T = args[0].shape[0]
    cost = roofline_cost(op, T, D, n, args[0].dtype)
    calls = {v: functools.partial(fn, *args, eps) for v, fn in fns.items()}
    recs: list[dict] = []
    left = ["eager", "eager-loop", "kernel"]
    for mode in ("graph",):
        try:
            times = timing.bench_interleaved(calls, graph=mode == "graph", flush_l2=mode == "graph", rep=rep,
                                             warmup=warmup, device=args[0].device)
        except Exception:  # noqa: BLE001 -- per-variant timing records the error of the variant that fails
            left.insert(0, mode)
            continue
        extra: dict[str, Any] = {"mode": mode, "interleaved": sorted(calls)}
        if peaks is not None:
            extra["roofline_us"] = cost.bytes / peaks.copy_bw * 1e6
            extra["copy_bw"] = peaks.copy_bw
        for v, t in times.items():
            recs.append(t.to_record(cost=cost, peaks=peaks, **_fields(op, v, preset, T, args[0].dtype, D, n),
                                    **extra))
    return recs, tuple(left)


def _loop_record(op, call, cost, peaks, variant, preset, T, dtype, D, n, calls: int = 100, repeats: int = 7) -> dict:
    from ..lab import results, timing

    try:
        per_call = [timing.host_overhead(call, n=calls, warmup=10 if i == 0 else 2, repeats=1) for i in range(repeats)]
    except Exception as e:
        return {**_error(op, variant, e, preset=preset, T=T, dtype=dtype, D=D, n=n), "mode": "eager-loop"}
    p20, p50, p80 = timing.percentiles(per_call)
    return results.record(metric="time", unit="us", value=p50, p20=p20, p80=p80, mode="eager-loop",
                          timing_mode="host-loop", calls=calls, repeats=repeats, per_repeat_us=per_call,
                          bytes=cost.bytes, **_fields(op, variant, preset, T, dtype, D, n))


def kernel_count_record(op: str, fn: Callable[..., Any], args: tuple, *, preset: str | None, D: int, n: int,
                        variant: str, eps: float = 1e-6) -> dict:
    """Kernels launched by one call (torch.profiler). Under the Triton interpreter there are no kernels to
    count, so Triton variants on a CPU get an 'unavailable' record instead."""
    from ..lab import timing

    T = args[0].shape[0]
    if not args[0].is_cuda and "triton" in BACKEND[variant]:
        return _unavailable(op, variant, "kernels_per_call: no GPU, Triton runs in the interpreter (no kernels "
                            "to count)", preset=preset, T=T, dtype=args[0].dtype, D=D, n=n)
    fields = _fields(op, variant, preset, T, args[0].dtype, D, n)
    return timing.kernels_per_call(lambda: fn(*args, eps), device=args[0].device).to_record(**fields)


def _unavailable(op: str, variant: str, reason: str, **kw: Any) -> dict:
    from ..lab import results

    return results.record(metric="unavailable", unit=None, value=None, reason=reason,
                          **_fields(op, variant, kw.get("preset"), kw.get("T"), kw.get("dtype"), kw.get("D"),
                                    kw.get("n", HC_MULT)))


def _error(op: str, variant: str, exc: BaseException, **kw: Any) -> dict:
    from ..lab import results

    return results.record(metric="error", unit=None, value=None, message=f"{type(exc).__name__}: {exc}",
                          **_fields(op, variant, kw.get("preset"), kw.get("T"), kw.get("dtype"), kw.get("D"),
                                    kw.get("n", HC_MULT)))


# ---- one case and the sweep ------------------------------------------------------------------------------
def measure_case(op: str, T: int, D: int, *, n: int = HC_MULT, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cuda", preset: str | None = None, names: Iterable[str] | None = None,
                 peaks: Any = None, rep: int = 30, warmup: int = 3, with_timing: bool = True,
                 with_kernels: bool = False, eps: float = 1e-6, seed: int = 0) -> list[dict]:
    """Numerics (and timing, kernel counts) of the variants ``names`` of ``op`` at one (T, D).
    A variant that raises gets an 'error' record; the others go on."""
    fns = variants(op)
    names = [v for v in (names or fns) if v in fns]
    args = make_inputs(op, T, D, n, dtype, device, seed)
    kw = dict(preset=preset, T=T, dtype=dtype, D=D, n=n)
    outputs: dict[str, Any] = {}
    recs: list[dict] = []
    for v in ["before_eager"] + [v for v in names if v != "before_eager"]:
        try:
            outputs[v] = fns[v](*args, eps)
        except Exception as e:  # record and go on: one broken variant must not hide the others
            recs.append(_error(op, v, e, **kw))
    recs += numerics_records(op, args, outputs, preset=preset, D=D, n=n, eps=eps)
    outputs.clear()
    ok = [v for v in names if v in fns and not any(r["variant"] == v and r["metric"] == "error" for r in recs)]
    per_variant_modes: tuple[str, ...] = ("graph", "eager", "eager-loop", "kernel")
    if with_timing and args[0].is_cuda and len(ok) > 1:
        batch, per_variant_modes = interleaved_timing_records(op, {v: fns[v] for v in ok}, args, preset=preset,
                                                              D=D, n=n, peaks=peaks, rep=rep, warmup=warmup, eps=eps)
        recs += batch
    for v in ok:
        try:
            if with_timing and per_variant_modes:
                recs += timing_records(op, fns[v], args, preset=preset, D=D, n=n, variant=v, peaks=peaks,
                                       rep=rep, warmup=warmup, eps=eps, modes=per_variant_modes)
            if with_kernels:
                recs.append(kernel_count_record(op, fns[v], args, preset=preset, D=D, n=n, variant=v, eps=eps))
        except Exception as e:
            recs.append(_error(op, v, e, **kw))
    return recs


def compile_records(op: str, D: int, *, n: int = HC_MULT, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cuda", preset: str | None = None, first_tokens: int = 64,
                    eps: float = 1e-6) -> list[dict]:
    """Compile time of ``before_compiled`` (first call after ``torch._dynamo.reset()``, token dim dynamic) at
    ``first_tokens``, then the T = 1 specialisation's compile time (metric ``recompile_time``)."""
    from ..lab import results

    recs = []
    for T, metric in ((first_tokens, "compile_time"), (1, "recompile_time")):
        fields = _fields(op, "before_compiled", preset, T, dtype, D, n)
        args = make_inputs(op, T, D, n, dtype, device)
        try:
            if metric == "compile_time":
                seconds = compile_before(op, args, eps)
            else:
                sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
                t0 = time.perf_counter()
                variants(op)["before_compiled"](*args, eps)
                sync()
                seconds = time.perf_counter() - t0
            recs.append(results.record(metric=metric, unit="s", value=seconds, dynamic_tokens=T >= 2,
                                       graphs_compiled=graphs_compiled(), **fields))
        except Exception as e:
            recs.append(_error(op, "before_compiled", e, preset=preset, T=T, dtype=dtype, D=D, n=n))
    return recs


def target_records(records: list[dict]) -> list[dict]:
    """The issue's targets, recorded (never asserted), one record per checked (op, D, T[, mode]):

    - ``bandwidth``: after >= 85 % of the measured copy bandwidth (graph replay) at T >= 4096;
    - ``eager_speedup``: after >= 3x faster than before_eager in eager mode at T <= 64 (judged in both eager
      modes: per-call events ``eager`` and back-to-back ``eager-loop``);
    - ``not_slower_than_compiled``: after's p50 <= before_compiled's p50, in every timing mode (graph, kernel, eager,
      eager-loop).
    """
    from ..lab import results

    times: dict[tuple, dict] = {}
    for r in records:
        if r.get("metric") == "time" and r.get("experiment") == EXPERIMENT:
            times[(r["op"], r.get("D"), r["tokens"], r.get("mode"), r["variant"])] = r
    out = []
    keys = sorted({k[:4] for k in times}, key=lambda k: (k[0], k[1] or 0, k[2] or 0, k[3] or ""))
    for op, D, T, mode in keys:
        aft = times.get((op, D, T, mode, "after"))
        if aft is None:
            continue
        base = {k: aft[k] for k in ("experiment", "op", "preset", "tokens", "dtype")}
        base.update(backend="triton", variant="after", D=D, hc_mult=aft.get("hc_mult"), mode=mode)
        if mode == "graph" and T >= TARGETS["bandwidth_min_tokens"] and aft.get("pct_of_peak") is not None:
            out.append(results.record(metric="target_met", unit="bool",
                                      value=bool(aft["pct_of_peak"] >= TARGETS["bandwidth_pct"]), target="bandwidth",
                                      observed=aft["pct_of_peak"], threshold=TARGETS["bandwidth_pct"], **base))
        eager = times.get((op, D, T, mode, "before_eager"))
        if mode in ("eager", "eager-loop") and T <= TARGETS["eager_max_tokens"] and eager is not None:
            speedup = eager["value"] / aft["value"]
            out.append(results.record(metric="target_met", unit="bool",
                                      value=bool(speedup >= TARGETS["eager_speedup"]), target="eager_speedup",
                                      observed=speedup, threshold=TARGETS["eager_speedup"], **base))
        comp = times.get((op, D, T, mode, "before_compiled"))
        if comp is not None:
            out.append(results.record(metric="target_met", unit="bool", value=bool(aft["value"] <= comp["value"]),
                                      target="not_slower_than_compiled", observed=comp["value"] / aft["value"],
                                      threshold=1.0, **base))
    return out


def sweep(device: str = "cuda", dims: dict[int, str] | None = None, tokens: Iterable[int] = GPU_TOKENS,
          ops: Iterable[str] = OPS, names: Iterable[str] | None = None, *, peaks: Any = None,
          kernel_tokens: Iterable[int] = (1, 8192), budget_s: float = 70.0, deadline_s: float = 105.0,
          progress: bool = True,
          eps: float = 1e-6, on_records: Callable[[list[dict]], Any] | None = None) -> list[dict]:
    """The H100 experiment (refactors.md 3.d part 1): per D, compile ``before_compiled`` once (dynamic T), then
    per (op, T) numerics + graph/eager timings (+ kernel counts at ``kernel_tokens``), then the targets.

    ``budget_s`` (measurement time, compilation excluded) splits evenly over the dims and ``deadline_s`` caps
    the whole sweep; cases past either are recorded as 'unavailable' (reason: time budget) instead of run, and
    tokens run in ``PRIORITY`` order so a budget cuts the least needed ones. Fewer repetitions at large T keep it short. ``on_records`` gets every batch of records as soon as it
    exists (the bench script appends them to its results file, so a crash keeps what was measured).
    """
    from tqdm.auto import tqdm

    dims = dims or GPU_DIMS
    ops = list(ops)
    tokens = sorted(tokens, key=lambda t: (PRIORITY.index(t) if t in PRIORITY else len(PRIORITY), t))
    emit = on_records or (lambda batch: None)
    kernel_tokens = set(kernel_tokens)
    names = list(names or VARIANTS)
    recs: list[dict] = []
    per_dim = budget_s / max(len(dims), 1)
    t_start = time.perf_counter()
    bar = tqdm(total=len(dims) * len(ops) * len(tokens), desc=EXPERIMENT, disable=not progress)
    for D, preset in dims.items():
        if "before_compiled" in names:
            for op in ops:
                if time.perf_counter() - t_start > deadline_s:
                    break
                batch = compile_records(op, D, device=device, preset=preset, eps=eps)
                recs += batch
                emit(batch)
        t_dim = time.perf_counter()
        for T in tokens:
            for op in ops:
                bar.update(1)
                now = time.perf_counter()
                if now - t_dim > per_dim or now - t_start > deadline_s:
                    why = (f"time budget used up ({per_dim:.0f} s of measurement for D={D}, "
                           f"{deadline_s:.0f} s for the sweep)")
                    batch = [_unavailable(op, v, why, preset=preset, T=T, dtype=torch.bfloat16, D=D)
                             for v in names if v in variants(op)]
                else:
                    # small T: ~5 us kernels and launch-bound eager calls are noisy, and cheap to repeat
                    rep = 200 if T <= 256 else 50 if T <= 1024 else 10
                    try:
                        batch = measure_case(op, T, D, device=device, preset=preset, names=names, peaks=peaks,
                                             rep=rep, warmup=3, with_kernels=T in kernel_tokens, eps=eps)
                    except Exception as e:  # inputs or numerics failed (e.g. out of memory): record, go on
                        batch = [_error(op, "before_eager", e, preset=preset, T=T, dtype=torch.bfloat16, D=D)]
                    if device == "cuda":
                        torch.cuda.empty_cache()
                recs += batch
                emit(batch)
    bar.close()
    batch = target_records(recs)
    emit(batch)
    return recs + batch


def run(device: str = "cpu", quick: bool = True, preset: str = "flash") -> list[dict]:
    """Before vs after on this device. CPU: Triton under the interpreter at T in (1, 4) (quick) or (1, 8, 64),
    ``cpu-clock`` timings, ``before_compiled`` only when not quick (Inductor's CPU compile takes tens of
    seconds on a small machine). GPU: the sweep at the preset's D, T in (1, 64, 4096) or the full token list."""
    cfg = get_config(preset)
    D, n, eps = cfg.hidden_size, cfg.hc_mult, cfg.rms_norm_eps
    if device != "cpu":
        from ..lab import roofline

        try:
            peaks = roofline.load_peaks() or roofline.measure_peaks()
        except Exception:  # no stored peaks and no measurement: times without % of peak
            peaks = None
        tokens = (1, 64, 4096) if quick else GPU_TOKENS
        return sweep(device, {D: preset}, tokens, peaks=peaks, kernel_tokens=(64,), progress=False, eps=eps,
                     budget_s=60.0 if quick else 300.0)
    recs: list[dict] = []
    names = [v for v in VARIANTS if not (quick and v == "before_compiled")]
    for op in OPS:
        if quick:
            recs += [_unavailable(op, "before_compiled", "skipped in quick mode on the CPU: Inductor's CPU "
                                  "compile takes tens of seconds; bench/pr43746_mtp_norm.py measures it on the GPU",
                                  preset=preset, T=None, dtype=torch.bfloat16, D=D, n=n)]
        else:
            recs += compile_records(op, D, n=n, device="cpu", preset=preset, first_tokens=8, eps=eps)
        for T in ((1, 4) if quick else (1, 8, 64)):  # the interpreter costs ~15 ms per 4096-wide row
            recs += measure_case(op, T, D, n=n, device="cpu", preset=preset, names=names,
                                 rep=2 if quick else 3, warmup=0 if quick else 1, with_kernels=T > 1, eps=eps)
    return recs


# ---- notebook helpers: prediction, tables, figures ---------------------------------------------------------
def predicted_launches(op: str = "mtp_input_rmsnorm") -> dict[str, str]:
    """Kernel launches per call predicted from the code (stated before measuring)."""
    if op == "mtp_input_rmsnorm":
        return {"before_eager": "18 = 2 (eq, where) + 2 x 8 (cast, pow, mean, add, rsqrt, mul, cast, mul)",
                "before_compiled": "2-3 (Inductor: one fused reduction+pointwise kernel per norm, maybe the mask)",
                "before_kernel_norms": "4 = eq + where + 2 RMSNorm launches",
                "after": "1", "after_two_rounding": "1"}
    return {"before_eager": "8", "before_compiled": "1", "after": "1", "after_two_rounding": "1"}


def predicted_bytes(op: str, T: int, D: int, n: int = HC_MULT) -> dict[str, float]:
    """HBM bytes per call predicted per variant (bf16 activations, fp32 intermediates in eager).

    One eager bf16 RMSNorm over R rows moves ~36 R D bytes: cast (2+4), pow (4+4), mean (4), mul by rrms (4+4),
    cast back (4+2), times the weight (2+2); the mask adds a read and a write of embed (4 T D). The fused and
    compiled paths read each input once and write each output once (Inductor keeps the row in registers).
    """
    rows = T * (n + 1) if op == "mtp_input_rmsnorm" else T
    fused = roofline_cost(op, T, D, n).bytes
    eager = 36.0 * rows * D + (4.0 * T * D if op == "mtp_input_rmsnorm" else 0.0)
    out = {"before_eager": eager, "before_compiled": fused, "after": fused, "after_two_rounding": fused}
    if op == "mtp_input_rmsnorm":
        out["before_kernel_norms"] = fused + 4.0 * T * D
    return out


def code_side_by_side() -> str:
    """HTML: the 'before' call path next to the 'after' kernel and launcher, quoted from the package source."""
    import html

    from ..kernels.triton import mtp_norm

    def block(title: str, objs: list[Any]) -> str:
        src = "\n\n".join(inspect.getsource(getattr(o, "fn", o)) for o in objs)  # @triton.jit keeps .fn
        return (f"<div style='flex:1;min-width:0'><b>{html.escape(title)}</b>"
                f"<pre style='font-size:11px;overflow:auto'>{html.escape(src)}</pre></div>")

    return ("<div style='display:flex;gap:12px'>"
            + block("before (vLLM eager op sequence; torch.compile'd as before_compiled)",
                    [before_eager, rmsnorm_two_round])
            + block("after (#43746: one Triton launch)",
                    [mtp_norm._rmsnorm_row, mtp_norm._mtp_input_rmsnorm_kernel, mtp_norm.fused_mtp_input_rmsnorm])
            + "</div>")


def load_results(root: Any = None, slug: str | None = None):
    """Stored records of this experiment as a DataFrame (``lab.results.load``); empty if there are none."""
    import pandas as pd

    from ..lab import results

    try:
        return results.load(root=root, slug=slug, experiment=EXPERIMENT)
    except FileNotFoundError:
        return pd.DataFrame()


def time_table(df, op: str = "mtp_input_rmsnorm", mode: str = "graph"):
    """p50 time (us) per (D, T) x variant in ``mode`` ('graph' | 'eager' on a GPU, 'cpu' on a CPU), plus the
    speedups of after and its % of the measured copy bandwidth."""
    import pandas as pd

    if df.empty or "metric" not in df:
        return pd.DataFrame()
    t = df[(df.metric == "time") & (df.op == op)]
    if "mode" in t:
        t = t[t["mode"] == mode]
    if t.empty:
        return pd.DataFrame()
    t = t.astype({"tokens": int, "D": int})
    table = t.pivot_table(index=["D", "tokens"], columns="variant", values="value", aggfunc="last")
    if "after" in table:
        for v in ("before_eager", "before_compiled"):
            if v in table:
                table[f"{v}/after"] = table[v] / table["after"]
        if "pct_of_peak" in t:
            pct = t[t.variant == "after"].set_index(["D", "tokens"])["pct_of_peak"]
            table["after_pct_of_copy_bw"] = pct[~pct.index.duplicated(keep="last")]
    return table.round(2)


def _source_note(df) -> str:
    if df.empty:
        return "no data"
    gpus = sorted(set(df["gpu"].dropna())) if "gpu" in df else []
    kind = "stored" if "_file" in df and df["_file"].notna().any() else "live"
    cpu = any(str(g).startswith("cpu") for g in gpus)
    return f"{kind} results on {', '.join(gpus) or 'unknown'}" + (" (CPU timing: interpreter, not GPU time)"
                                                                   if cpu else "")


def time_figure(df, D: int, op: str = "mtp_input_rmsnorm", mode: str = "graph",
                names: Iterable[str] | None = None):
    """plotly: p50 time vs T (log-log) per variant at hidden size D, with the roofline time (bytes / measured
    copy bandwidth) where the records carry it; the title says where the numbers come from."""
    import plotly.graph_objects as go

    fig = go.Figure()
    t = df[(df.metric == "time") & (df.op == op) & (df.D == D)] if not df.empty else df
    if not t.empty and "mode" in t:
        t = t[t["mode"] == mode]
    for v in (names or VARIANTS):
        s = t[t.variant == v].sort_values("tokens") if not t.empty else t
        if s.empty:
            continue
        fig.add_scatter(x=s.tokens, y=s.value, mode="lines+markers", name=v,
                        error_y=dict(type="data", symmetric=False, array=s.p80 - s.value, arrayminus=s.value - s.p20))
    if not t.empty and "roofline_us" in t:
        r = t[t.variant == "after"].dropna(subset=["roofline_us"]).sort_values("tokens")
        if not r.empty:
            fig.add_scatter(x=r.tokens, y=r.roofline_us, mode="lines", name="roofline (bytes / copy bw)",
                            line=dict(dash="dash", color="black"))
    fig.update_layout(title=f"{op}, D={D}, {mode}: {_source_note(t)}", xaxis_title="tokens T",
                      yaxis_title="time per call (us, p50; bars p20-p80)", xaxis_type="log", yaxis_type="log",
                      height=420)
    return fig


def launches_figure(df, op: str = "mtp_input_rmsnorm"):
    """plotly bars: kernels per call of each variant (one bar group per T measured)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    k = df[(df.metric == "kernels_per_call") & (df.op == op)] if not df.empty else df
    for T in sorted(set(k.tokens)) if not k.empty else []:
        s = k[k.tokens == T].drop_duplicates(subset=["variant", "D"], keep="last")
        fig.add_bar(x=[f"{v} (D={d})" for v, d in zip(s.variant, s.D)], y=s.value, name=f"T={T}")
    unit = ", ".join(sorted(set(k["unit"].dropna()))) if not k.empty else "kernels"
    fig.update_layout(title=f"{op}: launches per call ({unit}): {_source_note(k)}", yaxis_title=unit,
                      barmode="group", height=380)
    return fig


def ulp_figure(df, D: int, T: int, op: str = "mtp_input_rmsnorm", vs: str = "eager"):
    """plotly bars: ulp-distance histogram of each variant vs before_eager (``vs='eager'``) or vs the
    oracle rounded to bf16 (``vs='oracle'``), as a fraction of elements."""
    import plotly.graph_objects as go

    fig = go.Figure()
    metric = "ulp_max" if vs == "eager" else "ulp_max_vs_oracle"
    u = df[(df.metric == metric) & (df.op == op) & (df.D == D) & (df.tokens == T)] if not df.empty else df
    for _, row in (u.drop_duplicates(subset=["variant"], keep="last").iterrows() if not u.empty else []):
        hist = row.get("hist")
        if not isinstance(hist, dict) or not hist:
            continue
        total = sum(hist.values())
        fig.add_bar(x=list(hist), y=[c / total for c in hist.values()], name=row["variant"])
    fig.update_layout(title=f"{op}, D={D}, T={T}: ulps vs {'before_eager' if vs == 'eager' else 'fp64 oracle'}: "
                      f"{_source_note(u)}", xaxis_title="ulp distance (bf16)", yaxis_title="fraction of elements",
                      barmode="group", height=380)
    return fig


def numerics_table(df, op: str = "mtp_input_rmsnorm"):
    """Per (D, T, variant): rel_rms vs the oracle, err_ratio vs eager, ulp_max vs eager, bitwise vs eager,
    masked rows zero."""
    import pandas as pd

    if df.empty or "metric" not in df:
        return pd.DataFrame()
    m = df[(df.op == op) & df.metric.isin(["rel_rms", "err_ratio", "ulp_max", "bitwise_equal", "masked_rows_zero"])]
    if m.empty:
        return pd.DataFrame()
    return m.pivot_table(index=["D", "tokens", "variant"], columns="metric", values="value", aggfunc="last")


def summary_lines(records: list[dict]) -> list[str]:
    """A compact text summary of a sweep (printed by the bench script): times, compile, launches, numerics
    aggregated over T, targets, and what failed or was skipped."""
    import pandas as pd

    df = pd.DataFrame(records)
    if df.empty or "metric" not in df:
        return ["no records"]
    lines: list[str] = []
    pd.set_option("display.width", 200)
    for op, modes in (("mtp_input_rmsnorm", ("graph", "eager", "cpu")), ("mtp_shared_head_rmsnorm", ("graph", "cpu"))):
        for mode in modes:
            tab = time_table(df, op, mode)
            if not tab.empty:
                lines += [f"\n{op}: p50 us ({mode})", tab.to_string()]
    comp = df[df.metric.isin(["compile_time", "recompile_time"])]
    if not comp.empty:
        lines += ["\nbefore_compiled compile seconds", comp.pivot_table(
            index=["op", "D"], columns="metric", values="value", aggfunc="last").round(2).to_string()]
    kern = df[df.metric == "kernels_per_call"]
    if not kern.empty:
        lines += ["\nkernels per call", kern.pivot_table(
            index=["op", "variant"], columns=["D", "tokens"], values="value", aggfunc="last").to_string()]
    num = df[df.metric.isin(["err_ratio", "ulp_max", "ulp_max_vs_oracle", "bitwise_equal", "masked_rows_zero"])]
    if not num.empty:
        agg = num.assign(value=num.value.astype(float)).pivot_table(
            index=["op", "variant"], columns="metric", values="value", aggfunc=["max", "min"])
        keep = [c for c in agg.columns if (c[0] == "max") != (c[1] in ("bitwise_equal", "masked_rows_zero"))]
        lines += ["\nnumerics over all (D, T): worst err_ratio / ulps; min of the booleans (1 = always true)",
                  agg[keep].round(3).to_string()]
    tgt = df[df.metric == "target_met"]
    if not tgt.empty:
        lines.append("\ntargets met: " + ", ".join(f"{t} {int(g.value.sum())}/{len(g)}"
                                                    for t, g in tgt.groupby("target")))
        for _, r in tgt[~tgt.value.astype(bool)].iterrows():
            lines.append(f"  missed {r.target}: {r.op} D={r.D} T={r.tokens} {r['mode']} observed {r.observed:.3g}"
                         f" (threshold {r.threshold})")
    bad = df[df.metric.isin(["error", "unavailable"])]
    if not bad.empty:
        why = bad.apply(lambda r: f"{r.metric}: {r.get('message') if r.metric == 'error' else r.get('reason')}",
                        axis=1)
        lines.append("\nnot measured:")
        for text, g in bad.groupby(why):
            cases = ", ".join(sorted({f"{o}/{v}" for o, v in zip(g.op, g.variant)}))
            lines.append(f"  {len(g)} x {text} [{cases}]")
    return lines
