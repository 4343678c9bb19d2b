"""Triton: KV compressor pooling + RMSNorm + RoPE + fp8 nope round trip (dsv4-layers.md 3.4), prefill form.

Same contract as ``dsv4lab.kernels.reference.compressor.compress``; the two projections stay torch GEMMs
(``A = x @ wkv.T``, ``S = x @ wgate.T``, fp32 out) and ONE kernel does the rest from A and S:

    entry i, channel ch:  candidates u with (value A[t_u, col_u], score S[t_u, col_u] + ape[t_u % r, col_u])
        r = 128: t_u = 128 i + u, col_u = ch                         (u < 128)
        r = 4:   t_u = 4 i - 4 + u, col_u = ch + hd * (u >= 4)         (u < 8; t_u < 0 is absent)
    pooled = sum_u softmax_u(score) value                            (fp32)
    y = RoPE(RMSNorm(pooled; w), pos = i r)  -> bf16 (one rounding)
    fp8_nope: y[:nope] -> e4m3 with a power-of-two scale per 64 channels (amax floor 1e-4) -> back to bf16

Bytes: the kernel reads A and S once (8 c hd bytes per token, c = 2 for r = 4) and writes 2 hd bytes per entry;
everything else (ape, norm weight, the cos/sin rows of the entries) is small and L2-resident.

Tiling. A program owns one entry x BLOCK_C channels and walks the candidates in tiles of ROWS x BLOCK_C.
Each lane (candidate row, channel) keeps its own online-softmax state, so the loop is purely elementwise (no
cross-thread reduction per tile); the ROWS lanes of a channel are merged once at the end. With BLOCK_C = hd the
program also normalises, rotates and quantises its row. With BLOCK_C < hd (few entries, e.g. ratio 128 at
T = 4096 has 32, which would leave most SMs idle) every program writes its pooled slice to an fp32 workspace and
bumps a per-entry arrival counter; the LAST program of the entry reads the row back (from L2) and finishes it, so
it is still one launch. The counters are reset by that program (a cached, zeroed buffer per device and stream).

Design "tiles" (opt-in, ``config["design"] = "tiles"``; ``_compress_tiles_kernel``): the channel slices above read
BLOCK_C * 4 bytes of each 2 KB row, and the programs running together share a slice, not a row (bad DRAM
locality: block_c 128 ran 2.3x slower than 512 on the H100); ratio 128 walks 128 candidates serially; hd = 128
gives tiny programs. Here a program loads one tile [entries, candidates / groups, hd] of whole rows at once, takes
several entries when hd is small, and for ratio 128 splits the candidates (not the channels) over ``groups``
programs numbered next to each other, merged by the last one to arrive as above.

cos/sin of the entry positions come from ``rope.rope_cos_sin`` (as the reference), cached per ``inv_freq``
tensor (by identity and version), so a call launches no torch kernels besides the Triton one.

Interpreter: its fp32 -> bf16 cast truncates and its e4m3 cast is wrong, so there the kernel rounds to the bf16
grid (RNE) and to the e4m3 grid with integer ops first (``SOFT_ROUND``); on the GPU the hardware casts round.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from ...quant import FP8_AMAX_FLOOR
from ...rope import rope_cos_sin
from ..reference._attn_checks import ANY_FLOAT, check_inv_freq, check_tensor
from ..reference.compressor import FP8_KV_BLOCK, RATIOS
from .inv_rope_fp8_quant import _scale_bits, _to_e4m3

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # fixed when @triton.jit below runs

# Launch configurations. ``block_c``: channels per program (None: hd, halved while the grid has fewer than
# ``target_programs`` programs, down to ``min_block_c``); ``rows``: candidate rows per tile; ``num_warps``.
# DEFAULT_CONFIG is what the launcher uses; CONFIGS is what bench/attention_kernels.py sweeps on the GPU (every
# config's time is recorded), so the lead can switch DEFAULT_CONFIG from the H100 records.
DEFAULT_CONFIG: dict[int, dict] = {
    # from the H100 sweep (data/results/h100/attention_kernels.jsonl): r=4 hd=512 47 % / 79 % of copy BW at
    # T = 4096 / 16384 with 2 warps (24 % / 78 % with 4); r=128 36 % / 41 % with 16 rows (8 % / 21 % with 64)
    4: dict(block_c=None, rows=8, num_warps=2, target_programs=264, min_block_c=64),
    128: dict(block_c=None, rows=16, num_warps=4, target_programs=528, min_block_c=32),
}
CONFIGS: dict[int, list[dict]] = {
    4: [dict(block_c=bc, rows=rows, num_warps=nw) for bc, rows, nw in
        [(None, 8, 4), (None, 8, 8), (None, 8, 2), (None, 4, 4), (256, 8, 4), (128, 8, 4)]],
    128: [dict(block_c=bc, rows=rows, num_warps=nw) for bc, rows, nw in
          [(None, 64, 4), (None, 128, 8), (None, 32, 4), (None, 16, 4), (32, 128, 4), (64, 64, 8)]],
}

# Design "tiles" (``_compress_tiles_kernel``, opt-in via ``config["design"] = "tiles"``): whole contiguous rows,
# one load of [entries, candidates / groups, hd] per program, several entries per program for hd = 128, the
# candidates split over ``groups`` programs (merged by the last one) for ratio 128. Swept by the bench next to
# CONFIGS, per (ratio, head_dim) shape; DEFAULT_CONFIG switches to one of them only after the H100 numbers.
TILES_CONFIGS: dict[tuple[int, int], list[dict]] = {
    (4, 512): [dict(design="tiles", entries=e, groups=g, num_warps=w) for e, g, w in
               [(1, 1, 2), (1, 1, 4), (1, 2, 2), (1, 2, 4), (2, 1, 4)]],
    (128, 512): [dict(design="tiles", entries=1, groups=g, num_warps=w) for g, w in
                 [(16, 4), (16, 2), (8, 8), (32, 2), (32, 4)]],
    (4, 128): [dict(design="tiles", entries=e, groups=g, num_warps=w) for e, g, w in
               [(4, 1, 4), (2, 1, 2), (8, 1, 8), (4, 1, 2), (2, 2, 2)]],
}


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
    # nope pairs pass through untouched (a rotation by 0 could flip the sign of an exact zero)
    y = tl.reshape(tl.join(tl.where(rot_pair, even * cos - odd * sin, even),
                           tl.where(rot_pair, odd * cos + even * sin, odd)), (HEAD_DIM,))
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
def _candidate_tile(a_ptr, s_ptr, ape_ptr, entry, ch, u, stride_row,
                    RATIO: tl.constexpr, OVERLAP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(value, score) of candidates ``u`` [ROWS] x channels ``ch`` [BLOCK_C]; absent candidates score -inf."""
    FIRST: tl.constexpr = RATIO if OVERLAP else 0               # candidate u sits at token RATIO*i - FIRST + u
    token = entry * RATIO - FIRST + u
    if OVERLAP:
        col = ch[None, :] + HEAD_DIM * (u >= RATIO).to(tl.int64)[:, None]
        present = (token >= 0)[:, None]
        value = tl.load(a_ptr + token[:, None] * stride_row + col, mask=present, other=0.0)
        score = tl.load(s_ptr + token[:, None] * stride_row + col, mask=present, other=0.0) \
            + tl.load(ape_ptr + (u % RATIO)[:, None] * stride_row + col)
        score = tl.where(present, score, float("-inf"))
    else:
        col = ch[None, :]
        value = tl.load(a_ptr + token[:, None] * stride_row + col)
        score = tl.load(s_ptr + token[:, None] * stride_row + col) + tl.load(ape_ptr + u[:, None] * stride_row + col)
    return value, score


