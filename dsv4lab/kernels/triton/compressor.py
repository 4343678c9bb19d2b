"""Triton: KV compressor pooling + RMSNorm + RoPE + fp8 nope round trip (dsv4-layers.md 3.4), prefill form.

Same contract as ``dsv4lab.kernels.reference.compressor.compress``; the two projections stay torch GEMMs
(``A = x @ wkv.T``, ``S = x @ wgate.T``, fp32 out) and the kernel does the rest from A and S:

    entry i, channel ch:  candidates u with (value A[t_u, col_u], score S[t_u, col_u] + ape[t_u % r, col_u])
        r = 128: t_u = 128 i + u, col_u = ch                         (u < 128)
        r = 4:   t_u = 4 i - 4 + u, col_u = ch + hd * (u >= 4)         (u < 8; t_u < 0 is absent)
    pooled = sum_u softmax_u(score) value                            (fp32, online over chunks of candidates)
    y = RoPE(RMSNorm(pooled; w), pos = i r)  -> bf16 (one rounding)
    fp8_nope: y[:nope] -> e4m3 with a power-of-two scale per 64 channels (amax floor 1e-4) -> back to bf16

One program pools one entry over a block of channels. When it owns the whole row (BLOCK_C = hd) it also
normalises, rotates and quantises; otherwise (few entries, e.g. ratio 128 at small T, where one program per
entry would leave most SMs idle) the pooled rows go through an fp32 workspace to a second, per-entry kernel.

Interpreter: its fp32 -> bf16 cast truncates and its e4m3 cast is wrong, so there the kernel rounds to the bf16
grid (RNE) and to the e4m3 grid with integer ops first (``SOFT_ROUND``); on the GPU the hardware casts round.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...quant import FP8_AMAX_FLOOR
from ..reference._attn_checks import ANY_FLOAT, check_inv_freq, check_tensor
from ..reference.compressor import FP8_KV_BLOCK, RATIOS
from .inv_rope_fp8_quant import _scale_bits, _to_e4m3

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # fixed when @triton.jit below runs
_TARGET_PROGRAMS = 264


@triton.jit
def _round_bf16(x, SOFT_ROUND: tl.constexpr):
    """fp32 -> nearest bf16 (ties to even), returned as bf16 (finite inputs)."""
    if SOFT_ROUND:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536       # 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _finish_row(pooled, entry, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, eps,
                HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, FP8_NOPE: tl.constexpr, QBLOCK: tl.constexpr,
                AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """RMSNorm(w) + GPT-J RoPE on the last ROPE_DIM channels + bf16 (+ fp8 nope round trip) of one pooled row."""
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    dims = tl.arange(0, HEAD_DIM)
    ms = tl.sum(pooled * pooled, axis=0) / HEAD_DIM
    y = pooled * tl.rsqrt(ms + eps) * tl.load(norm_w_ptr + dims).to(tl.float32)
    pair = tl.arange(0, HEAD_DIM // 2)
    rot_pair = pair >= NOPE // 2
    cos = tl.load(cos_ptr + entry * (ROPE_DIM // 2) + pair - NOPE // 2, mask=rot_pair, other=1.0)
    sin = tl.load(sin_ptr + entry * (ROPE_DIM // 2) + pair - NOPE // 2, mask=rot_pair, other=0.0)
    even, odd = tl.split(tl.reshape(y, (HEAD_DIM // 2, 2)))
    y = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (HEAD_DIM,))
    yb = _round_bf16(y, SOFT_ROUND)
    if FP8_NOPE:
        blocks = tl.reshape(yb.to(tl.float32), (HEAD_DIM // QBLOCK, QBLOCK))
        amax = tl.maximum(tl.max(tl.abs(blocks), axis=1), AMAX_FLOOR)
        scale, inv_scale = _scale_bits(amax)
        deq = _to_e4m3(blocks * inv_scale[:, None], SOFT_ROUND).to(tl.float32) * scale[:, None]
        is_nope = (tl.arange(0, HEAD_DIM // QBLOCK) < NOPE // QBLOCK)[:, None]
        yb = tl.reshape(tl.where(is_nope, deq, blocks), (HEAD_DIM,)).to(tl.bfloat16)   # exact: on the bf16 grid
    tl.store(out_ptr + entry * HEAD_DIM + dims, yb)


@triton.jit
def _compress_kernel(a_ptr, s_ptr, ape_ptr, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, stride_row, eps,
                     RATIO: tl.constexpr, OVERLAP: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr,
                     BLOCK_C: tl.constexpr, CHUNK: tl.constexpr, FINISH: tl.constexpr, FP8_NOPE: tl.constexpr,
                     QBLOCK: tl.constexpr, AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    N_CAND: tl.constexpr = 2 * RATIO if OVERLAP else RATIO
    FIRST: tl.constexpr = RATIO if OVERLAP else 0               # candidate u sits at token RATIO*i - FIRST + u
    entry = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for u0 in range(0, N_CAND, CHUNK):
        u = u0 + tl.arange(0, CHUNK)
        token = entry * RATIO - FIRST + u
        present = (token >= 0)[:, None]
        if OVERLAP:
            col = ch[None, :] + HEAD_DIM * (u >= RATIO).to(tl.int64)[:, None]
        else:
            col = ch[None, :] + 0 * u[:, None]
        value = tl.load(a_ptr + token[:, None] * stride_row + col, mask=present, other=0.0)
        score = tl.load(s_ptr + token[:, None] * stride_row + col, mask=present, other=0.0) \
            + tl.load(ape_ptr + (u % RATIO)[:, None] * stride_row + col)
        score = tl.where(present, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))             # finite: every chunk of a block has a token
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new[None, :])
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p * value, axis=0)
        m = m_new
    pooled = acc / l
    if FINISH:
        _finish_row(pooled, entry, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, eps, HEAD_DIM, ROPE_DIM, FP8_NOPE,
                    QBLOCK, AMAX_FLOOR, SOFT_ROUND)
    else:
        tl.store(pooled_ptr + entry * HEAD_DIM + ch, pooled)


@triton.jit
def _finish_kernel(pooled_ptr, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, eps,
                   HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, FP8_NOPE: tl.constexpr, QBLOCK: tl.constexpr,
                   AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    entry = tl.program_id(0).to(tl.int64)
    pooled = tl.load(pooled_ptr + entry * HEAD_DIM + tl.arange(0, HEAD_DIM))
    _finish_row(pooled, entry, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, eps, HEAD_DIM, ROPE_DIM, FP8_NOPE, QBLOCK,
                AMAX_FLOOR, SOFT_ROUND)


def compress_from_projections(A: torch.Tensor, S: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                              ratio: int, inv_freq: torch.Tensor, *, head_dim: int, eps: float = 1e-6,
                              fp8_nope: bool = False, block_c: int | None = None) -> torch.Tensor:
    """The fused part of ``compress``: fp32 projections ``A``, ``S`` [T, c*hd] -> entries [T // ratio, hd] bf16.

    ``block_c``: channels per pooling program (None: the whole row unless that leaves fewer than ~264 programs).
    """
    if ratio not in RATIOS:
        raise ValueError(f"ratio: expected one of {RATIOS}, got {ratio!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim: the Triton backend needs a power of two >= 16, got {head_dim!r}")
    width = (2 if ratio == 4 else 1) * head_dim
    check_tensor("A", A, dtypes=(torch.float32,), shape=(None, width))
    T = A.shape[0]
    check_tensor("S", S, dtypes=(torch.float32,), shape=(T, width))
    check_tensor("ape", ape, dtypes=ANY_FLOAT, shape=(ratio, width))
    check_tensor("norm_weight", norm_weight, dtypes=ANY_FLOAT, shape=(head_dim,))
    check_inv_freq(inv_freq, head_dim, "head_dim")
    rope = 2 * inv_freq.numel()
    nope = head_dim - rope
    if rope == 0 or rope & (rope - 1):
        raise ValueError(f"inv_freq: the Triton backend needs a power-of-two rope width, got {rope}")
    if fp8_nope and nope % FP8_KV_BLOCK:
        raise ValueError(f"head_dim: fp8_nope needs the nope part ({nope}) to be a multiple of {FP8_KV_BLOCK}")
    if A.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"A: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {A.device}")
    n = T // ratio
    out = torch.empty(n, head_dim, dtype=torch.bfloat16, device=A.device)
    if n == 0:
        return out
    A, S = A.contiguous(), S.contiguous()
    ape32 = ape.to(torch.float32).contiguous()
    entry_pos = torch.arange(n, device=A.device, dtype=torch.float32) * ratio
    ang = entry_pos[:, None] * inv_freq.to(A.device, torch.float32)[None, :]     # as rope.rope_cos_sin
    cos, sin = torch.cos(ang).contiguous(), torch.sin(ang).contiguous()
    if block_c is None:
        block_c = head_dim
        while n * (head_dim // block_c) < _TARGET_PROGRAMS and block_c > 64:
            block_c //= 2
    if block_c > head_dim or head_dim % block_c or block_c & (block_c - 1):
        raise ValueError(f"block_c: expected a power-of-two divisor of head_dim={head_dim}, got {block_c}")
    finish = block_c == head_dim
    pooled = out if finish else torch.empty(n, head_dim, dtype=torch.float32, device=A.device)
    common = dict(HEAD_DIM=head_dim, ROPE_DIM=rope, FP8_NOPE=bool(fp8_nope and nope), QBLOCK=FP8_KV_BLOCK,
                  AMAX_FLOOR=FP8_AMAX_FLOOR, SOFT_ROUND=_INTERPRETED)
    chunk = 8 if ratio == 4 else 16
    _compress_kernel[(n, head_dim // block_c)](
        A, S, ape32, norm_weight, cos, sin, out, pooled, A.stride(0), float(eps), RATIO=ratio, OVERLAP=ratio == 4,
        BLOCK_C=block_c, CHUNK=chunk, FINISH=finish, num_warps=4 if block_c <= 256 else 8, **common)
    if not finish:
        _finish_kernel[(n,)](pooled, norm_weight, cos, sin, out, float(eps), num_warps=4, **common)
    return out


def _mm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with bf16 operands and an fp32 result (torch's out_dtype GEMM on CUDA; fp32 upcast on CPU)."""
    if x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
        return torch.mm(x, w.T, out_dtype=torch.float32)
    return x.float() @ w.float().T


def compress(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
             norm_weight: torch.Tensor, ratio: int, inv_freq: torch.Tensor, *, head_dim: int,
             eps: float = 1e-6, fp8_nope: bool = False) -> torch.Tensor:
    """Triton backend of ``compressor``: entries [T // ratio, head_dim] bf16 (contract: the reference ``compress``).

    The projections run as two fp32-output GEMMs over the first ``(T // ratio) * ratio`` tokens, then
    ``compress_from_projections``.
    """
    check_tensor("x", x, ndim=2)
    if ratio not in RATIOS:
        raise ValueError(f"ratio: expected one of {RATIOS} (0 = window-only layers have no compressor), got {ratio!r}")
    T, D = x.shape
    width = (2 if ratio == 4 else 1) * head_dim if isinstance(head_dim, int) else None
    check_tensor("wkv", wkv, shape=(width, D))
    check_tensor("wgate", wgate, shape=(width, D))
    used = x[: (T // ratio) * ratio]
    return compress_from_projections(_mm_f32(used, wkv), _mm_f32(used, wgate), ape, norm_weight, ratio, inv_freq,
                                     head_dim=head_dim, eps=eps, fp8_nope=fp8_nope)
