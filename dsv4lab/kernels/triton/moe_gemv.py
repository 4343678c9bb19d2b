"""Triton: the Hopper MoE experts for tiny batches (decode, T <= ~8): weight-streaming GEMV, no grouped layout.

Same math as ``deep_gemm/grouped_moe.py`` (steps 3-6), per slot (t, j) with group e = group(t, j) (routed ids, then the
S width-I slices of the shared expert at weight 1):

    gate_up = bf16( sum_kb  (x_q[t, kb] . W13[e, :, kb]) * x_sf[t, kb] * W13_sf[e, :/128, kb] )      fp32 accumulate
    h_q, h_sf = swiglu_quant(gate_up)           (the shared ``swiglu_fp8_rows``: clamp, SiLU, 1x128 pow2 e4m3 requant)
    out     = bf16( sum_kb  (h_q[kb] . W2[e, :, kb]) * h_sf[kb] * W2_sf[e, :/128, kb] )
    y[t]    = sum_j w[t, j] * out(t, j)   (fp32, slot order, one rounding: the grouped path's ``combine_rows``)

kb runs over 128-wide K blocks in order (DeepGEMM's 1D2D promotion: one fp32 partial per block, scaled, added). The
products are exact (e4m3 x e4m3 in an fp16 tensor-core dot with fp32 accumulation on the GPU, fp32 under the
interpreter), so the result differs from the grouped path only by the fp32 summation order inside a block (and by
the lower-precision accumulation of DeepGEMM's fp8 tensor cores): ulp-level, not bitwise (see tests/test_moe_gemv.py).

Work split (bandwidth: every program streams weight tiles, each expert's weights are read once per call):
- a "unit" is one group with the set of tokens that chose it. Units are indexed by slot: routed slot u (flattened
  token-major, u < T k) owns the unit of expert ids[u] if u is the FIRST slot holding that expert; later slots with
  the same expert reuse it (no second read of its weights). Shared slice s is unit T k + s with all tokens. Unit u
  writes its per-token rows u * MAX_T + t of the scratch outputs, MAX_T = max(16, next_pow2(T)) (the dot's M).
  Computed inside both kernels from ids (T k values): no plan kernel, no host sync, CUDA-graph capturable.
- ``_gate_up_kernel`` grid (T k + S, I / 128): 128 columns of h (rows hb of w1 and of w3, one quantisation block)
  for all tokens of the unit; writes h_q, h_sf and, from the hb = 0 programs, rows[t, j] (the scratch row of each
  slot, -1 for an id outside [0, n_routed): dropped, as in the masked layout).
- ``_down_kernel`` grid (T k + S, D / BLOCK_N): BLOCK_N output columns for all tokens of the unit -> bf16 scratch.
- ``combine_rows`` (moe_masked_layout.py): the deterministic weighted reduction, shared with both grouped layouts.
Programs of slots that are not a unit's first slot exit at once. Both GEMMs put the weight tile in the MMA's M
(swap-AB: [128, 128] x [128, MAX_T]) so a tiny T wastes no weight bandwidth.

Input contract: x_q e4m3 [T, D] and x_sf fp32 [T, D/128] contiguous, D a multiple of 128; weights fp32 [T, k] and ids
int32/int64 [T, k] contiguous, T <= ``MAX_TOKENS``; w13 e4m3 [G, 2I, D], w13_sf fp32 [G, 2I/128, D/128], w2 e4m3
[G, D, I], w2_sf fp32 [G, D/128, I/128], all contiguous, I a multiple of 128; 0 < n_routed <= G (groups n_routed..G-1
are the shared slices); swiglu_limit > 0; one device (CUDA, or CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk
from .moe_masked_layout import _INTERPRETED, combine_rows
from .swiglu_quant import AMAX_FLOOR, swiglu_fp8_rows

QUANT_BLOCK = 128
MAX_TOKENS = 64            # beyond this the grouped layouts win (the unit tile grows as next_pow2(T))
BLOCK_N = 64               # output columns per program of the down projection
NUM_WARPS = 4


@triton.jit
def _round_bf16(x, SOFT_BF16: tl.constexpr):
    """fp32 -> nearest bf16 (ties to even) as fp32: the bf16 GEMM output of the grouped path. The interpreter's own
    cast truncates, so there the rounding is done on the bits (finite values)."""
    if SOFT_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _unit(ids_ptr, u, n_tokens, k, n_routed, MAX_T: tl.constexpr, K_BLOCK: tl.constexpr):
    """Unit u: (group, first slot holding it, token mask [MAX_T], whether u computes it, scratch row of slot u)."""
    n_routed_slots = n_tokens * k
    tok = tl.arange(0, MAX_T)
    j = tl.arange(0, K_BLOCK)
    slot = tok[:, None] * k + j[None, :]
    in_ids = (tok < n_tokens)[:, None] & (j < k)[None, :]
    all_ids = tl.load(ids_ptr + slot, mask=in_ids, other=-1).to(tl.int32)
    routed = u < n_routed_slots
    own = tl.load(ids_ptr + u, mask=routed, other=-1).to(tl.int32)
    valid = (own >= 0) & (own < n_routed)
    group = tl.where(routed, tl.where(valid, own, -1), n_routed + u - n_routed_slots)
    match = (all_ids == group) & in_ids & routed & valid
    first = tl.min(tl.where(match, slot, n_routed_slots))
    hit = tl.where(routed, tl.max(match.to(tl.int32), axis=1) > 0, tok < n_tokens)
    active = tl.where(routed, valid & (first == u), True)
    slot_row = tl.where(valid, first * MAX_T + u // k, -1)
    return group, hit, active, slot_row


@triton.jit
def _gate_up_kernel(xq_ptr, xsf_ptr, ids_ptr, w13_ptr, w13sf_ptr, hq_ptr, hsf_ptr, rows_ptr, n_tokens, k, n_shared,
                    n_routed, limit, HIDDEN: tl.constexpr, INTER: tl.constexpr, MAX_T: tl.constexpr,
                    K_BLOCK: tl.constexpr, DOT_F32: tl.constexpr, SOFT: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    N_KB: tl.constexpr = HIDDEN // 128
    u = tl.program_id(0)
    hb = tl.program_id(1)
    group, hit, active, slot_row = _unit(ids_ptr, u, n_tokens, k, n_routed, MAX_T, K_BLOCK)
    tok = tl.arange(0, MAX_T)
    n_cols = k + n_shared
    routed = u < n_tokens * k
    # scratch row of every slot (read by the combine): routed slot u -> its unit's row; shared unit -> all tokens
    tl.store(rows_ptr + (u // k) * n_cols + u % k, slot_row, mask=routed & (hb == 0))
    tl.store(rows_ptr + tok * n_cols + k + (u - n_tokens * k), u * MAX_T + tok,
             mask=(tok < n_tokens) & (u >= n_tokens * k) & (hb == 0))
    if active:
        col = tl.arange(0, 128)
        hcol = hb * 128 + col                                             # columns of h = rows of w1 (w3: + INTER)
        w_base = w13_ptr + group.to(tl.int64) * (2 * INTER * HIDDEN)
        sf_base = w13sf_ptr + group.to(tl.int64) * (2 * INTER // 128 * N_KB)
        x_rows = xq_ptr + tok.to(tl.int64)[None, :] * HIDDEN              # [1, MAX_T]
        acc_g = tl.zeros((128, MAX_T), tl.float32)
        acc_u = tl.zeros((128, MAX_T), tl.float32)
        for kb in range(N_KB):
            kcol = kb * 128 + col
            x_t = tl.load(x_rows + kcol[:, None], mask=hit[None, :], other=0.0)          # [128, MAX_T] = x^T
            x_s = tl.load(xsf_ptr + tok * N_KB + kb, mask=hit, other=0.0)               # [MAX_T]
            w_g = tl.load(w_base + hcol[:, None] * HIDDEN + kcol[None, :])
            w_u = tl.load(w_base + (INTER + hcol)[:, None] * HIDDEN + kcol[None, :])
            s_g = tl.load(sf_base + hb * N_KB + kb)
            s_u = tl.load(sf_base + (INTER // 128 + hb) * N_KB + kb)
            if DOT_F32:
                p_g = tl.dot(w_g.to(tl.float32), x_t.to(tl.float32))
                p_u = tl.dot(w_u.to(tl.float32), x_t.to(tl.float32))
            else:   # e4m3 values are exact in fp16; fp16 MMA accumulates in fp32
                p_g = tl.dot(w_g.to(tl.float16), x_t.to(tl.float16), out_dtype=tl.float32)
                p_u = tl.dot(w_u.to(tl.float16), x_t.to(tl.float16), out_dtype=tl.float32)
            acc_g += p_g * (x_s[None, :] * s_g)                            # pow2 scales: exact products
            acc_u += p_u * (x_s[None, :] * s_u)
        gate = tl.trans(_round_bf16(acc_g, SOFT))                          # [MAX_T, 128]
        up = tl.trans(_round_bf16(acc_u, SOFT))
        q, scale = swiglu_fp8_rows(gate, up, limit, AMAX_FLOOR, SOFT)
        out_row = (u * MAX_T + tok).to(tl.int64)
        tl.store(hq_ptr + out_row[:, None] * INTER + hcol[None, :], q, mask=hit[:, None])
        tl.store(hsf_ptr + out_row * (INTER // 128) + hb, scale, mask=hit)


@triton.jit
def _down_kernel(hq_ptr, hsf_ptr, ids_ptr, w2_ptr, w2sf_ptr, out_ptr, n_tokens, k, n_routed,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr, MAX_T: tl.constexpr, K_BLOCK: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, SOFT: tl.constexpr):
    N_KB: tl.constexpr = INTER // 128
    u = tl.program_id(0)
    nb = tl.program_id(1)
    group, hit, active, slot_row = _unit(ids_ptr, u, n_tokens, k, n_routed, MAX_T, K_BLOCK)
    if active:
        tok = tl.arange(0, MAX_T)
        col = tl.arange(0, 128)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        out_row = (u * MAX_T + tok).to(tl.int64)
        w_base = w2_ptr + group.to(tl.int64) * (HIDDEN * INTER)
        sf_base = w2sf_ptr + group.to(tl.int64) * (HIDDEN // 128 * N_KB) + (nb * BLOCK_N // 128) * N_KB
        acc = tl.zeros((BLOCK_N, MAX_T), tl.float32)
        for kb in range(N_KB):
            kcol = kb * 128 + col
            h_t = tl.load(hq_ptr + out_row[None, :] * INTER + kcol[:, None], mask=hit[None, :], other=0.0)
            h_s = tl.load(hsf_ptr + out_row * N_KB + kb, mask=hit, other=0.0)
            w = tl.load(w_base + n[:, None] * INTER + kcol[None, :])
            s = tl.load(sf_base + kb)
            if DOT_F32:
                p = tl.dot(w.to(tl.float32), h_t.to(tl.float32))
            else:
                p = tl.dot(w.to(tl.float16), h_t.to(tl.float16), out_dtype=tl.float32)
            acc += p * (h_s[None, :] * s)
        out = _round_bf16(acc, SOFT).to(tl.bfloat16)
        tl.store(out_ptr + out_row[None, :] * HIDDEN + n[:, None], out, mask=hit[None, :])


# ---- host side ---------------------------------------------------------------------------------------------------
@dataclass
class GemvScratch:
    """Per-unit outputs: row u * max_t + t belongs to unit u, token t (rows of units/tokens not computed are unset)."""

    h_q: torch.Tensor         # e4m3 [U * max_t, I]
    h_sf: torch.Tensor        # fp32 [U * max_t, I / 128]
    rows: torch.Tensor        # int32 [T, k + S]: scratch row of slot (t, j), -1 = dropped
    max_t: int


def max_t_for(tokens: int) -> int:
    """Rows per unit: the dot's M (>= 16) covering all T tokens."""
    return max(16, triton.next_power_of_2(max(tokens, 1)))


