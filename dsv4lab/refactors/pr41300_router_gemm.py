"""vLLM PR #41300: ``torch.mm(x, w.T, out_dtype=torch.float32)`` replaces a custom cuBLAS bf16 x bf16 -> fp32 op.

DSv4 computes its router logits and its compressor / indexer-compressor ``kv_score`` projections as
``x [T, D] bf16  @  W [N, D]^T bf16  ->  [T, N] fp32`` (refactors.md 2, dsv4-layers.md 3.4 and 4.1). Before the
PR this was a custom op (``csrc/moe/router_gemm.cu``: ``cublasGemmEx``, COMPUTE_32F, DEFAULT_TENSOR_OP) behind
``torch.ops._moe_C``; after it, one ATen call. The variants below all take ``(x, weight)`` and return fp32 [M, N]:

    before        the cuBLAS extension through the dispatcher (dsv4lab.kernels.cuda.cublas_gemm)      CUDA
    after         torch.mm(x, weight.T, out_dtype=torch.float32)                                        CUDA
    bf16_linear   F.linear(x, weight).float()   -- vLLM's Tier-3 router: the logits are rounded to bf16  any
    upcast_fp32   torch.mm(x.float(), weight.float().T) with TF32 off                                   any
    upcast_tf32   the same with TF32 on (bf16 inputs are exact in TF32; only accumulation differs)       CUDA

``before`` and ``after`` mirror vLLM: no Python-side input checks (vLLM's wrapper had none; the C++ op checks
dtypes and dims). The registry backends of op ``router_gemm`` carry the full input contract.

Routing (dsv4-layers.md 4.1): ``ids = topk(sqrt(softplus(logits)) + bias, 6)``. Rounding is monotonic, so a bf16
rounding of the logits never reverses two logits; it merges near-equal ones into a tie, which the bias (or the
index) then decides. ``near_tie_case`` builds inputs where that happens for almost every token, so the
bf16-output shortcut changes the selected experts while every fp32-output path agrees with the fp64 oracle.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import get_config
from ..kernels.reference.moe import route
from ..kernels.reference.router_gemm import fp32_accumulation_bound, router_gemm, tf32_matmul

EXPERIMENT = "pr41300_router_gemm"
TITLE = "#41300: torch.mm(out_dtype=fp32) replaces a custom cuBLAS bf16 x bf16 -> fp32 GEMM"
OP = "router_gemm"
DTYPE = "bf16->fp32"
M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192, 16384)
BF16_UNIT_ROUNDOFF = 2.0 ** -8   # 8-bit significand, round to nearest: |bf16(y) - y| <= 2^-8 |y|


# ---- variants ---------------------------------------------------------------------------------------
def before(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """vLLM before #41300: Python wrapper -> ``torch.ops`` dispatcher -> C++ -> ``cublasGemmEx``."""
    from ..kernels.cuda import cublas_gemm

    return cublas_gemm.gemm_op()(x, weight)


def after(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """vLLM after #41300: one ATen op, ``aten::mm.dtype``."""
    return torch.mm(x, weight.T, out_dtype=torch.float32)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Tier 3 of vLLM's GateLinear: bf16 output (one rounding to 8 significand bits), then upcast."""
    return F.linear(x, weight).float()


def upcast_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 copies of both operands, fp32 matmul, TF32 off (2-3 kernels: casts + SIMT GEMM on CUDA)."""
    with tf32_matmul(False):
        return torch.mm(x.float(), weight.float().T)


def upcast_tf32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 copies, TF32 tensor-core matmul: bf16 values are exact in TF32 (10-bit mantissa), fp32 accumulate."""
    with tf32_matmul(True):
        return torch.mm(x.float(), weight.float().T)


VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "before": before, "after": after, "bf16_linear": bf16_linear,
    "upcast_fp32": upcast_fp32, "upcast_tf32": upcast_tf32,
}
BACKEND = {"before": "cuda", "after": "torch", "bf16_linear": "torch", "upcast_fp32": "torch",
           "upcast_tf32": "torch", "reference": "reference"}
FP32_OUTPUT_VARIANTS = ("before", "after", "upcast_fp32", "upcast_tf32")


