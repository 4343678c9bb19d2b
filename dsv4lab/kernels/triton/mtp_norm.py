"""Fused RMSNorms of the DSv4 MTP layer (vLLM #43746): the MTP-input norms and the shared-head norm.

``fused_mtp_input_rmsnorm`` (one launch, grid ``(T, n + 1)``), per token ``t``:
    program (t, 0):     e[t]    = RMSNorm(where(pos[t] == 0, 0, embed[t]); enorm_weight)
    program (t, k + 1): h[t, k] = RMSNorm(prev[t, k]; hnorm_weight)          k = 0 .. n-1
``mtp_shared_head_rmsnorm`` (grid ``(T,)``): out[t] = RMSNorm(h[t]; weight).

RMSNorm of a row ``x`` of length D, all math in fp32 (``x32 = float(x)``, ``r = rsqrt(sum(x32^2) / D + eps)``):
    one rounding (default, what the #43746 kernels do):  out = round(x32 * r * float(w))
    two_rounding=True (vLLM's eager RMSNorm):            out = round(float(round(x32 * r)) * float(round(w)))
where ``round`` casts to the input's dtype. A masked embedding row is all zeros (its RMS is 0; eps keeps ``r``
finite), so its output is exactly zero for any weight.

Rows of up to ``MAX_BLOCK`` elements are normalised from registers in one pass; longer rows loop over chunks
(a sum-of-squares pass, then a normalise pass that re-reads the row). Row offsets are int64, so T * n * D may
exceed 2^31.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from dsv4lab.kernels.triton._launch import CachedLauncher

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT_DTYPES = (torch.int32, torch.int64)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # fixed when the @triton.jit kernels below are defined
MAX_BLOCK = 16384     # longest row held in registers at once; beyond it the chunked two-pass loop runs
CHUNK_BLOCK = 4096    # chunk length of the two-pass loop
# warps per program = BLOCK / (32 * values_per_thread), clamped to [1, max_warps]. At T <= small_tokens the
# kernel is latency-bound (a few rows, ~5 us graph-replay floor) and more warps per row finish sooner: on the H100
# (data/results/h100/pr43746_mtp_norm.jsonl, variant after[vpt=8]) D=4096 at T=1/64 took 5.1/5.3 us with 16 warps
# against 6.0/5.9 us with 8, while at T >= 1024 8 warps were faster (9.2 vs 11.3 us). The bench sweeps num_warps.
# stream_hints: L2 eviction hints on the loads (off until the bench's sweep shows a gain; torch.compile's kernels use them)
TUNING = {"values_per_thread": 16, "small_values_per_thread": 8, "small_tokens": 64, "max_warps": 16,
          "stream_hints": False}


@triton.jit
def _rmsnorm_row(x_ptr, w_ptr, out_ptr, D, eps, zero_row,
                 BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, TWO_ROUNDING: tl.constexpr,
                 X_EVICT: tl.constexpr, W_EVICT: tl.constexpr):
    """RMSNorm of one row of length D; ``zero_row`` replaces the input by zeros (the position-0 mask).
    ``X_EVICT`` / ``W_EVICT``: L2 eviction hints of the row and weight loads ("" = none)."""
    x_dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        in_row = offs < D
        x = tl.load(x_ptr + offs, mask=in_row, other=0.0, eviction_policy=X_EVICT).to(tl.float32)
        x = tl.where(zero_row, 0.0, x)
        rrms = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=in_row, other=0.0, eviction_policy=W_EVICT)
        if TWO_ROUNDING:
            y = (x * rrms).to(x_dtype).to(tl.float32) * w.to(x_dtype).to(tl.float32)
        else:
            y = x * rrms * w.to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=in_row)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            x = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
            x = tl.where(zero_row, 0.0, x)
            sum_sq += x * x
        rrms = tl.rsqrt(tl.sum(sum_sq, axis=0) / D + eps)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            in_row = cols < D
            x = tl.load(x_ptr + cols, mask=in_row, other=0.0, eviction_policy=X_EVICT).to(tl.float32)
            x = tl.where(zero_row, 0.0, x)
            w = tl.load(w_ptr + cols, mask=in_row, other=0.0, eviction_policy=W_EVICT)
            if TWO_ROUNDING:
                y = (x * rrms).to(x_dtype).to(tl.float32) * w.to(x_dtype).to(tl.float32)
            else:
                y = x * rrms * w.to(tl.float32)
            tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _mtp_input_rmsnorm_kernel(embed_ptr, pos_ptr, prev_ptr, enorm_w_ptr, hnorm_w_ptr, e_out_ptr, h_out_ptr,
                              D, eps, HC_MULT: tl.constexpr,
                              BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, TWO_ROUNDING: tl.constexpr,
                              X_EVICT: tl.constexpr, W_EVICT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    if k == 0:
        masked = tl.load(pos_ptr + t) == 0
        _rmsnorm_row(embed_ptr + t * D, enorm_w_ptr, e_out_ptr + t * D, D, eps, masked,
                     BLOCK, NUM_CHUNKS, TWO_ROUNDING, X_EVICT, W_EVICT)
    else:
        row = t * HC_MULT + (k - 1)
        _rmsnorm_row(prev_ptr + row * D, hnorm_w_ptr, h_out_ptr + row * D, D, eps, False,
                     BLOCK, NUM_CHUNKS, TWO_ROUNDING, X_EVICT, W_EVICT)


@triton.jit
def _shared_head_rmsnorm_kernel(h_ptr, w_ptr, out_ptr, D, eps,
                                BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, TWO_ROUNDING: tl.constexpr,
                                X_EVICT: tl.constexpr, W_EVICT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _rmsnorm_row(h_ptr + t * D, w_ptr, out_ptr + t * D, D, eps, False, BLOCK, NUM_CHUNKS, TWO_ROUNDING,
                 X_EVICT, W_EVICT)


# ---- input contract -----------------------------------------------------------------------------------
def _check_float(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype bfloat16, float16 or float32, got {x.dtype}")


def _check_contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(x.stride())} "
                         f"for shape {tuple(x.shape)} (call .contiguous() first)")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    eps = float(eps)
    # eps > 0 keeps a masked (all-zero) row finite: rsqrt(0 + eps) * 0 = 0
    if not (0.0 < eps < float("inf")):
        raise ValueError(f"eps: expected a finite value > 0, got {eps}")
    return eps


def _check_device(named: dict[str, torch.Tensor]) -> torch.device:
    # plain loop, no comprehensions: this runs on every call of a ~5 us kernel (eager cost is host cost)
    first = None
    for t in named.values():
        if first is None:
            first = t.device
        elif t.device != first:
            raise ValueError("all tensors must be on one device, got {"
                             + ", ".join(f"{k}: {v.device}" for k, v in named.items()) + "}")
    if first.type != "cuda" and not _INTERPRET:
        raise ValueError(f"tensors are on {first}: the Triton kernel needs a CUDA device, or TRITON_INTERPRET=1 "
                         "set before triton kernels are defined (to run under the interpreter)")
    return first


def _check_weight(name: str, w, D: int) -> None:
    _check_float(name, w)
    if tuple(w.shape) != (D,):
        raise ValueError(f"{name}: expected shape ({D},), got {tuple(w.shape)}")
    _check_contiguous(name, w)


def check_mtp_input(embed, positions, prev, enorm_weight, hnorm_weight, eps) -> tuple[int, int, int, float]:
    """Validate the inputs of ``fused_mtp_input_rmsnorm``; returns ``(T, hc_mult, D, eps)``."""
    _check_float("embed", embed)
    if embed.dim() != 2 or embed.shape[1] == 0:
        raise ValueError(f"embed: expected shape [T, D] with D >= 1, got {tuple(embed.shape)}")
    T, D = embed.shape
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions: expected a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in INT_DTYPES:
        raise TypeError(f"positions: expected dtype int32 or int64, got {positions.dtype}")
    if tuple(positions.shape) != (T,):
        raise ValueError(f"positions: expected shape ({T},) (one per token of embed), got {tuple(positions.shape)}")
    _check_float("prev", prev)
    if prev.dtype != embed.dtype:
        raise TypeError(f"prev: expected the dtype of embed ({embed.dtype}), got {prev.dtype}")
    if prev.dim() == 2:
        if prev.shape[0] != T or prev.shape[1] == 0 or prev.shape[1] % D != 0:
            raise ValueError(f"prev: expected shape [T, hc_mult*D] = [{T}, k*{D}] with k >= 1, "
                             f"got {tuple(prev.shape)}")
        hc_mult = prev.shape[1] // D
    elif prev.dim() == 3:
        if prev.shape[0] != T or prev.shape[2] != D or prev.shape[1] == 0:
            raise ValueError(f"prev: expected shape [T, hc_mult, D] = [{T}, k, {D}] with k >= 1, "
                             f"got {tuple(prev.shape)}")
        hc_mult = prev.shape[1]
    else:
        raise ValueError(f"prev: expected 2 or 3 dims ([T, hc_mult*D] or [T, hc_mult, D]), got {tuple(prev.shape)}")
    _check_weight("enorm_weight", enorm_weight, D)
    _check_weight("hnorm_weight", hnorm_weight, D)
    eps = _check_eps(eps)
    for name, t in (("embed", embed), ("positions", positions), ("prev", prev)):
        _check_contiguous(name, t)
    _check_device({"embed": embed, "positions": positions, "prev": prev,
                   "enorm_weight": enorm_weight, "hnorm_weight": hnorm_weight})
    return T, hc_mult, D, eps


def check_shared_head(h, weight, eps) -> tuple[int, int, float]:
    """Validate the inputs of ``mtp_shared_head_rmsnorm``; returns ``(T, D, eps)``."""
    _check_float("h", h)
    if h.dim() != 2 or h.shape[1] == 0:
        raise ValueError(f"h: expected shape [T, D] with D >= 1, got {tuple(h.shape)}")
    T, D = h.shape
    _check_weight("weight", weight, D)
    eps = _check_eps(eps)
    _check_contiguous("h", h)
    _check_device({"h": h, "weight": weight})
    return T, D, eps


# ---- launchers ----------------------------------------------------------------------------------------
# at decode sizes these kernels run ~5 us: the host path of the launch is most of the eager cost (see _launch)
_launch_input = CachedLauncher(_mtp_input_rmsnorm_kernel)
_launch_shared_head = CachedLauncher(_shared_head_rmsnorm_kernel)


def launch_config(D: int, T: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK, NUM_CHUNKS, num_warps)`` for ``T`` rows of length ``D`` (``T=None``: the large-T setting)."""
    small = T is not None and T <= TUNING["small_tokens"]
    vpt = TUNING["small_values_per_thread"] if small else TUNING["values_per_thread"]
    return _launch_config(D, MAX_BLOCK, CHUNK_BLOCK, vpt, TUNING["max_warps"])