def check_gemv_args(x_q, x_sf, weights, ids, w13, w13_sf, w2, w2_sf, n_routed, swiglu_limit) -> tuple:
    """Input contract of ``moe_gemv`` (module docstring); returns (T, k, D, I, G, limit). Raises before any launch."""
    chk.tensor("x_q", x_q, (torch.float8_e4m3fn,), dim=2)
    t, d = x_q.shape
    if d % QUANT_BLOCK:
        raise ValueError(f"x_q: expected [T, D] with D a multiple of {QUANT_BLOCK}, got {tuple(x_q.shape)}")
    if t > MAX_TOKENS:
        raise ValueError(f"x_q: the GEMV path takes at most {MAX_TOKENS} tokens, got T={t} (use the grouped layouts)")
    chk.tensor("x_sf", x_sf, (torch.float32,), dim=2)
    chk.shape("x_sf", x_sf, (t, d // QUANT_BLOCK))
    chk.tensor("ids", ids, chk.INT_DTYPES, dim=2)
    if ids.shape[0] != t or ids.shape[1] < 1:
        raise ValueError(f"ids: expected [{t}, k] with k >= 1 (one row per token of x_q), got {tuple(ids.shape)}")
    chk.tensor("weights", weights, (torch.float32,), dim=2)
    chk.shape("weights", weights, tuple(ids.shape))
    chk.tensor("w13", w13, (torch.float8_e4m3fn,), dim=3)
    g, two_i, d13 = w13.shape
    if d13 != d or two_i % (2 * QUANT_BLOCK):
        raise ValueError(f"w13: expected [G, 2I, {d}] with I a multiple of {QUANT_BLOCK}, got {tuple(w13.shape)}")
    inter = two_i // 2
    chk.tensor("w13_sf", w13_sf, (torch.float32,), dim=3)
    chk.shape("w13_sf", w13_sf, (g, two_i // QUANT_BLOCK, d // QUANT_BLOCK))
    chk.tensor("w2", w2, (torch.float8_e4m3fn,), dim=3)
    chk.shape("w2", w2, (g, d, inter))
    chk.tensor("w2_sf", w2_sf, (torch.float32,), dim=3)
    chk.shape("w2_sf", w2_sf, (g, d // QUANT_BLOCK, inter // QUANT_BLOCK))
    chk.positive_int("n_routed", n_routed)
    if n_routed > g:
        raise ValueError(f"n_routed: expected <= the {g} groups of w13, got {n_routed}")
    limit = chk.positive_float("swiglu_limit", swiglu_limit)
    named = dict(x_q=x_q, x_sf=x_sf, weights=weights, ids=ids, w13=w13, w13_sf=w13_sf, w2=w2, w2_sf=w2_sf)
    for name, x in named.items():
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    chk.same_device(**named)
    if x_q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"x_q: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x_q.device}")
    return t, ids.shape[1], d, inter, g, limit


def gate_up_swiglu(x_q, x_sf, ids, w13, w13_sf, n_routed: int, limit: float) -> GemvScratch:
    """Kernel 1 (no checks: ``moe_gemv`` validates): per unit, h = swiglu_quant(bf16(x_q W13^T)) -> scratch."""
    t, k = ids.shape
    g, two_i, d = w13.shape
    inter, n_shared = two_i // 2, g - n_routed
    max_t = max_t_for(t)
    units = t * k + n_shared
    h_q = torch.empty((units * max_t, inter), dtype=torch.float8_e4m3fn, device=x_q.device)
    h_sf = torch.empty((units * max_t, inter // QUANT_BLOCK), dtype=torch.float32, device=x_q.device)
    rows = torch.empty((t, k + n_shared), dtype=torch.int32, device=x_q.device)
    _gate_up_kernel[(units, inter // QUANT_BLOCK)](
        x_q, x_sf, ids, w13, w13_sf, h_q, h_sf, rows, t, k, n_shared, n_routed, limit, HIDDEN=d, INTER=inter,
        MAX_T=max_t, K_BLOCK=triton.next_power_of_2(k), DOT_F32=_INTERPRETED, SOFT=_INTERPRETED,
        AMAX_FLOOR=AMAX_FLOOR, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return GemvScratch(h_q, h_sf, rows, max_t)


def down_proj(scratch: GemvScratch, ids, w2, w2_sf, n_routed: int) -> torch.Tensor:
    """Kernel 2 (no checks): per unit, out = bf16(h_q W2^T) -> bf16 [U * max_t, D] (rows of ``scratch``)."""
    t, k = ids.shape
    g, d, inter = w2.shape
    units = t * k + g - n_routed
    out = torch.empty((units * scratch.max_t, d), dtype=torch.bfloat16, device=w2.device)
    _down_kernel[(units, triton.cdiv(d, BLOCK_N))](
        scratch.h_q, scratch.h_sf, ids, w2, w2_sf, out, t, k, n_routed, HIDDEN=d, INTER=inter, MAX_T=scratch.max_t,
        K_BLOCK=triton.next_power_of_2(k), BLOCK_N=BLOCK_N, DOT_F32=_INTERPRETED, SOFT=_INTERPRETED,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def moe_gemv(x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
             w13_sf: torch.Tensor, w2: torch.Tensor, w2_sf: torch.Tensor, *, n_routed: int, swiglu_limit: float,
             out_dtype: torch.dtype = torch.bfloat16, validate_ids: bool = True) -> torch.Tensor:
    """``y [T, D]`` (out_dtype) = sum over slots of w * expert(x) + the shared slices (module docstring).

    ``validate_ids=True`` checks on the host that every id is in [0, n_routed) (one device sync); ``False`` never
    syncs (CUDA-graph capturable) and drops out-of-range ids. A token repeating an expert is computed correctly
    (both slots read the same unit row)."""
    t, k, d, _, _, limit = check_gemv_args(x_q, x_sf, weights, ids, w13, w13_sf, w2, w2_sf, n_routed, swiglu_limit)
    if validate_ids:
        chk.index_range("ids", ids, 0, n_routed, "expert ids")
    if t == 0:
        return torch.empty((0, d), dtype=out_dtype, device=x_q.device)
    scratch = gate_up_swiglu(x_q, x_sf, ids, w13, w13_sf, n_routed, limit)
    out = down_proj(scratch, ids, w2, w2_sf, n_routed)
    return combine_rows(out, scratch.rows, weights, out_dtype, check_rows=False)