def oracle(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp64 ``x @ weight.T`` (exact products, 53-bit accumulation)."""
    return x.double() @ weight.double().T


def round_logits_bf16(logits: torch.Tensor) -> torch.Tensor:
    """Device-independent emulation of the bf16-output shortcut: round fp32 logits to bf16, upcast again."""
    return logits.to(torch.bfloat16).float()


def variant_availability(name: str, device: str | torch.device) -> tuple[bool, str]:
    """(runs here, reason if not) for one variant on ``device``."""
    if name not in VARIANTS:
        raise ValueError(f"name: expected one of {sorted(VARIANTS)}, got {name!r}")
    dev = torch.device(device)
    if name == "before":
        if dev.type != "cuda":
            return False, "the cuBLAS extension is a CUDA op (cublasGemmEx)"
        from ..kernels.cuda import cublas_gemm

        ok, why = cublas_gemm.status()
        if ok:
            try:
                cublas_gemm.build()
            except cublas_gemm.ExtensionUnavailable as e:
                return False, str(e)
        return ok, why
    if name == "after" and dev.type != "cuda":
        return False, "torch.mm(..., out_dtype=float32) is CUDA-only (aten::mm.dtype has no CPU kernel)"
    if name == "upcast_tf32" and dev.type != "cuda":
        return False, "TF32 is a CUDA tensor-core mode; on CPU this would be upcast_fp32 again"
    return True, ""


# ---- shapes and inputs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmShape:
    """One bf16 x bf16 -> fp32 GEMM of a DSv4 layer: weight [n, k]."""

    name: str
    n: int
    k: int
    role: str


def gemm_shapes(preset: str = "flash") -> list[GemmShape]:
    """The preset's four fp32-output GEMMs: router [E, D], compressor fused_wkv_wgate of ratio-4 layers
    [2 * 2 * hd, D] (overlap doubles the width) and ratio-128 layers [2 * hd, D], indexer compressor
    [2 * 2 * d_I, D] (dsv4-layers.md 3.4)."""
    cfg = get_config(preset)
    d, hd, d_i = cfg.hidden_size, cfg.head_dim, cfg.index_head_dim
    return [
        GemmShape(f"router-{preset}", cfg.n_routed_experts, d, "MoE gate logits"),
        GemmShape(f"compressor-c4-{preset}", 2 * 2 * hd, d, "ratio-4 compressor kv+score"),
        GemmShape(f"compressor-c128-{preset}", 2 * hd, d, "ratio-128 compressor kv+score"),
        GemmShape(f"indexer-compressor-{preset}", 2 * 2 * d_i, d, "indexer compressor kv+score"),
    ]


def bench_shapes() -> list[GemmShape]:
    """The H100 sweep (refactors.md 2.d): the four V4-Flash GEMMs plus the V4-Pro router."""
    return gemm_shapes("flash") + gemm_shapes("pro")[:1]


def make_inputs(m: int, n: int, k: int, *, device: str | torch.device = "cpu", seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] with unit RMS (an RMS-normalised activation) and weight [n, k] ~ N(0, 1/k), both bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n, k, generator=g) / math.sqrt(k)
    return x.to(device, torch.bfloat16), weight.to(device, torch.bfloat16)


def make_bias(n_experts: int, *, device: str | torch.device = "cpu", seed: int = 1) -> torch.Tensor:
    """e_score_correction_bias: V4-Flash's biases all sit near 8.08 (a vLLM comment, dsv4-layers.md 4.1)."""
    g = torch.Generator().manual_seed(seed)
    return (8.08 + 1e-3 * torch.randn(n_experts, generator=g)).to(device)


@dataclass
class NearTieCase:
    x: torch.Tensor          # [m, k] bf16
    weight: torch.Tensor     # [n_experts, k] bf16
    bias: torch.Tensor       # [n_experts] fp32
    pair: tuple[int, int]    # (a, b): identical rows except one element; b is the true winner
    sure: tuple[int, ...]    # experts that take the other top-k slots
    logit_gap: float         # l_b - l_a, exactly, for every token


def near_tie_case(m: int, n_experts: int, k: int, *, top_k: int = 6, device: str | torch.device = "cpu",
                  seed: int = 0) -> NearTieCase:
    """Inputs on which bf16 rounding of the logits changes the top-k set and fp32 accumulation does not.

    Two expert rows a, b are equal except at column c0, where ``w_a = 0`` and ``w_b = 2^-11``; every token has
    ``x[c0] = 1``, so ``l_b - l_a = 2^-11`` exactly. Each token is steered (``x = z + sum gamma_e w_e / |w_e|^2``,
    z ~ N(0, 1)) so that ``top_k - 1`` experts have logits near 10, the pair near 6 and the rest ~ N(0, 1) (the
    steering rows are not orthogonal, which shifts these by a few tenths): the pair competes for the last slot. The bias gives a a head start of 2^-17 (8 fp32 ulps at 8.08), far below the score
    gap ``s'(l) * 2^-11 ~ 1e-4`` that makes b win with fp32 (or fp64) logits, but decisive when the two bf16
    logits coincide, which happens when both fall in one bf16 rounding interval (width 2^-5 at |l| in [4, 8),
    so with probability ~ 1 - 2^-11 / 2^-5 = 98%).
    """
    if top_k < 2 or n_experts < top_k + 2:
        raise ValueError(f"n_experts: expected >= top_k + 2 = {top_k + 2}, got {n_experts}")
    g = torch.Generator().manual_seed(seed)
    a, b, c0 = 0, 1, 0
    sure = tuple(range(2, 2 + top_k - 1))
    w = (torch.randn(n_experts, k, generator=g) / math.sqrt(k)).to(torch.bfloat16)
    w[b] = w[a]
    w[a, c0] = 0.0
    w[b, c0] = 2.0 ** -11
    w32 = w.float()
    steer = torch.zeros(n_experts)
    steer[list(sure)] = 10.0
    steer[a] = 6.0  # b gets the same pull: its row equals a's except at c0, which is overwritten below
    direction = (steer[:, None] * w32 / w32.pow(2).sum(1, keepdim=True)).sum(0)
    x = torch.randn(m, k, generator=g) + direction
    x[:, c0] = 1.0
    bias = 8.08 + 1e-3 * torch.randn(n_experts, generator=g)
    bias[b] = bias[a] - 2.0 ** -17
    return NearTieCase(x.to(device, torch.bfloat16), w.to(device), bias.to(device), (a, b), sure, 2.0 ** -11)


def select_experts(logits: torch.Tensor, bias: torch.Tensor, top_k: int = 6) -> torch.Tensor:
    """DSv4 selection ``topk(sqrt(softplus(logits)) + bias, top_k)`` via the MoE reference, ids [T, top_k]."""
    _, ids = route(logits.float(), k=top_k, routed_scaling_factor=1.0, bias=bias.float())
    return ids


def selection_scores(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sqrt(softplus(logits)) + bias`` in the logits' precision (fp64 for the oracle)."""
    return torch.sqrt(F.softplus(logits)) + bias.to(logits.dtype)


def flip_rate(ids_ref: torch.Tensor, ids: torch.Tensor) -> float:
    """Fraction of tokens whose top-k expert SET differs from the reference's."""
    if ids_ref.shape != ids.shape:
        raise ValueError(f"ids: expected shape {tuple(ids_ref.shape)}, got {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        return 0.0
    differs = (ids_ref.sort(-1).values != ids.to(ids_ref.device).sort(-1).values).any(-1)
    return float(differs.double().mean())


def error_stats(out: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor) -> dict[str, float]:
    """max |out - ref| / max |ref| (``max_rel``), and max |out - ref| / (fp32 accumulation bound) -- at most 1 for
    any fp32-accumulating path, about 2^-8 |y| / bound for a bf16-rounded output."""
    diff = (out.double() - ref64).abs()
    scale = ref64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return {"max_rel": float(diff.max() / scale) if diff.numel() else 0.0,
            "err_over_fp32_bound": float((diff / bound.clamp_min(1e-300)).max()) if diff.numel() else 0.0}


# ---- record helpers ---------------------------------------------------------------------------------
def _rec(variant: str, preset: str, tokens: int | None, metric: str, unit: str | None, value: Any,
         **extra: Any) -> dict[str, Any]:
    from ..lab import results

    return results.record(EXPERIMENT, OP, BACKEND.get(variant, "torch"), variant, preset, tokens, DTYPE,
                          metric, unit, value, **extra)


def _unavailable(variant: str, preset: str, reason: str, **extra: Any) -> dict[str, Any]:
    return _rec(variant, preset, None, "unavailable", None, None, reason=reason, **extra)


def _error(variant: str, preset: str, tokens: int | None, err: BaseException, **extra: Any) -> dict[str, Any]:
    return _rec(variant, preset, tokens, "error", None, None, message=f"{type(err).__name__}: {err}"[:2000], **extra)


# ---- measurements -------------------------------------------------------------------------------------
def numerics_records(shape: GemmShape, m: int, variants: list[str], *, device: str, preset: str,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Every variant vs the fp64 oracle (lab.numerics.compare, with ``before`` -- or the fp32 reference where
    ``before`` cannot run -- as the eager baseline), the fp32-bound ratio, and bitwise before == after."""
    from ..lab.numerics import compare

    x, w = make_inputs(m, shape.n, shape.k, device=device, seed=seed + 7919 * m + shape.n)  # fresh per case
    ref64 = oracle(x, w)
    bound = fp32_accumulation_bound(x, w)
    outs = {"reference": router_gemm(x, w)}
    recs: list[dict[str, Any]] = []
    common = dict(shape=shape.name, n=shape.n, k=shape.k, device=str(device))
    for v in variants:
        try:
            outs[v] = VARIANTS[v](x, w)
        except Exception as e:  # one failing variant must not hide the others
            recs.append(_error(v, preset, m, e, **common))
    eager_name = "before" if "before" in outs else "reference"
    for v, out in outs.items():
        c = compare(ref64, outs[eager_name], out)
        extra = dict(common, eager_variant=eager_name)
        recs += c.to_records(experiment=EXPERIMENT, op=OP, backend=BACKEND[v], variant=v, preset=preset,
                             tokens=m, dtype=DTYPE, **extra)
        for metric, value in error_stats(out, ref64, bound).items():
            recs.append(_rec(v, preset, m, metric, "1", value, **extra))
    if "before" in outs and "after" in outs:
        same = bool(torch.equal(outs["before"], outs["after"]))
        recs.append(_rec("after", preset, m, "bitwise_equal_before_after", "bool", same, **common))
    return recs


def routing_records(m: int, n_experts: int, k: int, variants: list[str], *, device: str, preset: str,
                    top_k: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """Top-k flip rate (tokens whose expert set differs from the fp64 oracle's) per variant, on random inputs
    and on ``near_tie_case`` inputs; plus the emulated bf16 shortcut (fp32 reference rounded to bf16)."""
    from ..lab.numerics import topk_overlap

    random_x, random_w = make_inputs(m, n_experts, k, device=device, seed=seed)
    tie = near_tie_case(m, n_experts, k, top_k=top_k, device=device, seed=seed)
    cases = {"random": (random_x, random_w, make_bias(n_experts, device=device)),
             "near_tie": (tie.x, tie.weight, tie.bias)}
    recs: list[dict[str, Any]] = []
    for case, (x, w, bias) in cases.items():
        ref_logits = oracle(x, w)
        scores = selection_scores(ref_logits, bias)          # fp64 selection scores
        ids_ref = scores.topk(top_k, dim=-1).indices
        logits = {"reference": router_gemm(x, w)}
        logits["bf16_emulated"] = round_logits_bf16(logits["reference"])
        for v in variants:
            try:
                logits[v] = VARIANTS[v](x, w)
            except Exception as e:
                recs.append(_error(v, preset, m, e, case=case))
        for v, lg in logits.items():
            ids = select_experts(lg, bias, top_k)
            ov = topk_overlap(ids_ref, ids, scores)
            extra = dict(case=case, n=n_experts, k=k, top_k=top_k, device=str(device),
                         mean_overlap=ov.mean_overlap, near_tie_fraction=ov.near_tie_fraction,
                         unexplained_rows=ov.unexplained_rows)
            recs.append(_rec(v, preset, m, "topk_flip_rate", "1", flip_rate(ids_ref, ids), **extra))
    return recs


def timing_records(shape: GemmShape, m: int, variants: list[str], *, device: str, preset: str,
                   graph: bool, kernels: bool = True, host: bool = False, peaks: Any = None, warmup: int = 5,
                   rep: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    """lab.timing.bench of each variant (CUDA-graph replay or eager events; cpu-clock on CPU), plus kernel
    names/counts when ``kernels`` and the host cost per call (lab.timing.host_overhead) when ``host``. Eager
    events time the GPU work only: the L2-flush memset before each call hides the launch behind it."""
    from ..lab import roofline, timing

    x, w = make_inputs(m, shape.n, shape.k, device=device, seed=seed)
    cost = roofline.cost("bf16_gemm_fp32_out", T=m, N=shape.n, K=shape.k)
    recs: list[dict[str, Any]] = []
    common = dict(shape=shape.name, n=shape.n, k=shape.k)
    for v in variants:
        fn = VARIANTS[v]
        try:
            t = timing.bench(lambda: fn(x, w), graph=graph, warmup=warmup, rep=rep, device=device)
            recs.append(t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op=OP, backend=BACKEND[v],
                                    variant=v, preset=preset, tokens=m, dtype=DTYPE, **common))
            if kernels:
                kc = timing.kernels_per_call(lambda: fn(x, w), device=device)
                recs.append(kc.to_record(experiment=EXPERIMENT, op=OP, backend=BACKEND[v], variant=v,
                                         preset=preset, tokens=m, dtype=DTYPE, **common))
            if host:
                us = timing.host_overhead(lambda: fn(x, w), n=100, device=device)
                recs.append(_rec(v, preset, m, "host_overhead", "us", us, **common))
        except Exception as e:
            recs.append(_error(v, preset, m, e, timing_mode="cuda-graph" if graph else "eager", **common))
    return recs


def _intervals_by_iteration(events: list[tuple[float, float]], gap_us: float) -> list[list[tuple[float, float]]]:
    groups: list[list[tuple[float, float]]] = []
    last_end = -math.inf
    for start, end in sorted(events):
        if start - last_end > gap_us:
            groups.append([])
        groups[-1].append((start, end))
        last_end = max(last_end, end)
    return groups


def overlap_stats(intervals: list[tuple[float, float]]) -> dict[str, float]:
    """For kernel intervals (start, end) in us: ``span`` = last end - first start, ``sum`` = sum of durations,
    ``busy`` = length of their union, ``overlap`` = sum / span (> 1 means kernels ran concurrently)."""
    ivs = sorted(intervals)
    span = ivs[-1][1] - ivs[0][0] if ivs else 0.0
    total = sum(e - s for s, e in ivs)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in ivs:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return {"span_us": span, "sum_us": total, "busy_us": busy, "overlap": total / span if span > 0 else 1.0,
            "kernels": len(ivs)}


def parallel_step(fn: Callable, main_input: tuple[torch.Tensor, torch.Tensor],
                  side_inputs: list[tuple[torch.Tensor, torch.Tensor]], side_streams: list) -> Callable[[], list]:
    """vLLM's ``execute_in_parallel`` pattern: one event on the main stream, each side stream waits on it and
    runs one GEMM, the main stream runs its own, then waits on every side stream (events to join)."""
    def step() -> list:
        main = torch.cuda.current_stream()
        start = torch.cuda.Event()
        start.record(main)
        outs = []
        for stream, (x, w) in zip(side_streams, side_inputs):
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                outs.append(fn(x, w))
        outs.append(fn(*main_input))
        for stream in side_streams:
            done = torch.cuda.Event()
            done.record(stream)
            main.wait_event(done)
        return outs
    return step


def overlap_records(m: int, variants: list[str], *, preset: str = "flash", iters: int = 5,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Three compressor/indexer GEMMs on side streams + the router GEMM on the main stream (CUDA only): the
    profiler timeline's union span of kernels vs the sum of kernel times, and the event-timed step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ..lab import timing

    shapes = gemm_shapes(preset)
    main_shape, side_shapes = shapes[0], shapes[1:]
    main_in = make_inputs(m, main_shape.n, main_shape.k, device="cuda", seed=seed)
    side_in = [make_inputs(m, s.n, s.k, device="cuda", seed=seed + 1 + i) for i, s in enumerate(side_shapes)]
    streams = [torch.cuda.Stream() for _ in side_shapes]
    recs: list[dict[str, Any]] = []
    common = dict(main=main_shape.name, side=[s.name for s in side_shapes], streams=1 + len(side_shapes))
    for v in variants:
        try:
            step = parallel_step(VARIANTS[v], main_in, side_in, streams)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    step()
                    torch.cuda.synchronize()
                    time.sleep(0.002)  # a host gap that separates the iterations on the GPU timeline
            kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA and "annotation" not in str(getattr(e, "activity_type", "")).lower()]
            per_iter = [overlap_stats(g) for g in _intervals_by_iteration(kernels, gap_us=1000.0)]
            per_iter.sort(key=lambda s: s["span_us"])
            mid = per_iter[len(per_iter) // 2]
            recs.append(_rec(v, preset, m, "stream_overlap", "x", mid["overlap"], span_us=mid["span_us"],
                             sum_us=mid["sum_us"], busy_us=mid["busy_us"], kernels=mid["kernels"],
                             iterations=len(per_iter), **common))
            t = timing.bench(step, graph=False, device="cuda")
            recs.append(t.to_record(experiment=EXPERIMENT, op=OP, backend=BACKEND[v], variant=v, preset=preset,
                                    tokens=m, dtype=DTYPE, case="parallel_step", **common))
        except Exception as e:
            recs.append(_error(v, preset, m, e, case="parallel_step", **common))
    return recs


# ---- entry point --------------------------------------------------------------------------------------
def run(device: str = "cpu", quick: bool = True, preset: str = "flash") -> list[dict]:
    """Before vs after on this device. Numerics and routing records always; lab.timing records for every variant
    that runs here; ``unavailable`` records (with the reason) for the others. On the CPU ``quick`` keeps it to a
    few seconds (two token counts, the router shape and the smallest compressor shape for timing)."""
    dev = torch.device(device)
    recs: list[dict[str, Any]] = []
    runnable: list[str] = []
    for v in VARIANTS:
        ok, why = variant_availability(v, dev)
        if ok:
            runnable.append(v)
        else:
            recs.append(_unavailable(v, preset, why, device=str(dev)))
    shapes = gemm_shapes(preset)
    if quick:
        tokens = (1, 32) if dev.type == "cpu" else (1, 64, 4096)
        timed_shapes = [shapes[0], shapes[3]]
    else:
        tokens = (1, 16, 128, 512) if dev.type == "cpu" else M_SWEEP
        timed_shapes = shapes
    for shape in shapes:
        for m in tokens:
            try:
                recs += numerics_records(shape, m, runnable, device=str(dev), preset=preset)
            except Exception as e:
                recs.append(_error("reference", preset, m, e, shape=shape.name))
    router = shapes[0]
    try:
        recs += routing_records(256 if quick else 1024, router.n, router.k, runnable, device=str(dev),
                                preset=preset, top_k=get_config(preset).num_experts_per_tok)
    except Exception as e:
        recs.append(_error("reference", preset, None, e, case="routing"))
    for shape in timed_shapes:
        for m in tokens:
            recs += timing_records(shape, m, runnable, device=str(dev), preset=preset, graph=False,
                                   kernels=dev.type == "cuda", warmup=2 if quick else 5, rep=5 if quick else 30)
            if dev.type == "cuda":
                recs += timing_records(shape, m, runnable, device=str(dev), preset=preset, graph=True,
                                       kernels=False)
    if dev.type == "cuda":
        for m in ((16,) if quick else (16, 1024, 8192)):
            recs += overlap_records(m, [v for v in ("before", "after") if v in runnable], preset=preset)
    return recs