@triton.jit
def _compress_kernel(a_ptr, s_ptr, ape_ptr, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, pooled_ptr, count_ptr,
                     stride_row, eps,
                     RATIO: tl.constexpr, OVERLAP: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr,
                     BLOCK_C: tl.constexpr, ROWS: tl.constexpr, FP8_NOPE: tl.constexpr,
                     QBLOCK: tl.constexpr, AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr):
    N_CAND: tl.constexpr = 2 * RATIO if OVERLAP else RATIO
    N_CBLOCKS: tl.constexpr = HEAD_DIM // BLOCK_C
    entry = tl.program_id(0).to(tl.int64)
    cblock = tl.program_id(1)
    ch = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    u = tl.arange(0, ROWS)
    if N_CAND == ROWS:
        value, score = _candidate_tile(a_ptr, s_ptr, ape_ptr, entry, ch, u, stride_row, RATIO, OVERLAP, HEAD_DIM)
        m = tl.max(score, axis=0)                                  # finite: the entry's own block is present
        p = tl.exp(score - m[None, :])
        pooled = tl.sum(p * value, axis=0) / tl.sum(p, axis=0)
    else:
        # per-lane online softmax: elementwise over tiles, one merge over the ROWS lanes at the end
        m = tl.full([ROWS, BLOCK_C], float("-inf"), tl.float32)
        l = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for u0 in range(0, N_CAND, ROWS):
            value, score = _candidate_tile(a_ptr, s_ptr, ape_ptr, entry, ch, u0 + u, stride_row, RATIO, OVERLAP,
                                           HEAD_DIM)
            m_new = tl.maximum(m, score)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # lanes with no candidate yet stay (0, 0)
            alpha = tl.exp(m - m_ref)
            p = tl.exp(score - m_ref)
            l = l * alpha + p
            acc = acc * alpha + p * value
            m = m_new
        m_row = tl.max(m, axis=0)                                  # finite: the entry's own block is present
        w = tl.exp(m - m_row[None, :])
        pooled = tl.sum(acc * w, axis=0) / tl.sum(l * w, axis=0)
    if N_CBLOCKS == 1:
        _finish_row(pooled, entry, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, eps, HEAD_DIM, ROPE_DIM, FP8_NOPE,
                    QBLOCK, AMAX_FLOOR, SOFT_ROUND)
    else:
        tl.store(pooled_ptr + entry * HEAD_DIM + ch, pooled)
        tl.debug_barrier()                                         # every thread's slice is written first
        arrived = tl.atomic_add(count_ptr + entry, 1, sem="acq_rel", scope="gpu")
        if arrived == N_CBLOCKS - 1:                               # the last slice of this entry: finish the row
            row = tl.load(pooled_ptr + entry * HEAD_DIM + tl.arange(0, HEAD_DIM), cache_modifier=".cg")
            _finish_row(row, entry, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, eps, HEAD_DIM, ROPE_DIM, FP8_NOPE,
                        QBLOCK, AMAX_FLOOR, SOFT_ROUND)
            tl.store(count_ptr + entry, 0)                         # leave the cached counters zeroed