_FORCED: dict = {"num_warps": None, "stream_hints": None}


@contextlib.contextmanager
def forced_launch(num_warps: int | None = None, stream_hints: bool | None = None):
    """Inside the block, launch both kernels with ``num_warps`` instead of ``launch_config``'s choice and/or with
    ``stream_hints`` instead of ``TUNING["stream_hints"]`` (rows loaded evict-first, the weight evict-last); for
    sweeps, the values do not change. A CUDA graph captured inside keeps the setting it was captured with."""
    if num_warps is not None and (isinstance(num_warps, bool) or not isinstance(num_warps, int)
                                  or num_warps not in (1, 2, 4, 8, 16, 32)):
        raise ValueError(f"num_warps: expected None or a power of two in [1, 32], got {num_warps!r}")
    if stream_hints is not None and not isinstance(stream_hints, bool):
        raise TypeError(f"stream_hints: expected None or a bool, got {type(stream_hints).__name__}")
    saved = dict(_FORCED)
    _FORCED.update(num_warps=num_warps, stream_hints=stream_hints)
    try:
        yield
    finally:
        _FORCED.update(saved)


def _evict() -> tuple[str, str]:
    hints = TUNING["stream_hints"] if _FORCED["stream_hints"] is None else _FORCED["stream_hints"]
    # Each row is read once per call and the weight by every program: keep the weight, let the rows go first
    return ("evict_first", "evict_last") if hints else ("", "")


