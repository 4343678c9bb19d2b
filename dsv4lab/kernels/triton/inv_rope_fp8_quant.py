"""Triton: inverse RoPE + per-(token, 128-chunk) fp8 e4m3 quant of the attention output (dsv4-layers.md 3.7).

Same contract and the same bits as ``dsv4lab.kernels.reference.attn_out.inv_rope_fp8_quant``:

    y     = o with (e, o) -> (e c + o s, o c - e s) on the last rope_dim channels of each head   (fp32)
    scale = 2^ceil(log2(max(amax_128(y), 1e-10) / 448))      fp32, one per (token, 128-chunk)
    q     = e4m3_rne(y / scale)

Bitwise agreement with torch on CPU (interpreter) and GPU rests on three choices:
- cos/sin come from the caller's fp32 table (no in-kernel cos);
- fp-fusion is off at launch, so ``e*c + o*s`` is two rounded products and a rounded sum, as in torch;
- the scale exponent and the e4m3 rounding are done with integer ops on the fp32 bits. The interpreter's own
  fp32 -> fp8e4nv cast is wrong (triton 3.6: ties round away from zero, and a mantissa carry is dropped, so
  125.95 becomes 64 instead of 128), while it converts exactly representable values exactly. So the kernel
  rounds to the e4m3 grid itself (nearest, ties to even, subnormals included) and the final cast is exact on
  both the interpreter and the GPU's ``cvt.rn`` path. The exponent needs no fp32 division: for
  amax = 1.m * 2^e, amax/448 = (1.m/1.75) * 2^(e-8), so ceil(log2) = e - 8 + (1.m > 1.75).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference.attn_out import ATTN_OUT_AMAX_FLOOR, QUANT_BLOCK, check_inv_rope_args

_MAX_CHUNKS_PER_PROGRAM = 16   # 16 x 128 elements = 4 KiB of bf16 per program on the GPU
# no FMA contraction: torch rounds e*c and o*s before adding them (tests AOT-compile with these to sm_90a)
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
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
def _inv_rope_fp8_quant_kernel(o_ptr, pos_ptr, cs_ptr, q_ptr, scale_ptr,
                               stride_ot, stride_oh, n_chunks,
                               HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, CHUNKS: tl.constexpr,
                               AMAX_FLOOR: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)          # [C] chunk index within the token row
    lane = tl.arange(0, 128)
    valid = (chunk < n_chunks)[:, None]
    head = (chunk // (HEAD_DIM // 128)).to(tl.int64)[:, None]
    dim = (chunk % (HEAD_DIM // 128))[:, None] * 128 + lane[None, :]   # [C, 128] channel within the head
    row = o_ptr + token * stride_ot + head * stride_oh
    x = tl.load(row + dim, mask=valid, other=0.0).to(tl.float32)

    is_rope = dim >= HEAD_DIM - ROPE_DIM
    partner = tl.load(row + (dim ^ 1), mask=valid & is_rope, other=0.0).to(tl.float32)
    pair = tl.maximum(dim - (HEAD_DIM - ROPE_DIM), 0) // 2
    cs_row = cs_ptr + tl.load(pos_ptr + token).to(tl.int64) * ROPE_DIM
    cos = tl.load(cs_row + pair, mask=valid & is_rope, other=1.0)
    sin = tl.load(cs_row + ROPE_DIM // 2 + pair, mask=valid & is_rope, other=0.0)
    x_cos = x * cos
    partner_sin = partner * sin
    rotated = tl.where((dim % 2) == 0, x_cos + partner_sin, x_cos - partner_sin)
    y = tl.where(is_rope, rotated, x)                  # keep nope channels (and -0.0) untouched

    amax = tl.maximum(tl.max(tl.abs(y), axis=1), AMAX_FLOOR)          # [C]
    abits = amax.to(tl.int32, bitcast=True)
    exp = ((abits >> 23) & 0xFF) - 127 - 8 + ((abits & 0x7FFFFF) > 0x600000).to(tl.int32)  # 448 = 1.75 * 2^8
    scale = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((127 - exp) << 23).to(tl.float32, bitcast=True)      # exact: exp in [-42, 120]
    scaled = tl.minimum(tl.maximum(y * inv_scale[:, None], -448.0), 448.0)
    q = _round_to_e4m3_grid(scaled).to(tl.float8e4nv)

    out = token * n_chunks * 128 + chunk[:, None] * 128 + lane[None, :]
    tl.store(q_ptr + out, q, mask=valid)
    tl.store(scale_ptr + token * n_chunks + chunk, scale, mask=chunk < n_chunks)


def inv_rope_fp8_quant(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``inv_rope_fp8_quant``: o [T, H, d] -> (e4m3 [T, H*d], fp32 scales [T, H*d/128]).

    Input contract: ``check_inv_rope_args`` (o bf16/fp16/fp32 with a contiguous last axis, d % 128 == 0; o may be a
    head slice of a padded buffer; positions [T] int; cos_sin_cache fp32 contiguous [P, rope_dim <= 128]; CUDA
    tensors unless running under the interpreter). Positions are range-checked on CPU only.
    """
    rope_dim = check_inv_rope_args(o, positions, cos_sin_cache)
    if o.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"o: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {o.device}")
    t, h, d = o.shape
    n_chunks = h * d // QUANT_BLOCK
    q = torch.empty((t, h * d), dtype=torch.float8_e4m3fn, device=o.device)
    scale = torch.empty((t, n_chunks), dtype=torch.float32, device=o.device)
    if t == 0 or h == 0:
        return q, scale
    chunks = min(_MAX_CHUNKS_PER_PROGRAM, triton.next_power_of_2(n_chunks))
    grid = (t, triton.cdiv(n_chunks, chunks))
    _inv_rope_fp8_quant_kernel[grid](
        o, positions, cos_sin_cache, q, scale, o.stride(0), o.stride(1), n_chunks,
        HEAD_DIM=d, ROPE_DIM=rope_dim, CHUNKS=chunks, AMAX_FLOOR=ATTN_OUT_AMAX_FLOOR, **LAUNCH_OPTIONS)
    return q, scale
