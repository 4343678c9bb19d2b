"""Triton: inverse RoPE + per-(token, 128-chunk) fp8 e4m3 quant of the attention output (dsv4-layers.md 3.7).

Same contract and the same bits as ``dsv4lab.kernels.reference.attn_out.inv_rope_fp8_quant``:

    y     = o with (e, o) -> (e c + o s, o c - e s) on the last rope_dim channels of each head   (fp32)
    scale = 2^ceil(log2(max(amax_128(y), 1e-10) / 448))      fp32, one per (token, 128-chunk)
    q     = e4m3_rne(y / scale)

One program = one token x a block of heads, as two tiles: the nope channels as rows of rope_dim lanes (a row is
entirely nope or entirely rope, so masks are per row and loads/stores vectorise) and the rope channels
[heads, rope_dim], whose GPT-J partner (lane ^ 1) is a second, cached load; so the rotation math runs on the rope
lanes only, and the last chunk's amax combines both tiles. (The first version rotated every element, selected afterwards and always ran the
software rounding below: ~48 % of the H100 copy bandwidth at T >= 4096, instruction bound.)

Bitwise agreement with torch rests on:
- cos/sin from the caller's fp32 table (no in-kernel cos);
- fp-fusion off at launch, so ``e*c + o*s`` is two rounded products and a rounded sum, as in torch;
- no fp32 division: the scale exponent comes from the amax bits (amax = 1.m * 2^e gives
  ceil(log2(amax/448)) = e - 8 + (1.m > 1.75), since 448 = 1.75 * 2^8) and 1/scale is built from bits too;
- round-to-nearest-even into e4m3. On the GPU that is the hardware cast (``cvt.rn.satfinite.e4m3x2.f32``). The
  interpreter's own fp32 -> fp8e4nv cast is wrong (triton 3.6: ties round away from zero, and a mantissa carry is
  dropped, so 125.95 becomes 64 instead of 128) while exactly representable values convert exactly, so under the
  interpreter the kernel rounds to the e4m3 grid with integer ops first (``SOFT_ROUND``); on the GPU those ~15
  integer ops per element would cost bandwidth, so they are compiled out.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference.attn_out import ATTN_OUT_AMAX_FLOOR, QUANT_BLOCK, check_inv_rope_args

# tile_elements per program (4096 = 8 DSv4 heads, 8 KiB of bf16 in) amortises the per-program reductions;
# the H100 bench sweeps these (bench/pr43891_op_registration.py) and the default is the best it measured
# H100 (data/results/h100/pr43891_op_registration.jsonl, variant tile<E>-w<W>): 2048 / 2 warps had the best
# worst case over Flash/Pro x T in {4096, 16384} (80.3 % of copy BW; 4096 / 4 warps: 78.8 %)
TUNING = {"tile_elements": 2048, "num_warps": 2}
# no FMA contraction: torch rounds e*c and o*s before adding them (tests AOT-compile with these to sm_90a)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # fixed when @triton.jit below runs


@triton.jit
def _round_to_e4m3_grid(x):
    """Nearest e4m3 value of fp32 ``x`` (|x| <= 448), ties to even, as an exact fp32 value (sign kept on 0)."""
    bits = x.to(tl.int32, bitcast=True)
    sign = bits & -2147483648                          # 0x80000000
    exp_field = (bits >> 23) & 0xFF
    significand = (bits & 0x7FFFFF) | 0x800000         # 24 bits; fp32 zero/denormal handled by the shift clamp
    e = exp_field - 127
    quantum_exp = tl.maximum(e, -6) - 3                # e4m3: 3 mantissa bits, min normal exponent -6
    shift = tl.minimum(20 + tl.maximum(-6 - e, 0), 25)  # >= 25 drops everything (significand < 2^24)
    odd = (significand >> shift) & 1
    q = (significand + (1 << (shift - 1)) - 1 + odd) >> shift   # round half to even on the dropped bits
    pow2 = ((quantum_exp + 127) << 23).to(tl.float32, bitcast=True)
    mag = q.to(tl.float32) * pow2                      # q <= 16: exact
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _scale_bits(amax):
    """(scale, 1/scale) = 2^k, 2^-k with k = ceil(log2(amax / 448)), exactly (amax >= 1e-10 is a normal fp32)."""
    bits = amax.to(tl.int32, bitcast=True)
    k = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    return ((k + 127) << 23).to(tl.float32, bitcast=True), ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3(x, SOFT_ROUND: tl.constexpr):
    """RNE cast of fp32 ``x`` to e4m3. No clamp needed: |x| <= amax / scale <= 448 by the choice of scale (and the
    hardware cast saturates anyway)."""
    if SOFT_ROUND:
        x = _round_to_e4m3_grid(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _inv_rope_fp8_quant_kernel(o_ptr, pos_ptr, cs_ptr, q_ptr, scale_ptr,
                               stride_ot, stride_oh, n_heads,
                               HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, HEADS: tl.constexpr,
                               CHUNKS: tl.constexpr, AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    N_CHUNKS: tl.constexpr = HEAD_DIM // 128          # chunks per head; CHUNKS = its next power of two
    SUB: tl.constexpr = 128 // ROPE_DIM               # rows of ROPE_DIM lanes per 128-chunk
    ROWS: tl.constexpr = CHUNKS * SUB                 # rows per head (padded); the head's last row is its rope
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    token = tl.program_id(0).to(tl.int64)
    head0 = tl.program_id(1) * HEADS
    lane = tl.arange(0, ROPE_DIM)

    # nope channels as rows of ROPE_DIM lanes; a row is all nope or all rope, so masks are per row (vector loads)
    row = tl.arange(0, HEADS * ROWS)
    head = (head0 + row // ROWS).to(tl.int64)
    nope_row = ((head < n_heads) & (row % ROWS < NOPE // ROPE_DIM))[:, None]
    offs = (head * stride_oh + (row % ROWS) * ROPE_DIM)[:, None] + lane[None, :]
    x = tl.load(o_ptr + token * stride_ot + offs, mask=nope_row, other=0.0).to(tl.float32)
    amax = tl.max(tl.reshape(tl.max(tl.abs(x), axis=1), (HEADS, CHUNKS, SUB)), axis=2)   # [HEADS, CHUNKS]

    # rope channels [HEADS, ROPE_DIM], rotated by -theta; the GPT-J partner (lane ^ 1) is a second, cached load
    rh = (head0 + tl.arange(0, HEADS)).to(tl.int64)
    rh_ok = (rh < n_heads)[:, None]
    rope_src = o_ptr + token * stride_ot + (rh * stride_oh + NOPE)[:, None]
    v = tl.load(rope_src + lane[None, :], mask=rh_ok, other=0.0).to(tl.float32)
    partner = tl.load(rope_src + (lane ^ 1)[None, :], mask=rh_ok, other=0.0).to(tl.float32)
    cs_row = cs_ptr + tl.load(pos_ptr + token).to(tl.int64) * ROPE_DIM
    cos = tl.load(cs_row + lane // 2)[None, :]
    sin = tl.load(cs_row + ROPE_DIM // 2 + lane // 2)[None, :]
    v_cos = v * cos
    partner_sin = partner * sin
    rot = tl.where((lane % 2 == 0)[None, :], v_cos + partner_sin, v_cos - partner_sin)

    # scales: the last chunk's amax also covers the rope lanes
    is_last = (tl.arange(0, CHUNKS) == N_CHUNKS - 1)[None, :]
    amax = tl.where(is_last, tl.maximum(amax, tl.max(tl.abs(rot), axis=1)[:, None]), amax)
    scale, inv_scale = _scale_bits(tl.maximum(amax, AMAX_FLOOR))          # [HEADS, CHUNKS]
    row_inv_scale = tl.reshape(tl.broadcast_to(inv_scale[:, :, None], (HEADS, CHUNKS, SUB)), (HEADS * ROWS,))
    rope_inv_scale = tl.sum(tl.where(is_last, inv_scale, 0.0), axis=1)[:, None]

    dst = q_ptr + token * n_heads * HEAD_DIM
    tl.store(dst + (head * HEAD_DIM + (row % ROWS) * ROPE_DIM)[:, None] + lane[None, :],
             _to_e4m3(x * row_inv_scale[:, None], SOFT_ROUND), mask=nope_row)
    tl.store(dst + (rh * HEAD_DIM + NOPE)[:, None] + lane[None, :], _to_e4m3(rot * rope_inv_scale, SOFT_ROUND),
             mask=rh_ok)
    chunk = tl.arange(0, CHUNKS)[None, :]
    tl.store(scale_ptr + (token * n_heads + rh)[:, None] * N_CHUNKS + chunk, scale,
             mask=rh_ok & (chunk < N_CHUNKS))


def inv_rope_fp8_quant(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``inv_rope_fp8_quant``: o [T, H, d] -> (e4m3 [T, H*d], fp32 scales [T, H*d/128]).

    Input contract: ``check_inv_rope_args`` (o float with a contiguous last axis, d % 128 == 0; o may be a head slice
    of a padded buffer; positions [T] int; cos_sin_cache fp32 contiguous [P, rope_dim <= 128]; CUDA tensors unless
    running under the interpreter) plus rope_dim a power of two. Positions are range-checked on CPU only.
    """
    rope_dim = check_inv_rope_args(o, positions, cos_sin_cache)
    if rope_dim & (rope_dim - 1):   # rows of rope_dim lanes tile each 128-chunk
        raise ValueError(f"cos_sin_cache: the Triton backend needs a power-of-two rope_dim, got {rope_dim}")
    if o.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"o: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {o.device}")
    t, h, d = o.shape
    q = torch.empty((t, h * d), dtype=torch.float8_e4m3fn, device=o.device)
    scale = torch.empty((t, h * d // QUANT_BLOCK), dtype=torch.float32, device=o.device)
    if t == 0 or h == 0:
        return q, scale
    chunks = triton.next_power_of_2(d // QUANT_BLOCK)
    heads = max(1, min(triton.next_power_of_2(h), TUNING["tile_elements"] // (chunks * QUANT_BLOCK)))
    grid = (t, triton.cdiv(h, heads))
    _inv_rope_fp8_quant_kernel[grid](
        o, positions, cos_sin_cache, q, scale, o.stride(0), o.stride(1), h,
        HEAD_DIM=d, ROPE_DIM=rope_dim, HEADS=heads, CHUNKS=chunks, AMAX_FLOOR=ATTN_OUT_AMAX_FLOOR,
        SOFT_ROUND=_INTERPRETED, num_warps=TUNING["num_warps"], **LAUNCH_OPTIONS)
    return q, scale