@triton.jit
def _epilogue_operands(entry, valid, norm_w_ptr, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr):
    """(norm weight [HEAD_DIM] fp32, cos, sin [ENTRIES, HEAD_DIM / 2]: 1 / 0 on the nope pairs) of ``_finish_rows``;
    loaded before the candidate tile where every program finishes its rows, so their latency overlaps it."""
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    pair = tl.arange(0, HEAD_DIM // 2)
    rot_pair = (pair >= NOPE // 2)[None, :] & valid[:, None]
    table = entry[:, None] * (ROPE_DIM // 2) + pair[None, :] - NOPE // 2
    return (tl.load(norm_w_ptr + tl.arange(0, HEAD_DIM)).to(tl.float32),
            tl.load(cos_ptr + table, mask=rot_pair, other=1.0), tl.load(sin_ptr + table, mask=rot_pair, other=0.0))


@triton.jit
def _finish_rows(pooled, entry, valid, norm_w, cos, sin, out_ptr, eps,
                 HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, FP8_NOPE: tl.constexpr, QBLOCK: tl.constexpr,
                 AMAX_FLOOR: tl.constexpr, SOFT_ROUND: tl.constexpr, ENTRIES: tl.constexpr):
    """``_finish_row`` for ENTRIES rows at once: ``pooled`` [ENTRIES, HEAD_DIM], rows with ``valid`` False skipped;
    ``norm_w``, ``cos``, ``sin`` from ``_epilogue_operands``."""
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    dims = tl.arange(0, HEAD_DIM)
    ms = tl.sum(pooled * pooled, axis=1) / HEAD_DIM
    y = pooled * tl.rsqrt(ms + eps)[:, None] * norm_w[None, :]
    rot_pair = (tl.arange(0, HEAD_DIM // 2) >= NOPE // 2)[None, :]
    even, odd = tl.split(tl.reshape(y, (ENTRIES, HEAD_DIM // 2, 2)))
    # nope pairs pass through untouched (a rotation by 0 could flip the sign of an exact zero)
    y = tl.reshape(tl.join(tl.where(rot_pair, even * cos - odd * sin, even),
                           tl.where(rot_pair, odd * cos + even * sin, odd)), (ENTRIES, HEAD_DIM))
    yb = _round_bf16(y, SOFT_ROUND)
    if FP8_NOPE:
        blocks = tl.reshape(yb.to(tl.float32), (ENTRIES, HEAD_DIM // QBLOCK, QBLOCK))
        amax = tl.maximum(tl.max(tl.abs(blocks), axis=2), AMAX_FLOOR)
        scale, inv_scale = _scale_bits(amax)
        deq = _to_e4m3(blocks * inv_scale[:, :, None], SOFT_ROUND).to(tl.float32) * scale[:, :, None]
        is_nope = (tl.arange(0, HEAD_DIM // QBLOCK) < NOPE // QBLOCK)[None, :, None]
        yb = tl.reshape(tl.where(is_nope, deq, blocks), (ENTRIES, HEAD_DIM)).to(tl.bfloat16)   # exact: bf16 grid
    tl.store(out_ptr + entry[:, None] * HEAD_DIM + dims[None, :], yb, mask=valid[:, None])


@triton.jit
def _compress_tiles_kernel(a_ptr, s_ptr, ape_ptr, norm_w_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr, lse_ptr,
                           count_ptr, n_entries, stride_row, eps,
                           RATIO: tl.constexpr, OVERLAP: tl.constexpr, HEAD_DIM: tl.constexpr,
                           ROPE_DIM: tl.constexpr, ENTRIES: tl.constexpr, GROUPS: tl.constexpr,
                           MERGE: tl.constexpr, FP8_NOPE: tl.constexpr, QBLOCK: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                           SOFT_ROUND: tl.constexpr):
    """Design "tiles": a program loads ONE tile [ENTRIES, N_CAND / GROUPS, HEAD_DIM] of whole contiguous rows (no
    loop, every load in flight at once) for ENTRIES consecutive entries and candidate group ``g``.
    GROUPS = 1: it pools and finishes its rows. GROUPS > 1: it writes per-channel partials (the group's softmax
    average ``part`` and log-sum-exp ``lse``; an all-absent group writes (0, -inf)) and the last of the GROUPS
    programs of the entry block (arrival counter) merges them:
    pooled = sum_g e^(lse_g - M) part_g / sum_g e^(lse_g - M).
    Programs are numbered group-fastest, so the groups of one entry block (one contiguous range of tokens) run
    together."""
    N_CAND: tl.constexpr = 2 * RATIO if OVERLAP else RATIO
    ROWS: tl.constexpr = N_CAND // GROUPS
    FIRST: tl.constexpr = RATIO if OVERLAP else 0               # candidate u sits at token RATIO*i - FIRST + u
    pid = tl.program_id(0)
    g = pid % GROUPS
    eblock = pid // GROUPS
    entry = eblock.to(tl.int64) * ENTRIES + tl.arange(0, ENTRIES)
    valid = entry < n_entries
    if GROUPS == 1:
        norm_w, cos, sin = _epilogue_operands(entry, valid, norm_w_ptr, cos_ptr, sin_ptr, HEAD_DIM, ROPE_DIM)
    u = g * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    token = entry[:, None] * RATIO - FIRST + u[None, :]                                     # [E, ROWS]
    present = (token >= 0) & valid[:, None]
    if OVERLAP:
        col = dims[None, :] + HEAD_DIM * (u >= RATIO).to(tl.int64)[:, None]                # [ROWS, HD]
    else:
        col = dims[None, :] + tl.zeros([ROWS, 1], dtype=tl.int64)
    offs = token[:, :, None] * stride_row + col[None, :, :]                                 # [E, ROWS, HD]
    value = tl.load(a_ptr + offs, mask=present[:, :, None], other=0.0)
    score = tl.load(s_ptr + offs, mask=present[:, :, None], other=0.0) \
        + tl.load(ape_ptr + (u % RATIO)[:, None] * stride_row + col)[None, :, :]
    score = tl.where(present[:, :, None], score, float("-inf"))
    m = tl.max(score, axis=1)                                                               # [E, HD]
    m_ref = tl.where(m == float("-inf"), 0.0, m)                 # an all-absent group keeps (l, acc) = (0, 0)
    p = tl.exp(score - m_ref[:, None, :])
    l = tl.sum(p, axis=1)
    acc = tl.sum(p * value, axis=1)
    if GROUPS == 1:
        _finish_rows(acc / tl.where(valid[:, None], l, 1.0), entry, valid, norm_w, cos, sin, out_ptr, eps, HEAD_DIM,
                     ROPE_DIM, FP8_NOPE, QBLOCK, AMAX_FLOOR, SOFT_ROUND, ENTRIES)
    else:
        has = l > 0.0
        slot = (entry[:, None] * GROUPS + g) * HEAD_DIM + dims[None, :]
        tl.store(part_ptr + slot, tl.where(has, acc / tl.where(has, l, 1.0), 0.0), mask=valid[:, None])
        tl.store(lse_ptr + slot, tl.where(has, m_ref + tl.log(tl.where(has, l, 1.0)), float("-inf")),
                 mask=valid[:, None])
        tl.debug_barrier()                                         # every thread's partials are written first
        arrived = tl.atomic_add(count_ptr + eblock, 1, sem="acq_rel", scope="gpu")
        if arrived == GROUPS - 1:                                  # the last group of this entry block: merge
            # MERGE groups per step (online over steps): bounds the registers of the [E, MERGE, HD] loads
            top = tl.full([ENTRIES, HEAD_DIM], float("-inf"), tl.float32)
            num = tl.zeros([ENTRIES, HEAD_DIM], dtype=tl.float32)
            den = tl.zeros([ENTRIES, HEAD_DIM], dtype=tl.float32)
            for g0 in range(0, GROUPS, MERGE):
                gs = g0 + tl.arange(0, MERGE)
                slots = (entry[:, None, None] * GROUPS + gs[None, :, None]) * HEAD_DIM + dims[None, None, :]
                part = tl.load(part_ptr + slots, mask=valid[:, None, None], other=0.0, cache_modifier=".cg")
                lse = tl.load(lse_ptr + slots, mask=valid[:, None, None], other=0.0, cache_modifier=".cg")
                new_top = tl.maximum(top, tl.max(lse, axis=1))
                ref = tl.where(new_top == float("-inf"), 0.0, new_top)   # all absent so far: sums stay 0
                alpha = tl.exp(top - ref)
                w = tl.exp(lse - ref[:, None, :])
                num = num * alpha + tl.sum(w * part, axis=1)
                den = den * alpha + tl.sum(w, axis=1)
                top = new_top
            pooled = num / den                                     # den > 0: the entry's own block is present
            norm_w, cos, sin = _epilogue_operands(entry, valid, norm_w_ptr, cos_ptr, sin_ptr, HEAD_DIM, ROPE_DIM)
            _finish_rows(pooled, entry, valid, norm_w, cos, sin, out_ptr, eps, HEAD_DIM, ROPE_DIM,
                         FP8_NOPE, QBLOCK, AMAX_FLOOR, SOFT_ROUND, ENTRIES)
            tl.store(count_ptr + eblock, 0)                        # leave the cached counters zeroed


# ---- host side ----------------------------------------------------------------------------------------------
_rope_tables: dict[int, tuple] = {}      # id(inv_freq) -> (weakref, version, {(ratio, device): (cos, sin)})
_counters: dict[tuple, torch.Tensor] = {}
# tables replaced or dropped from the cache stay referenced: a CUDA graph captured while they were cached reads
# their memory at every replay (they are small: rows x rope/2 fp32)
_retired: list[tuple] = []


def _forget_tables(dead: weakref.ref) -> None:
    """Drop the tables of a freed ``inv_freq`` (its id may be reused by another tensor)."""
    for key, hit in list(_rope_tables.items()):
        if hit[0] is dead:
            _retired.extend(hit[2].values())
            del _rope_tables[key]


def entry_cos_sin(inv_freq: torch.Tensor, ratio: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [>= n, rope/2] fp32 at positions ``i * ratio`` (``rope.rope_cos_sin``, as the reference), cached
    per ``inv_freq`` tensor while it lives and is not modified in place (rows do not depend on the table length)."""
    key = id(inv_freq)
    hit = _rope_tables.get(key)
    if hit is None or hit[0]() is not inv_freq or hit[1] != inv_freq._version:
        hit = _rope_tables[key] = (weakref.ref(inv_freq, _forget_tables), inv_freq._version, {})
    tables = hit[2]
    dkey = (ratio, str(device))
    cs = tables.get(dkey)
    if cs is None or cs[0].shape[0] < n:
        rows = max(n, 2 * cs[0].shape[0] if cs is not None else 0, 64)
        cos, sin = rope_cos_sin(torch.arange(rows, device=device) * ratio, inv_freq.to(device))
        if _capturing(device):
            # under CUDA-graph capture these ops are only recorded: the tensors hold nothing until a replay, so
            # they must not be cached for eager calls
            return cos.contiguous(), sin.contiguous()
        if cs is not None:
            _retired.append(cs)   # a graph captured earlier may still read the smaller table: keep it alive
        cs = tables[dkey] = (cos.contiguous(), sin.contiguous())
    return cs


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters (>= n), one buffer per device and stream; the kernel leaves them zeroed."""
    if _capturing(device):
        # a captured zeros() runs at every replay, so a graph gets its own counters, zeroed each time; a cached
        # buffer filled during capture would stay unzeroed until that graph replays
        return torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        buf = _counters[key] = torch.zeros(max(n, 2 * (buf.numel() if buf is not None else 0), 256),
                                           dtype=torch.int32, device=device)
    return buf


def resolve_config(ratio: int, n_entries: int, head_dim: int, config: dict | None = None) -> dict:
    """The launch parameters used for ``n_entries`` entries, everything checked. Design "channels" (the default):
    (block_c, rows, num_warps) from ``config`` over ``DEFAULT_CONFIG[ratio]``, ``block_c=None`` resolved. Design
    "tiles" (``config["design"] == "tiles"``): (design, entries, groups, num_warps), see ``_resolve_tiles``."""
    if (config or {}).get("design", DEFAULT_CONFIG[ratio].get("design", "channels")) == "tiles":
        return _resolve_tiles(ratio, head_dim, config)
    cfg = {**DEFAULT_CONFIG[ratio], **(config or {})}
    cfg.pop("design", None)
    unknown = set(cfg) - {"block_c", "rows", "num_warps", "target_programs", "min_block_c"}
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}")
    block_c = cfg["block_c"]
    if block_c is None:
        block_c = head_dim
        while n_entries * (head_dim // block_c) < cfg["target_programs"] and block_c > cfg["min_block_c"]:
            block_c //= 2
    if (isinstance(block_c, bool) or not isinstance(block_c, int) or block_c > head_dim or head_dim % block_c
            or block_c & (block_c - 1)):
        raise ValueError(f"block_c: expected a power-of-two divisor of head_dim={head_dim}, got {block_c!r}")
    n_cand = 8 if ratio == 4 else ratio
    rows = cfg["rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or n_cand % rows or rows & (rows - 1):
        raise ValueError(f"rows: expected a power-of-two divisor of the {n_cand} candidates, got {rows!r}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {cfg['num_warps']!r}")
    return dict(block_c=block_c, rows=rows, num_warps=cfg["num_warps"])


def _resolve_tiles(ratio: int, head_dim: int, config: dict) -> dict:
    """Design "tiles" (``_compress_tiles_kernel``): ``entries`` consecutive entries per program (power of two,
    default 1), the candidates split into ``groups`` programs per entry (power-of-two divisor of the 8 (r=4) or
    128 (r=128) candidates, default 1), ``num_warps`` (default 4). Keys of the other design are refused."""
    cfg = {"entries": 1, "groups": 1, "num_warps": 4, **{k: v for k, v in config.items() if k != "design"}}
    unknown = set(cfg) - {"entries", "groups", "num_warps"}
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)} for design 'tiles' (entries, groups, num_warps)")
    n_cand = 8 if ratio == 4 else ratio
    for name, limit in (("entries", 64), ("groups", n_cand)):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > limit or v & (v - 1) or n_cand % v:
            raise ValueError(f"{name}: expected a power of two in [1, {limit}], got {v!r}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {cfg['num_warps']!r}")
    return dict(design="tiles", entries=cfg["entries"], groups=cfg["groups"], num_warps=cfg["num_warps"])


def compress_from_projections(A: torch.Tensor, S: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                              ratio: int, inv_freq: torch.Tensor, *, head_dim: int, eps: float = 1e-6,
                              fp8_nope: bool = False, block_c: int | None = None,
                              config: dict | None = None) -> torch.Tensor:
    """The fused part of ``compress``: fp32 projections ``A``, ``S`` [T, c*hd] -> entries [T // ratio, hd] bf16.

    ``config``: launch parameters over ``DEFAULT_CONFIG[ratio]`` (see ``CONFIGS``); ``block_c`` overrides its
    channels per program (None: the config's choice)."""
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
    cfg = resolve_config(ratio, n, head_dim, config if block_c is None else {**(config or {}), "block_c": block_c})
    out = torch.empty(n, head_dim, dtype=torch.bfloat16, device=A.device)
    if n == 0:
        return out
    A, S = A.contiguous(), S.contiguous()
    ape32 = ape.to(torch.float32).contiguous()
    cos, sin = entry_cos_sin(inv_freq, ratio, n, A.device)
    if cfg.get("design") == "tiles":
        E, G = cfg["entries"], cfg["groups"]
        blocks = triton.cdiv(n, E)
        if G > 1:
            part = torch.empty(2, n, G, head_dim, dtype=torch.float32, device=A.device)
            counters = _arrival_counters(blocks, A.device)
        else:
            part, counters = out, out                              # unused (GROUPS = 1 never touches them)
        _compress_tiles_kernel[(blocks * G,)](
            A, S, ape32, norm_weight, cos, sin, out, part[0] if G > 1 else part, part[1] if G > 1 else part,
            counters, n, A.stride(0), float(eps),
            RATIO=ratio, OVERLAP=ratio == 4, HEAD_DIM=head_dim, ROPE_DIM=rope, ENTRIES=E, GROUPS=G,
            MERGE=max(1, min(G, 32 * 32 * cfg["num_warps"] // (E * head_dim))),   # <= 32 values/thread/load
            FP8_NOPE=bool(fp8_nope and nope), QBLOCK=FP8_KV_BLOCK, AMAX_FLOOR=FP8_AMAX_FLOOR,
            SOFT_ROUND=_INTERPRETED, num_warps=cfg["num_warps"])
        return out
    split = cfg["block_c"] < head_dim
    pooled = torch.empty(n, head_dim, dtype=torch.float32, device=A.device) if split else out
    counters = _arrival_counters(n, A.device) if split else out
    _compress_kernel[(n, head_dim // cfg["block_c"])](
        A, S, ape32, norm_weight, cos, sin, out, pooled, counters, A.stride(0), float(eps),
        RATIO=ratio, OVERLAP=ratio == 4, HEAD_DIM=head_dim, ROPE_DIM=rope, BLOCK_C=cfg["block_c"], ROWS=cfg["rows"],
        FP8_NOPE=bool(fp8_nope and nope), QBLOCK=FP8_KV_BLOCK, AMAX_FLOOR=FP8_AMAX_FLOOR, SOFT_ROUND=_INTERPRETED,
        num_warps=cfg["num_warps"])
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
