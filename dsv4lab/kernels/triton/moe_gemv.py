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
- ``GemvConfig`` (opt-in, default = the above): ``split_k`` adds a grid axis over K ranges of the gate/up projection
  (fp32 partials, then ``_gate_up_finish_kernel`` adds them in split order and does the SwiGLU-quant: deterministic,
  ulp-level vs unsplit); ``fuse_x_quant`` (``moe_gemv_x``) quantises x inside the gate/up loop with
  act_quant_fp8's math (bit-identical h, so bit-identical output); ``fp8_dot`` feeds e4m3 to the fp8 MMA.
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
from .act_quant_fp8 import quant_rows_fp8
from .swiglu_quant import AMAX_FLOOR, swiglu_fp8_rows

QUANT_BLOCK = 128
MAX_TOKENS = 64            # beyond this the grouped layouts win (the unit tile grows as next_pow2(T))
BLOCK_N = 64               # output columns per program of the down projection
NUM_WARPS = 4


@dataclass(frozen=True)
class GemvConfig:
    """Launch configuration (bench/pr44367_megamoe.py, variants gemv_cfg_*, compares these on the H100).

    split_k: K ranges of the gate/up projection per (unit, 128 columns of h); > 1 writes fp32 partials and a small
        epilogue kernel adds them in split order (deterministic, but a different fp32 association than split_k=1:
        ulp-level differences). At T=1 Flash the unsplit grid is only 7 x 16 = 112 programs of 1 MiB each on 132 SMs.
    fuse_x_quant: the gate/up kernel quantises x (act_quant_fp8's 1x128 pow2 e4m3, the bits of quant_fp8 for
        finite x) instead of the ~15 torch launches of quant_fp8 before it (only through ``moe_gemv_x``).
    gate_stages / down_stages: Triton software-pipelining depth (None = Triton's default).
    fp8_dot: e4m3 operands go to the fp8 tensor-core MMA directly (no e4m3 -> fp16 conversion in registers; the MMA
        accumulates one 128-deep K block with Hopper's reduced-precision fp8 accumulator, like DeepGEMM, before the
        fp32 promotion); GPU only: under the interpreter every dot is fp32."""

    split_k: int = 1
    gate_warps: int = NUM_WARPS
    gate_stages: int | None = None
    down_block_n: int = BLOCK_N
    down_warps: int = NUM_WARPS
    down_stages: int | None = None
    fuse_x_quant: bool = False
    fp8_dot: bool = False

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


