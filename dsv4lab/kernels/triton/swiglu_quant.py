"""Triton: SwiGLU with the DSv4 clamp + fp8 e4m3 1x128 re-quantisation, between the two expert GEMMs.

    g, u  = gate_up[:, :I], gate_up[:, I:]                   (the first GEMM's output, rows [w1; w3] -> [g | u])
    h     = silu(min(g, L)) * clamp(u, -L, L)                fp32, L = swiglu_limit (dsv4-layers.md 4.2)
    scale = 2^ceil(log2(max(amax_128(h), 1e-4) / 448))      fp32 power of two, one per (row, 128 columns)
    q     = e4m3_rne(clamp(h / scale, -448, 448))            -> the second grouped GEMM's fp8 activations

One pass over ``gate_up`` instead of four torch kernels (silu, clamps, product, amax/scale/cast) and one fp32
[M, I] intermediate. Rows whose ``m_indices`` entry is negative are DeepGEMM's contiguous-layout padding: they
are not read and are written as a quantised zero row (q = 0, scale = 2^-22, exactly what an all-zero row gives),
so the second GEMM sees regular, finite padding.

Rounding: fp32 silu as ``g / (1 + exp(-g))`` (torch's formula; ``exp`` may differ from torch's by an ulp, so h,
and rarely q, can differ from a torch composition by one step), the scale exponent from the fp32 bits (exact, no
log2), and the e4m3 cast via inv_rope_fp8_quant's ``_to_e4m3``: the hardware RNE cast on the GPU, rounding on
the bits under the interpreter (whose own fp32 -> fp8 cast is wrong at ties and carries). fp-fusion is off so the
product h is one rounding as in torch.

Masked layout (``rows=``): only the listed rows are computed (one program each, no launch for empty slab rows);
``group_rows=M_max`` writes the scales MN-major per group, the layout DeepGEMM's sm90 kernel reads directly.

Input contract: gate_up bf16/fp16/fp32 [M, 2I] with a contiguous last axis, I a multiple of 128; limit > 0;
m_indices None or int32/int64 [M] on the same device; rows None or contiguous int32/int64 (not with m_indices);
group_rows None or a positive divisor of M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk
from .inv_rope_fp8_quant import _INTERPRETED, _to_e4m3

QUANT_BLOCK = 128
AMAX_FLOOR = 1e-4                   # DS-ref / DeepGEMM act-quant floor
_MAX_CHUNKS_PER_PROGRAM = 8         # 8 x 128 columns of h per program


@triton.jit
def swiglu_fp8_rows(gate, up, limit, AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """fp32 tiles [R, 128] of g and u -> (e4m3 q [R, 128], fp32 pow2 scale [R]): the math of the module docstring,
    one 1x128 quantisation block per row. Shared with the decode MoE kernel (``moe_gemv``) so both give the same bits."""
    # tl.minimum/maximum drop a NaN operand on the GPU (fmin/fmax); torch's clamp keeps it, and so must we: a NaN
    # activation has to reach the output, not turn into +-limit
    gate = tl.where(gate != gate, gate, tl.minimum(gate, limit))     # gate clamped from above only
    up = tl.where(up != up, up, tl.minimum(tl.maximum(up, -limit), limit))
    h = tl.div_rn(gate, 1.0 + tl.exp(-gate)) * up
    chunk_nan = tl.max((h != h).to(tl.int32), axis=1) > 0             # [R]: torch's amax would be NaN there

    amax = tl.maximum(tl.max(tl.abs(h), axis=1), AMAX_FLOOR)          # [R]
    abits = amax.to(tl.int32, bitcast=True)
    # amax = 1.m * 2^e  ->  amax / 448 = (1.m / 1.75) * 2^(e-8)  ->  ceil(log2) = e - 8 + (1.m > 1.75)
    exp = ((abits >> 23) & 0xFF) - 127 - 8 + ((abits & 0x7FFFFF) > 0x600000).to(tl.int32)
    scale = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((127 - exp) << 23).to(tl.float32, bitcast=True)      # exact: exp in [-22, 120]
    scale = tl.where(chunk_nan, float("nan"), scale)
    scaled = h * inv_scale[:, None]
    scaled = tl.where(scaled != scaled, scaled, tl.minimum(tl.maximum(scaled, -448.0), 448.0))
    return _to_e4m3(scaled, SOFT_ROUND), scale


@triton.jit
def _swiglu_quant_kernel(gate_up_ptr, m_indices_ptr, rows_ptr, q_ptr, scale_ptr, stride_row, inter, n_chunks,
                         limit, group_rows, CHUNKS: tl.constexpr, HAS_INDICES: tl.constexpr, HAS_ROWS: tl.constexpr,
                         SCALE_MN_MAJOR: tl.constexpr, AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    if HAS_ROWS:
        listed = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
        row_ok = listed >= 0                                          # a dropped slot: nothing to do
        row = tl.maximum(listed, 0)
    else:
        row = tl.program_id(0).to(tl.int64)
        row_ok = row >= 0
    chunk = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)          # [C]
    lane = tl.arange(0, 128)
    col = chunk[:, None] * 128 + lane[None, :]                        # [C, 128] column of h
    valid = (chunk < n_chunks)[:, None] & row_ok
    if HAS_INDICES:
        valid = valid & (tl.load(m_indices_ptr + row) >= 0)
    base = gate_up_ptr + row * stride_row
    gate = tl.load(base + col, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(base + inter + col, mask=valid, other=0.0).to(tl.float32)

    q, scale = swiglu_fp8_rows(gate, up, limit, AMAX_FLOOR, SOFT_ROUND)

    in_row = (chunk < n_chunks)[:, None] & row_ok
    tl.store(q_ptr + row * inter + col, q, mask=in_row)
    if SCALE_MN_MAJOR:   # [G, n_chunks, group_rows] storage, what DeepGEMM's sm90 masked kernel reads
        sf_off = (row // group_rows) * n_chunks * group_rows + chunk * group_rows + row % group_rows
    else:
        sf_off = row * n_chunks + chunk
    tl.store(scale_ptr + sf_off, scale, mask=(chunk < n_chunks) & row_ok)


def check_swiglu_quant_args(gate_up: torch.Tensor, limit: float, m_indices: torch.Tensor | None,
                            rows: torch.Tensor | None = None, group_rows: int | None = None) -> tuple[int, float]:
    """Input contract (see the module docstring); returns (I, limit)."""
    chk.tensor("gate_up", gate_up, (torch.bfloat16, torch.float16, torch.float32), dim=2)
    m, two_i = gate_up.shape
    if two_i % (2 * QUANT_BLOCK):
        raise ValueError(f"gate_up: expected [M, 2I] with I a multiple of {QUANT_BLOCK}, got {tuple(gate_up.shape)}")
    if m and gate_up.stride(1) != 1:
        raise ValueError(f"gate_up: expected a contiguous last axis, got strides {tuple(gate_up.stride())}")
    limit = chk.positive_float("limit", limit)
    if gate_up.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"gate_up: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {gate_up.device}")
    if m_indices is not None:
        chk.tensor("m_indices", m_indices, chk.INT_DTYPES, dim=1)
        chk.shape("m_indices", m_indices, (m,))
        if not m_indices.is_contiguous():
            raise ValueError("m_indices: expected a contiguous tensor")
        chk.same_device(gate_up=gate_up, m_indices=m_indices)
    if rows is not None:
        if m_indices is not None:
            raise ValueError("rows: pass either m_indices (contiguous layout) or rows (masked layout), not both")
        chk.tensor("rows", rows, chk.INT_DTYPES)
        if not rows.is_contiguous():
            raise ValueError("rows: expected a contiguous tensor")
        chk.same_device(gate_up=gate_up, rows=rows)
        chk.index_range("rows", rows, -1, m, "rows of gate_up (-1 = skip)")
    if group_rows is not None:
        chk.positive_int("group_rows", group_rows)
        if m % group_rows:
            raise ValueError(f"group_rows: expected a divisor of the {m} rows of gate_up, got {group_rows}")
    return two_i // 2, limit


def swiglu_quant(gate_up: torch.Tensor, limit: float, m_indices: torch.Tensor | None = None, *,
                 rows: torch.Tensor | None = None, group_rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q e4m3 [M, I], scale fp32 [M, I/128])`` of ``silu(min(g, L)) * clamp(u, -L, L)``; see the module doc.

    ``rows`` (masked layout): only these rows of gate_up are computed (entries < 0 skipped); the other rows of q and
    scale are left unwritten. ``group_rows`` = M_max: the scales are stored MN-major per group ([G, I/128, M_max]
    storage) and returned as its [G, M_max, I/128] transposed view (row r of gate_up = group r // M_max, slot
    r % M_max)."""
    inter, limit = check_swiglu_quant_args(gate_up, limit, m_indices, rows, group_rows)
    m = gate_up.shape[0]
    n_chunks = inter // QUANT_BLOCK
    q = torch.empty((m, inter), dtype=torch.float8_e4m3fn, device=gate_up.device)
    if group_rows is None:
        scale = torch.empty((m, n_chunks), dtype=torch.float32, device=gate_up.device)
        scale_out = scale
    else:
        scale = torch.empty((m // group_rows, n_chunks, group_rows), dtype=torch.float32, device=gate_up.device)
        scale_out = scale.transpose(1, 2)
    n_programs = m if rows is None else rows.numel()
    if m == 0 or n_programs == 0:
        return q, scale_out
    chunks = min(_MAX_CHUNKS_PER_PROGRAM, triton.next_power_of_2(n_chunks))
    grid = (n_programs, triton.cdiv(n_chunks, chunks))
    _swiglu_quant_kernel[grid](
        gate_up, m_indices if m_indices is not None else gate_up, rows if rows is not None else gate_up, q, scale,
        gate_up.stride(0), inter, n_chunks, limit, group_rows or 1, CHUNKS=chunks, HAS_INDICES=m_indices is not None,
        HAS_ROWS=rows is not None, SCALE_MN_MAJOR=group_rows is not None, AMAX_FLOOR=AMAX_FLOOR,
        SOFT_ROUND=_INTERPRETED, num_warps=4, enable_fp_fusion=False)
    return q, scale_out
