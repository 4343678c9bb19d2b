"""Triton: indexer Q RoPE + fp8 e4m3 quant with the per-(token, head) scale folded into the head weights.

Same contract and bits as ``dsv4lab.kernels.reference.indexer_q.indexer_q_rope_quant`` (dsv4-layers.md 3.5):
y = bf16(RoPE(q)), scale = 2^ceil(log2(max(amax_h(y), 1e-4) / 448)), q8 = e4m3(y / scale),
w_out = w * scale * d_I^-0.5 * n_I^-0.5. One program = one token x a tile of heads [HEADS, d_I]; the GPT-J
pairs are split/joined in registers; cos/sin come from the caller's fp32 table (as ``rope.rope_cos_sin``).
Bitwise agreement rests on: no FMA contraction (torch rounds e*c and o*s before the sum), the exact pow2 scale
from the amax bits, and RNE casts (software-rounded to the bf16 / e4m3 grids under the interpreter, whose casts
truncate or misround).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...quant import FP8_AMAX_FLOOR
from ..reference._attn_checks import ANY_FLOAT, check_inv_freq, check_positions, check_tensor
from .compressor import _round_bf16
from .inv_rope_fp8_quant import _scale_bits, _to_e4m3

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_TILE_ELEMENTS = 2048


@triton.jit
def _indexer_q_kernel(q_ptr, pos_ptr, cos_ptr, sin_ptr, w_ptr, q8_ptr, w_out_ptr, n_heads, weight_scale,
                      HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, HEADS: tl.constexpr,
                      AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    h_ok = heads < n_heads
    dims = tl.arange(0, HEAD_DIM)
    offs = (token * n_heads + heads.to(tl.int64))[:, None] * HEAD_DIM + dims[None, :]
    x = tl.load(q_ptr + offs, mask=h_ok[:, None], other=0.0).to(tl.float32)
    pair = tl.arange(0, HEAD_DIM // 2)
    rot = pair >= NOPE // 2
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * (ROPE_DIM // 2) + pair - NOPE // 2, mask=rot, other=1.0)[None, :]
    sin = tl.load(sin_ptr + pos * (ROPE_DIM // 2) + pair - NOPE // 2, mask=rot, other=0.0)[None, :]
    even, odd = tl.split(tl.reshape(x, (HEADS, HEAD_DIM // 2, 2)))
    y = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (HEADS, HEAD_DIM))
    y = _round_bf16(y, SOFT_ROUND).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), AMAX_FLOOR)
    scale, inv_scale = _scale_bits(amax)
    tl.store(q8_ptr + offs, _to_e4m3(y * inv_scale[:, None], SOFT_ROUND), mask=h_ok[:, None])
    w = tl.load(w_ptr + token * n_heads + heads, mask=h_ok, other=0.0).to(tl.float32)
    tl.store(w_out_ptr + token * n_heads + heads, w * scale * weight_scale, mask=h_ok)


def indexer_q_rope_quant(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``indexer_q_rope_quant``: q [T, n_I, d_I] bf16 -> (q8 e4m3, w_out fp32 [T, n_I]).

    Input contract: as the reference, plus d_I and the rope width powers of two; positions index a cos/sin
    table of max(positions)+1 rows built here (range-checked on CPU tensors only)."""
    check_tensor("q", q, dtypes=(torch.bfloat16,), ndim=3)
    T, n_heads, head_dim = q.shape
    check_positions(positions, T)
    check_inv_freq(inv_freq, head_dim, "index_head_dim")
    check_tensor("weights", weights, dtypes=ANY_FLOAT, shape=(T, n_heads))
    rope = 2 * inv_freq.numel()
    if head_dim & (head_dim - 1) or rope == 0 or rope & (rope - 1):
        raise ValueError(f"q: the Triton backend needs power-of-two d_I and rope width, got {head_dim}, {rope}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"q: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    q8 = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
    w_out = torch.empty(T, n_heads, dtype=torch.float32, device=q.device)
    if T == 0 or n_heads == 0:
        return q8, w_out
    if positions.device.type == "cpu" and int(positions.min()) < 0:
        raise ValueError("positions: expected non-negative positions")
    n_pos = int(positions.max()) + 1
    ang = torch.arange(n_pos, device=q.device, dtype=torch.float32)[:, None] * inv_freq.to(q.device, torch.float32)
    cos, sin = torch.cos(ang).contiguous(), torch.sin(ang).contiguous()
    heads = max(1, min(triton.next_power_of_2(n_heads), _TILE_ELEMENTS // head_dim))
    _indexer_q_kernel[(T, triton.cdiv(n_heads, heads))](
        q.contiguous(), positions.contiguous(), cos, sin, weights.contiguous(), q8, w_out, n_heads,
        head_dim ** -0.5 * n_heads ** -0.5, HEAD_DIM=head_dim, ROPE_DIM=rope, HEADS=heads,
        AMAX_FLOOR=FP8_AMAX_FLOOR, SOFT_ROUND=_INTERPRETED, num_warps=4, enable_fp_fusion=False)
    return q8, w_out