# H100, Flash, CUDA-graph replay of the whole decode chain (data/results/h100/pr44367_megamoe.jsonl, gemvcfg_*, commit
# 42be99d): x quantised inside gate/up + fp8 MMA took 90.3 / 238.9 / 425.0 us at T = 1 / 4 / 8 (65 / 84 / 91 % of the
# touched weights' bytes at copy bandwidth) against 144.0 / 323.8 / 508.2 us for GemvConfig(), and its output equalled
# the masked DeepGEMM path's bit for bit at all three T.
DEFAULT_CONFIG = GemvConfig(fuse_x_quant=True, fp8_dot=True)


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
def _gate_up_kernel(xq_ptr, xsf_ptr, ids_ptr, w13_ptr, w13sf_ptr, hq_ptr, hsf_ptr, rows_ptr, part_ptr, n_tokens, k,
                    n_shared, n_routed, limit, n_part_rows, HIDDEN: tl.constexpr, INTER: tl.constexpr,
                    MAX_T: tl.constexpr, K_BLOCK: tl.constexpr, SPLIT_K: tl.constexpr, X_FLOAT: tl.constexpr,
                    DOT_F32: tl.constexpr, FP8_DOT: tl.constexpr, SOFT: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    N_KB: tl.constexpr = HIDDEN // 128
    KB_PER_SPLIT: tl.constexpr = N_KB // SPLIT_K
    u = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    group, hit, active, slot_row = _unit(ids_ptr, u, n_tokens, k, n_routed, MAX_T, K_BLOCK)
    tok = tl.arange(0, MAX_T)
    n_cols = k + n_shared
    routed = u < n_tokens * k
    first_program = (hb == 0) & (split == 0)
    # scratch row of every slot (read by the combine): routed slot u -> its unit's row; shared unit -> all tokens
    tl.store(rows_ptr + (u // k) * n_cols + u % k, slot_row, mask=routed & first_program)
    tl.store(rows_ptr + tok * n_cols + k + (u - n_tokens * k), u * MAX_T + tok,
             mask=(tok < n_tokens) & (u >= n_tokens * k) & first_program)
    if active:
        col = tl.arange(0, 128)
        hcol = hb * 128 + col                                             # columns of h = rows of w1 (w3: + INTER)
        w_base = w13_ptr + group.to(tl.int64) * (2 * INTER * HIDDEN)
        sf_base = w13sf_ptr + group.to(tl.int64) * (2 * INTER // 128 * N_KB)
        x_rows = xq_ptr + tok.to(tl.int64)[None, :] * HIDDEN              # [1, MAX_T]
        acc_g = tl.zeros((128, MAX_T), tl.float32)
        acc_u = tl.zeros((128, MAX_T), tl.float32)
        for kb_local in range(KB_PER_SPLIT):     # a constant trip count: the software pipeliner sees it
            kb = split * KB_PER_SPLIT + kb_local
            kcol = kb * 128 + col
            if X_FLOAT:   # x itself (bf16/fp16/fp32): quantised here (act_quant_fp8's math), no quant launches
                x_blk = tl.load(xq_ptr + tok.to(tl.int64)[:, None] * HIDDEN + kcol[None, :], mask=hit[:, None],
                                other=0.0).to(tl.float32)                                # [MAX_T, 128]
                x_q_rows, x_s = quant_rows_fp8(x_blk, AMAX_FLOOR, SOFT)
                x_t = tl.trans(x_q_rows)
            else:
                x_t = tl.load(x_rows + kcol[:, None], mask=hit[None, :], other=0.0)      # [128, MAX_T] = x^T
                x_s = tl.load(xsf_ptr + tok * N_KB + kb, mask=hit, other=0.0)           # [MAX_T]
            w_g = tl.load(w_base + hcol[:, None] * HIDDEN + kcol[None, :])
            w_u = tl.load(w_base + (INTER + hcol)[:, None] * HIDDEN + kcol[None, :])
            s_g = tl.load(sf_base + hb * N_KB + kb)
            s_u = tl.load(sf_base + (INTER // 128 + hb) * N_KB + kb)
            if DOT_F32:
                p_g = tl.dot(w_g.to(tl.float32), x_t.to(tl.float32))
                p_u = tl.dot(w_u.to(tl.float32), x_t.to(tl.float32))
            elif FP8_DOT:   # e4m3 operands straight into the fp8 MMA (DeepGEMM's per-128-K-block accumulation)
                p_g = tl.dot(w_g, x_t, out_dtype=tl.float32)
                p_u = tl.dot(w_u, x_t, out_dtype=tl.float32)
            else:   # e4m3 values are exact in fp16; fp16 MMA accumulates in fp32
                p_g = tl.dot(w_g.to(tl.float16), x_t.to(tl.float16), out_dtype=tl.float32)
                p_u = tl.dot(w_u.to(tl.float16), x_t.to(tl.float16), out_dtype=tl.float32)
            acc_g += p_g * (x_s[None, :] * s_g)                            # pow2 scales: exact products
            acc_u += p_u * (x_s[None, :] * s_u)
        out_row = (u * MAX_T + tok).to(tl.int64)
        if SPLIT_K == 1:
            gate = tl.trans(_round_bf16(acc_g, SOFT))                      # [MAX_T, 128]
            up = tl.trans(_round_bf16(acc_u, SOFT))
            q, scale = swiglu_fp8_rows(gate, up, limit, AMAX_FLOOR, SOFT)
            tl.store(hq_ptr + out_row[:, None] * INTER + hcol[None, :], q, mask=hit[:, None])
            tl.store(hsf_ptr + out_row * (INTER // 128) + hb, scale, mask=hit)
        else:         # fp32 partial of this K range; _gate_up_finish_kernel adds the splits in order
            part_row = (u * n_tokens + tok).to(tl.int64)                  # dense: T rows per unit, not MAX_T
            part = part_ptr + (split * n_part_rows + part_row)[None, :] * (2 * INTER)
            tl.store(part + hcol[:, None], acc_g, mask=hit[None, :])
            tl.store(part + (INTER + hcol)[:, None], acc_u, mask=hit[None, :])


@triton.jit
def _gate_up_finish_kernel(part_ptr, ids_ptr, hq_ptr, hsf_ptr, n_tokens, k, n_routed, limit, n_part_rows,
                           INTER: tl.constexpr, MAX_T: tl.constexpr, K_BLOCK: tl.constexpr, SPLIT_K: tl.constexpr,
                           SOFT: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """Split-K epilogue: gate/up = sum of the SPLIT_K fp32 partials in split order -> bf16 -> SwiGLU-quant."""
    u = tl.program_id(0)
    hb = tl.program_id(1)
    group, hit, active, slot_row = _unit(ids_ptr, u, n_tokens, k, n_routed, MAX_T, K_BLOCK)
    if active:
        tok = tl.arange(0, MAX_T)
        hcol = hb * 128 + tl.arange(0, 128)
        out_row = (u * MAX_T + tok).to(tl.int64)
        acc_g = tl.zeros((MAX_T, 128), tl.float32)
        acc_u = tl.zeros((MAX_T, 128), tl.float32)
        part_row = (u * n_tokens + tok).to(tl.int64)
        for split in tl.static_range(SPLIT_K):
            part = part_ptr + (split * n_part_rows + part_row)[:, None] * (2 * INTER)
            acc_g += tl.load(part + hcol[None, :], mask=hit[:, None], other=0.0)
            acc_u += tl.load(part + (INTER + hcol)[None, :], mask=hit[:, None], other=0.0)
        q, scale = swiglu_fp8_rows(_round_bf16(acc_g, SOFT), _round_bf16(acc_u, SOFT), limit, AMAX_FLOOR, SOFT)
        tl.store(hq_ptr + out_row[:, None] * INTER + hcol[None, :], q, mask=hit[:, None])
        tl.store(hsf_ptr + out_row * (INTER // 128) + hb, scale, mask=hit)


@triton.jit
def _down_kernel(hq_ptr, hsf_ptr, ids_ptr, w2_ptr, w2sf_ptr, out_ptr, n_tokens, k, n_routed,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr, MAX_T: tl.constexpr, K_BLOCK: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, FP8_DOT: tl.constexpr, SOFT: tl.constexpr):
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
            elif FP8_DOT:
                p = tl.dot(w, h_t, out_dtype=tl.float32)
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


def check_gemv_args(x_q, x_sf, weights, ids, w13, w13_sf, w2, w2_sf, n_routed, swiglu_limit,
                    x_float: bool = False) -> tuple:
    """Input contract of ``moe_gemv`` (module docstring); returns (T, k, D, I, G, limit). Raises before any launch.
    ``x_float``: ``x_q`` is the unquantised x (bf16/fp16/fp32 [T, D], ``moe_gemv_x``) and ``x_sf`` is not used."""
    name = "x" if x_float else "x_q"
    chk.tensor(name, x_q, (torch.bfloat16, torch.float16, torch.float32) if x_float else (torch.float8_e4m3fn,), dim=2)
    t, d = x_q.shape
    if d % QUANT_BLOCK:
        raise ValueError(f"{name}: expected [T, D] with D a multiple of {QUANT_BLOCK}, got {tuple(x_q.shape)}")
    if t > MAX_TOKENS:
        raise ValueError(f"{name}: the GEMV path takes at most {MAX_TOKENS} tokens, got T={t} (use the grouped layouts)")
    if not x_float:
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
    named = {name: x_q, **({} if x_float else {"x_sf": x_sf}), "weights": weights, "ids": ids, "w13": w13,
             "w13_sf": w13_sf, "w2": w2, "w2_sf": w2_sf}
    for name, x in named.items():
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    chk.same_device(**named)
    if x_q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x_q.device}")
    return t, ids.shape[1], d, inter, g, limit


def _stages(n: int | None) -> dict:
    return {} if n is None else {"num_stages": n}


def check_config(config: GemvConfig, hidden: int, inter: int) -> None:
    """Raises ValueError naming the field when ``config`` cannot run these shapes (before any launch)."""
    if not isinstance(config, GemvConfig):
        raise TypeError(f"config: expected a GemvConfig, got {type(config).__name__}")
    n_kb = hidden // QUANT_BLOCK
    if config.split_k < 1 or n_kb % config.split_k:
        raise ValueError(f"config.split_k: expected a divisor of D/128 = {n_kb}, got {config.split_k}")
    if config.down_block_n not in (16, 32, 64, 128):
        raise ValueError(f"config.down_block_n: expected 16, 32, 64 or 128, got {config.down_block_n}")
    for name in ("gate_warps", "down_warps"):
        if getattr(config, name) not in (1, 2, 4, 8):
            raise ValueError(f"config.{name}: expected 1, 2, 4 or 8, got {getattr(config, name)}")
    for name in ("gate_stages", "down_stages"):
        v = getattr(config, name)
        if v is not None and not 1 <= v <= 6:
            raise ValueError(f"config.{name}: expected None or 1..6, got {v}")


def gate_up_swiglu(x_q, x_sf, ids, w13, w13_sf, n_routed: int, limit: float, config: GemvConfig = DEFAULT_CONFIG,
                   x: torch.Tensor | None = None) -> GemvScratch:
    """Kernel 1 (no checks: ``moe_gemv`` validates): per unit, h = swiglu_quant(bf16(x_q W13^T)) -> scratch.
    With ``x`` (float [T, D]) the kernel quantises x itself and ``x_q`` / ``x_sf`` are ignored (may be None)."""
    t, k = ids.shape
    g, two_i, d = w13.shape
    inter, n_shared = two_i // 2, g - n_routed
    max_t = max_t_for(t)
    units = t * k + n_shared
    dev = w13.device
    h_q = torch.empty((units * max_t, inter), dtype=torch.float8_e4m3fn, device=dev)
    h_sf = torch.empty((units * max_t, inter // QUANT_BLOCK), dtype=torch.float32, device=dev)
    rows = torch.empty((t, k + n_shared), dtype=torch.int32, device=dev)
    split = config.split_k
    part = torch.empty((split, units * t, two_i) if split > 1 else (1,), dtype=torch.float32, device=dev)
    fused = x is not None
    xq_arg, xsf_arg = (x, x) if fused else (x_q, x_sf)     # x_sf unused when fused
    k_block = triton.next_power_of_2(k)
    _gate_up_kernel[(units, inter // QUANT_BLOCK, split)](
        xq_arg, xsf_arg, ids, w13, w13_sf, h_q, h_sf, rows, part, t, k, n_shared, n_routed, limit, units * t,
        HIDDEN=d, INTER=inter, MAX_T=max_t, K_BLOCK=k_block, SPLIT_K=split, X_FLOAT=fused, DOT_F32=_INTERPRETED,
        FP8_DOT=config.fp8_dot, SOFT=_INTERPRETED, AMAX_FLOOR=AMAX_FLOOR, num_warps=config.gate_warps,
        enable_fp_fusion=False, **_stages(config.gate_stages))
    if split > 1:
        _gate_up_finish_kernel[(units, inter // QUANT_BLOCK)](
            part, ids, h_q, h_sf, t, k, n_routed, limit, units * t, INTER=inter, MAX_T=max_t, K_BLOCK=k_block,
            SPLIT_K=split, SOFT=_INTERPRETED, AMAX_FLOOR=AMAX_FLOOR, num_warps=4, enable_fp_fusion=False)
    return GemvScratch(h_q, h_sf, rows, max_t)


def down_proj(scratch: GemvScratch, ids, w2, w2_sf, n_routed: int, config: GemvConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Kernel 2 (no checks): per unit, out = bf16(h_q W2^T) -> bf16 [U * max_t, D] (rows of ``scratch``)."""
    t, k = ids.shape
    g, d, inter = w2.shape
    units = t * k + g - n_routed
    out = torch.empty((units * scratch.max_t, d), dtype=torch.bfloat16, device=w2.device)
    _down_kernel[(units, triton.cdiv(d, config.down_block_n))](
        scratch.h_q, scratch.h_sf, ids, w2, w2_sf, out, t, k, n_routed, HIDDEN=d, INTER=inter, MAX_T=scratch.max_t,
        K_BLOCK=triton.next_power_of_2(k), BLOCK_N=config.down_block_n, DOT_F32=_INTERPRETED,
        FP8_DOT=config.fp8_dot, SOFT=_INTERPRETED,
        num_warps=config.down_warps, enable_fp_fusion=False, **_stages(config.down_stages))
    return out


def moe_gemv(x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
             w13_sf: torch.Tensor, w2: torch.Tensor, w2_sf: torch.Tensor, *, n_routed: int, swiglu_limit: float,
             out_dtype: torch.dtype = torch.bfloat16, validate_ids: bool = True,
             config: GemvConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """``y [T, D]`` (out_dtype) = sum over slots of w * expert(x) + the shared slices (module docstring).

    ``validate_ids=True`` checks on the host that every id is in [0, n_routed) (one device sync); ``False`` never
    syncs (CUDA-graph capturable) and drops out-of-range ids. A token repeating an expert is computed correctly
    (both slots read the same unit row). ``config``: launch configuration (``GemvConfig``; ``fuse_x_quant`` has no
    effect here: x arrives quantised)."""
    t, k, d, inter, _, limit = check_gemv_args(x_q, x_sf, weights, ids, w13, w13_sf, w2, w2_sf, n_routed,
                                               swiglu_limit)
    check_config(config, d, inter)
    if validate_ids:
        chk.index_range("ids", ids, 0, n_routed, "expert ids")
    if t == 0:
        return torch.empty((0, d), dtype=out_dtype, device=x_q.device)
    scratch = gate_up_swiglu(x_q, x_sf, ids, w13, w13_sf, n_routed, limit, config)
    out = down_proj(scratch, ids, w2, w2_sf, n_routed, config)
    return combine_rows(out, scratch.rows, weights, out_dtype, check_rows=False)


def moe_gemv_x(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w13_sf: torch.Tensor,
               w2: torch.Tensor, w2_sf: torch.Tensor, *, n_routed: int, swiglu_limit: float,
               out_dtype: torch.dtype | None = None, validate_ids: bool = True,
               config: GemvConfig = GemvConfig(fuse_x_quant=True)) -> torch.Tensor:
    """``moe_gemv`` from the unquantised ``x`` (bf16/fp16/fp32 [T, D]; out_dtype defaults to x's): with
    ``config.fuse_x_quant`` the gate/up kernel quantises x per 1x128 block itself (same bits as quant_fp8 for
    finite x: three launches in all), else quant_fp8 runs first. Everything else as ``moe_gemv``."""
    if not config.fuse_x_quant:
        from ...quant import FP8_AMAX_FLOOR, quant_fp8

        chk.tensor("x", x, (torch.bfloat16, torch.float16, torch.float32), dim=2)
        x_q, x_sf = quant_fp8(x, QUANT_BLOCK, pow2=True, amax_floor=FP8_AMAX_FLOOR)
        return moe_gemv(x_q.contiguous(), x_sf.contiguous(), weights, ids, w13, w13_sf, w2, w2_sf, n_routed=n_routed,
                        swiglu_limit=swiglu_limit, out_dtype=out_dtype or x.dtype, validate_ids=validate_ids,
                        config=config)
    t, k, d, inter, _, limit = check_gemv_args(x, None, weights, ids, w13, w13_sf, w2, w2_sf, n_routed, swiglu_limit,
                                               x_float=True)
    check_config(config, d, inter)
    if validate_ids:
        chk.index_range("ids", ids, 0, n_routed, "expert ids")
    out_dtype = out_dtype or x.dtype
    if t == 0:
        return torch.empty((0, d), dtype=out_dtype, device=x.device)
    scratch = gate_up_swiglu(None, None, ids, w13, w13_sf, n_routed, limit, config, x=x)
    out = down_proj(scratch, ids, w2, w2_sf, n_routed, config)
    return combine_rows(out, scratch.rows, weights, out_dtype, check_rows=False)
