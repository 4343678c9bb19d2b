"""Triton: activation fp8 quantisation, e4m3 with one power-of-two fp32 scale per 1x128 block, in one launch.

    scale[t, b] = 2^ceil(log2(max(amax(x[t, 128 b : 128 b + 128]), 1e-4) / 448))
    q[t, c]     = e4m3_rne(clamp(x[t, c] / scale[t, c // 128], -448, 448))

The same bits as ``dsv4lab.quant.quant_fp8(x, 128, pow2=True)`` (the torch composition, ~15 small launches: at decode
T the launches, not the bytes, are its cost) for finite x: the exponent comes from the fp32 bits of amax (exact,
no log2), division by a power of two is exact, and the e4m3 cast is the hardware RNE cast (bit rounding under the
interpreter). A block holding a NaN gets what quant_fp8 gives it: scale 1, NaN codes where x is NaN, the other values
quantised unscaled. Not matched: a block holding +-inf (torch's scale is 2^127, this one 2^120; both give +-448).

``quant_rows_fp8`` is shared with the decode MoE kernel (triton/moe_gemv.py), which quantises x inside its GEMM.

Input contract: x bf16/fp16/fp32 [T, D] with a contiguous last axis, D a multiple of 128; one device (CUDA, or CPU
under TRITON_INTERPRET=1). T = 0 returns empty outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk
from .inv_rope_fp8_quant import _INTERPRETED, _round_to_e4m3_grid

QUANT_BLOCK = 128
AMAX_FLOOR = 1e-4                   # dsv4lab.quant.FP8_AMAX_FLOOR (activations)
CHUNKS = 4                          # 1x128 blocks per program


@triton.jit
def quant_rows_fp8(v, AMAX_FLOOR: tl.constexpr, SOFT: tl.constexpr):
    """fp32 [R, 128] (one 1x128 block per row) -> (e4m3 [R, 128], fp32 pow2 scale [R])."""
    # tl.max drops NaN on the GPU (fmax): find NaN blocks explicitly. quant_fp8's amax is NaN there, and its frexp of
    # NaN gives exponent 0: scale 1, the block's other values quantised unscaled (clamped), NaN stays NaN
    block_nan = tl.max((v != v).to(tl.int32), axis=1) > 0
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), AMAX_FLOOR)
    abits = amax.to(tl.int32, bitcast=True)
    # amax = 1.m * 2^e  ->  amax / 448 = (1.m / 1.75) * 2^(e-8)  ->  ceil(log2) = e - 8 + (1.m > 1.75)
    exp = ((abits >> 23) & 0xFF) - 127 - 8 + ((abits & 0x7FFFFF) > 0x600000).to(tl.int32)
    exp = tl.where(block_nan, 0, exp)
    scale = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((127 - exp) << 23).to(tl.float32, bitcast=True)      # exact: exp in [-22, 120]
    scaled = v * inv_scale[:, None]
    is_nan = scaled != scaled
    scaled = tl.where(is_nan, scaled, tl.minimum(tl.maximum(scaled, -448.0), 448.0))
    if SOFT:   # the interpreter's own fp8 cast is wrong at ties and turns NaN into 384: round on the bits, NaN = 0x7F
        q = _round_to_e4m3_grid(tl.where(is_nan, 0.0, scaled)).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        return tl.where(is_nan, 0x7F, q).to(tl.uint8).to(tl.float8e4nv, bitcast=True), scale
    return scaled.to(tl.float8e4nv), scale


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, scale_ptr, stride_x, n_blocks, CHUNKS: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                      SOFT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)
    col = block[:, None] * 128 + tl.arange(0, 128)[None, :]
    ok = (block < n_blocks)[:, None]
    v = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
    q, scale = quant_rows_fp8(v, AMAX_FLOOR, SOFT)
    tl.store(q_ptr + row * (n_blocks * 128) + col, q, mask=ok)
    tl.store(scale_ptr + row * n_blocks + block, scale, mask=block < n_blocks)


def act_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [T, D] contiguous, fp32 scales [T, D/128]) of ``x`` (module docstring)."""
    chk.tensor("x", x, (torch.bfloat16, torch.float16, torch.float32), dim=2)
    t, d = x.shape
    if d % QUANT_BLOCK:
        raise ValueError(f"x: expected [T, D] with D a multiple of {QUANT_BLOCK}, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("x: expected a contiguous last axis")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"x: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}")
    n_blocks = d // QUANT_BLOCK
    q = torch.empty((t, d), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((t, n_blocks), dtype=torch.float32, device=x.device)
    if t == 0:
        return q, scale
    _act_quant_kernel[(t, triton.cdiv(n_blocks, CHUNKS))](x, q, scale, x.stride(0), n_blocks, CHUNKS=CHUNKS,
                                                          AMAX_FLOOR=AMAX_FLOOR, SOFT=_INTERPRETED, num_warps=4)
    return q, scale