@functools.lru_cache(maxsize=None)
def _launch_config(D: int, max_block: int, chunk_block: int, values_per_thread: int,
                   max_warps: int) -> tuple[int, int, int]:
    block = triton.next_power_of_2(D)
    if block <= max_block:
        num_chunks = 1
    else:
        block = chunk_block
        num_chunks = triton.cdiv(D, block)
    num_warps = max(1, min(max_warps, block // (32 * values_per_thread)))
    return block, num_chunks, num_warps


def fused_mtp_input_rmsnorm(embed: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor,
                            enorm_weight: torch.Tensor, hnorm_weight: torch.Tensor, eps: float = 1e-6, *,
                            two_rounding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-0 mask + enorm of ``embed [T, D]`` and hnorm of each of the ``hc_mult`` streams of ``prev``.

    ``prev`` is ``[T, hc_mult*D]`` or ``[T, hc_mult, D]``. Returns new tensors ``(e [T, D], h [T, hc_mult, D])``
    in the dtype of ``embed`` (``prev`` must share it; weights may be bf16/fp16/fp32). One kernel launch,
    grid ``(T, hc_mult + 1)``; see the module docstring for the math and ``two_rounding``.
    """
    T, hc_mult, D, eps = check_mtp_input(embed, positions, prev, enorm_weight, hnorm_weight, eps)
    e_out = torch.empty((T, D), dtype=embed.dtype, device=embed.device)
    h_out = torch.empty((T, hc_mult, D), dtype=prev.dtype, device=prev.device)
    if T == 0:
        return e_out, h_out
    block, num_chunks, warps = launch_config(D, T)
    _launch_input((T, hc_mult + 1, 1), embed.device,
                  (embed, positions, prev, enorm_weight, hnorm_weight, e_out, h_out, D, eps,
                   hc_mult, block, num_chunks, bool(two_rounding), *_evict()), _FORCED["num_warps"] or warps)
    return e_out, h_out


def mtp_shared_head_rmsnorm(h: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                            two_rounding: bool = False) -> torch.Tensor:
    """RMSNorm of each row of ``h [T, D]`` with ``weight [D]``: the MTP shared-head norm. One launch, grid ``(T,)``."""
    T, D, eps = check_shared_head(h, weight, eps)
    out = torch.empty((T, D), dtype=h.dtype, device=h.device)
    if T == 0:
        return out
    block, num_chunks, warps = launch_config(D, T)
    _launch_shared_head((T, 1, 1), h.device,
                        (h, weight, out, D, eps, block, num_chunks, bool(two_rounding), *_evict()),
                        _FORCED["num_warps"] or warps)
    return out
