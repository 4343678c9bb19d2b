"""Triton: sparse MQA attention with a per-head sink over per-query index lists (dsv4-layers.md 3.6).

Same contract as ``dsv4lab.kernels.reference.attention.sparse_attention_with_sink``:

    l_u    = scale * q[t,h] . kv[idx[t,u]]                      (fp32 accumulate; V = K)
    p_u    = exp(l_u) / (sum_u' exp(l_u') + exp(sink[h]))
    o[t,h] = sum_u p_u kv[idx[t,u]]                             (bf16; a row with no candidate gives 0)

Design. All heads of a token read the same K rows (MQA), so one program owns a token and a tile of BLOCK_H heads
(by default all 64 Flash heads: M = 64 for wgmma, each K row gathered once per token) and walks the token's index
list in chunks of BLOCK_N entries: gather the K rows [BLOCK_N, d] (async copies; how far ahead they are issued
depends on block_n x num_stages, see ``CONFIGS``), scores = q_tile [BLOCK_H, d] @ K^T on the tensor cores, online softmax (running max
starts at the sink logit, so it is never -inf while the sink is finite), acc += p @ K (the same K tile: V = K). The
sink enters the normaliser at the end: ``o = acc / (l + exp(sink - m))``. Work is in the log2 domain (exp2 of logits
pre-multiplied by log2 e). With ``trim`` (opt-in: ``TRIM_DEFAULT`` is off in both regimes, from the H100 sweeps) each
program first scans its index entries (4 B each, vs 2 d B per K row) for the last valid one and stops there, so the
causal -1 padding of early tokens' compressed lists costs no gathers or MMAs.

Decode (few tokens) cuts each index list into ``num_splits`` pieces of whole chunks (flash-decoding): the count comes
from a wave model (``choose_splits``: 1 program per SM, pieces of >= 64 entries), each piece writes its unnormalised
(acc, m, l) in fp32, and a combine kernel tiled over (token, 16 heads, 128 dims) merges them with the sink. A piece
with no valid entry contributes (0, sink, 0), which the merge weighs to nothing. Launch configs come from the
``CONFIGS`` table, the defaults from ``DEFAULTS`` (one name per regime; set from the H100 sweep).

Precision. On the GPU q and K stay bf16 in ``tl.dot`` (fp32 accumulation) and p is rounded to bf16 before p @ K
(relative error <= 2^-9 per weight, so |o - o_exact| <= 2^-9 max|K| beyond the output rounding). Under the
interpreter bf16 ``tl.dot`` is wrong (triton#11584), so operands are cast to fp32 and p stays fp32.

Index entries outside [0, N) are masked like -1 in the kernel; the launcher rejects them first with
``_checks.index_range`` (on a GPU one device sync per call, skipped under CUDA-graph capture and torch.compile and
with DSV4LAB_GPU_RANGE_CHECKS=0).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk
from ..reference._attn_checks import ANY_FLOAT, check_tensor

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # fixed when @triton.jit below runs
_LOG2E = 1.4426950408889634
_H100_SMS = 132                 # SM count used when no CUDA device is visible (CPU interpreter, AOT builds)
_MIN_SPLIT_ENTRIES = 64         # a split reads >= 64 K rows: its fp32 partial [BLOCK_H, d] stays <= 4x those rows
_DECODE_MAX_TOKENS = 256        # launches with at most this many query tokens use CONFIGS[DEFAULTS["decode"]]
_TRIM_BLOCK = 256               # index entries scanned per step when looking for a list's last valid entry

# Candidate launch configs (name -> knobs), each timed on the H100 by bench/attention_kernels.py (prefill T=8192,
# decode shapes). Static sm_90a facts from `python bench/sparse_attention_aot.py` (no GPU needed): all fit in the
# 227 KiB of shared memory without register spills, except h64n64w8s2 (160 B of spills unsplit). The K-row gather is
# an async copy whose prefetch depth is set by block_n x num_stages: depth 1 (the gather of chunk i+1 is only issued at
# the end of iteration i and waited for at the top of i+1: nothing overlaps it) for h64n32w8s2 / h64n64w8s2, depth 2
# for h64n32w8s5 (q 64 KiB + 3 x 32 KiB of K), depth 3 for h64n32w8s7 (193 KiB) and h64n16w8s7. block_h = 64 runs
# both dots as wgmma (M = 64 = all Flash heads of a token, so each K row is gathered once per token); block_h 32/16
# fall back to mma.sync and re-read a token's rows once per head tile (adjacent programs, so mostly from L2).
CONFIGS: dict[str, dict] = {
    "h64n32w8s5": dict(block_h=64, block_n=32, num_warps=8, num_stages=5),
    "h64n32w8s7": dict(block_h=64, block_n=32, num_warps=8, num_stages=7),
    "h64n16w8s7": dict(block_h=64, block_n=16, num_warps=8, num_stages=7),
    "h64n32w8s2": dict(block_h=64, block_n=32, num_warps=8, num_stages=2),     # the previous default
    "h64n64w8s2": dict(block_h=64, block_n=64, num_warps=8, num_stages=2),     # the previous best at T=8192 (30 %)
    "h32n32w8s6": dict(block_h=32, block_n=32, num_warps=8, num_stages=6),
    "h16n32w4s6": dict(block_h=16, block_n=32, num_warps=4, num_stages=6),
}
# The launcher defaults: one CONFIGS name per regime (decode = at most _DECODE_MAX_TOKENS query tokens). Set these
# from the H100 sweep records (variant prefill-sweep-* / decode-sweep-*, field `config`).
# H100 sweeps (data/results/h100/attention_kernels.jsonl): h64n64w8s2 fastest at prefill T=8192 (CSA 3034 us vs
# 4030 us for h64n32w8s5) and at decode batch 64/256
DEFAULTS = {"prefill": "h64n64w8s2", "decode": "h64n64w8s2"}
# Prefill trim off: H100 T=8192 h64n64w8s2 notrim 2459 us vs trim 2820 us (CSA), 1060 vs 1190 us (HCA), session 3
TRIM_DEFAULT = {"prefill": False, "decode": False}    # decode lists are full: the scan cost 9 % at CSA batch 256


@triton.jit
def _valid_end(idx_row_ptr, n_rows, start, stop, TRIM_BLOCK: tl.constexpr, CONST_LEN: tl.constexpr):
    """1 + the position of the last valid entry of the list in [start, stop), or ``start`` if there is none."""
    end = start
    for u0 in range(0, CONST_LEN if CONST_LEN > 0 else stop - start, TRIM_BLOCK):
        offs = start + u0 + tl.arange(0, TRIM_BLOCK)
        rows = tl.load(idx_row_ptr + offs, mask=offs < stop, other=-1)
        ok = (rows >= 0) & (rows < n_rows)
        end = tl.maximum(end, tl.max(tl.where(ok, offs + 1, 0), axis=0))
    return end


@triton.jit
def _attend_chunks(q, kv_ptr, idx_row_ptr, n_rows, stride_kv, start, end, m, l, acc, scale_log2e,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, CONST_LEN: tl.constexpr):
    """Online softmax over index entries [start, end) of one token, in chunks of BLOCK_N; returns (m, l, acc)."""
    dims = tl.arange(0, HEAD_DIM)
    for u0 in range(0, CONST_LEN if CONST_LEN > 0 else end - start, BLOCK_N):
        offs = start + u0 + tl.arange(0, BLOCK_N)
        rows = tl.load(idx_row_ptr + offs, mask=offs < end, other=-1).to(tl.int64)
        valid = (rows >= 0) & (rows < n_rows)
        k = tl.load(kv_ptr + rows[:, None] * stride_kv + dims[None, :], mask=valid[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2e                     # [BLOCK_H, BLOCK_N], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)        # only when the sink is -inf too
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m = m_new
    return m, l, acc


@triton.jit
def _sparse_attn_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, o_ptr, part_acc_ptr, part_ml_ptr,
                        n_heads, n_head_blocks, n_rows, n_cand, split_len, n_splits,
                        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, scale_log2e,
                        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLIT: tl.constexpr, TRIM: tl.constexpr, DOT_FP32: tl.constexpr,
                        CONST_SPLIT_LEN: tl.constexpr, TRIM_BLOCK: tl.constexpr):
    # head tiles of one token are adjacent program ids, so they run together and share its K rows through L2
    pid = tl.program_id(0)
    token = (pid // n_head_blocks).to(tl.int64)
    heads = (pid % n_head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    h_ok = heads < n_heads
    dims = tl.arange(0, HEAD_DIM)
    idx_row = idx_ptr + token * stride_it
    start = split * split_len
    stop = tl.minimum(start + split_len, n_cand)
    # CONST_SPLIT_LEN > 0 (interpreter only): loops run over the whole split with masks, as a runtime loop bound
    # fails there with numpy >= 2.4 (1-element arrays); the result is the same, entries past `end` being invalid.
    end = stop
    if TRIM:                    # skip the trailing -1 run (causal padding of the compressed part of early tokens)
        end = _valid_end(idx_row, n_rows, start, stop, TRIM_BLOCK, CONST_SPLIT_LEN)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None].to(tl.int64) * stride_qh + dims[None, :],
                mask=h_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
    m = sink                                                    # running max starts at the sink logit
    l = tl.zeros([BLOCK_H], dtype=tl.float32)                   # sum of exp2(s - m) over candidates only
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    m, l, acc = _attend_chunks(q, kv_ptr, idx_row, n_rows, stride_kv, start, end, m, l, acc,
                               scale_log2e, HEAD_DIM, BLOCK_N, DOT_FP32, CONST_SPLIT_LEN)
    if SPLIT:
        part = (token * n_heads + heads.to(tl.int64)) * n_splits + split          # [BLOCK_H]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=h_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m, mask=h_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l, mask=h_ok)
    else:
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = l + tl.exp2(sink - m_safe)
        o = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(o_ptr + token * stride_ot + heads[:, None].to(tl.int64) * stride_oh + dims[None, :],
                 o.to(tl.bfloat16), mask=h_ok[:, None])


@triton.jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, sink_ptr, o_ptr, n_heads, n_splits, stride_ot, stride_oh,
                    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Merge the splits of one token x head tile x dim tile:
    o = sum_s 2^(m_s-M) acc_s / (sum_s 2^(m_s-M) l_s + 2^(sink-M)), M = max(max_s m_s, sink)."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    h_ok = heads < n_heads
    sp = tl.arange(0, SPLITS_P2)
    part = (token * n_heads + heads.to(tl.int64))[:, None] * n_splits + sp[None, :]     # [BLOCK_H, SPLITS_P2]
    ok = h_ok[:, None] & (sp[None, :] < n_splits)
    m_s = tl.load(part_ml_ptr + part * 2, mask=ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=ok, other=0.0)
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
    big = tl.maximum(tl.max(m_s, axis=1), sink)
    big_safe = tl.where(big == float("-inf"), 0.0, big)
    w_s = tl.exp2(m_s - big_safe[:, None])                                              # 0 for absent splits
    denom = tl.sum(w_s * l_s, axis=1) + tl.exp2(sink - big_safe)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(0, SPLITS_P2):          # constexpr bound (absent splits have weight 0 and are not loaded)
        w = tl.sum(tl.where(sp[None, :] == s, w_s, 0.0), axis=1)
        row = (token * n_heads + heads.to(tl.int64)) * n_splits + s
        acc += w[:, None] * tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                                    mask=h_ok[:, None] & (s < n_splits), other=0.0)
    o = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(o_ptr + token * stride_ot + heads[:, None].to(tl.int64) * stride_oh + dims[None, :],
             o.to(tl.bfloat16), mask=h_ok[:, None])


def _check_args(q, kv, idx, sink, scale) -> None:
    check_tensor("q", q, ndim=3)
    T, H, d = q.shape
    check_tensor("kv", kv, shape=(None, d))
    check_tensor("idx", idx, dtypes=(torch.int64, torch.int32), shape=(T, None))
    check_tensor("sink", sink, dtypes=ANY_FLOAT, shape=(H,))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a python float, got {type(scale).__name__}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"q: the Triton backend needs a power-of-two head dim >= 16, got {d}")
    devices = {t.device for t in (q, kv, idx, sink)}
    if len(devices) != 1:
        raise ValueError(f"q, kv, idx, sink: expected one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"q: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    chk.index_range("idx", idx, -1, kv.shape[0], "entries (rows of kv, -1 = masked)")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return _H100_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(programs: int, M: int, block_n: int, sms: int = _H100_SMS) -> int:
    """Number of pieces each index list is cut into (flash-decoding), from a wave model of a 1-program-per-SM kernel:
    time ~ ceil(programs * s / sms) / s; a larger s is taken only when it cuts that by >= 10 % (H100: HCA decode at
    batch 256 picked 17 splits for a 3 % modelled gain and ran 6x slower than unsplit).
    Each piece keeps >= max(_MIN_SPLIT_ENTRIES, block_n) entries."""
    max_splits = max(1, min(64, M // max(_MIN_SPLIT_ENTRIES, block_n)))
    best, best_cost = 1, float("inf")
    for s in range(1, max_splits + 1):
        cost = triton.cdiv(programs * s, sms) / s
        if cost < best_cost * 0.9:   # a split must buy >= 10 %: each one adds fp32 partials and a combine read
            best, best_cost = s, cost
    return best


def default_config(T: int, H: int, M: int, d: int, sms: int = _H100_SMS) -> dict:
    """Launch config: CONFIGS[DEFAULTS[regime]] (regime "decode" for T <= _DECODE_MAX_TOKENS), the head tile capped
    at the padded head count, and the split count from ``choose_splits``."""
    return resolve_config(T, H, M, d, sms)


def resolve_config(T: int, H: int, M: int, d: int, sms: int = _H100_SMS, *, block_h: int | None = None,
                   block_n: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, trim: bool | None = None) -> dict:
    """The config a launch with these knobs runs (None = the regime's default), splits included."""
    for k, v in (("block_h", block_h), ("block_n", block_n), ("num_splits", num_splits),
                 ("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{k}: expected a positive int, got {v!r}")
    for k, v in (("block_h", block_h), ("block_n", block_n)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{k}: expected a power of two >= 16 (tl.dot tile), got {v}")
    if trim is not None and not isinstance(trim, bool):
        raise TypeError(f"trim: expected a bool, got {type(trim).__name__}")
    regime = "decode" if T <= _DECODE_MAX_TOKENS else "prefill"
    cfg = dict(CONFIGS[DEFAULTS[regime]], trim=TRIM_DEFAULT[regime])
    cfg["block_h"] = min(cfg["block_h"], max(16, triton.next_power_of_2(H)))
    for k, v in (("block_h", block_h), ("block_n", block_n), ("num_warps", num_warps), ("num_stages", num_stages),
                 ("trim", trim)):
        if v is not None:
            cfg[k] = v
    if num_splits is None and T > _DECODE_MAX_TOKENS:
        # prefill: every split writes an fp32 partial [H, d] per token and a combine pass reads them back; at
        # T = 8192 the wave model's ~1 % gain from 10 splits cost 4x the time on the H100 (10 GB of partials)
        num_splits = 1
    cfg["num_splits"] = num_splits or choose_splits(T * triton.cdiv(H, cfg["block_h"]), M, cfg["block_n"], sms)
    return cfg


def split_layout(M: int, block_n: int, num_splits: int) -> tuple[int, int]:
    """(pieces actually launched, entries per piece) for ``num_splits`` requested: whole block_n chunks per piece,
    no empty trailing piece."""
    splits = max(1, min(num_splits, triton.cdiv(M, block_n)))
    split_len = triton.cdiv(triton.cdiv(max(M, 1), splits), block_n) * block_n
    return triton.cdiv(max(M, 1), split_len), split_len


def sparse_attention_launch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                            scale: float, *, block_h: int | None = None, block_n: int | None = None,
                            num_splits: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, trim: bool | None = None) -> torch.Tensor:
    """``sparse_attention_with_sink`` with explicit launch knobs (None = ``resolve_config``'s default).

    ``num_splits`` > 1 cuts each index list into that many contiguous pieces (whole ``block_n`` chunks; pieces past
    the list end are dropped) merged by a combine kernel; ``trim`` stops each piece after its last valid entry."""
    _check_args(q, kv, idx, sink, scale)
    T, H, d = q.shape
    M = idx.shape[1]
    cfg = resolve_config(T, H, M, d, _sm_count(q.device.index if q.device.type == "cuda" else None),
                         block_h=block_h, block_n=block_n, num_splits=num_splits, num_warps=num_warps,
                         num_stages=num_stages, trim=trim)
    out = torch.empty(T, H, d, dtype=torch.bfloat16, device=q.device)
    if T == 0 or H == 0:
        return out
    if M == 0:                  # no candidate anywhere: every output row is 0 (sink only, zero value vector)
        return out.zero_()
    if _INTERPRETED:
        cfg["num_stages"] = 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    sink = sink.contiguous()
    block_n = cfg["block_n"]
    splits, split_len = split_layout(M, block_n, cfg["num_splits"])
    head_blocks = triton.cdiv(H, cfg["block_h"])
    if splits > 1:
        part_acc = torch.empty(T * H * splits * d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(T * H * splits * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out       # unused
    _sparse_attn_kernel[(T * head_blocks, splits)](
        q, kv, idx, sink, out, part_acc, part_ml, H, head_blocks, kv.shape[0], M, split_len, splits,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1), float(scale) * _LOG2E,
        HEAD_DIM=d, BLOCK_H=cfg["block_h"], BLOCK_N=block_n, SPLIT=splits > 1, TRIM=cfg["trim"],
        DOT_FP32=_INTERPRETED, CONST_SPLIT_LEN=split_len if _INTERPRETED else 0,
        TRIM_BLOCK=min(_TRIM_BLOCK, triton.next_power_of_2(split_len)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        block_d = min(128, d)
        _combine_kernel[(T, triton.cdiv(H, 16), d // block_d)](
            part_acc, part_ml, sink, out, H, splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_H=16, BLOCK_D=block_d, SPLITS_P2=triton.next_power_of_2(splits), num_warps=4)
    return out


def sparse_attention_with_sink(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Triton backend of ``sparse_attention``: ``o`` [T, H, d] bf16 (see the module docstring).

    Input contract: ``q`` [T, H, d] bf16/fp32 (d a power of two >= 16), ``kv`` [N, d] (K = V), ``idx`` [T, M]
    int32/int64 (-1 = masked; duplicates count twice), ``sink`` [H] float, ``scale`` a python float; one device,
    CUDA unless TRITON_INTERPRET=1. q and kv should share a dtype (bf16 on the GPU).
    """
    return sparse_attention_launch(q, kv, idx, sink, scale)


def flops(idx: torch.Tensor, H: int, d: int) -> int:
    """4 H d per valid (token, entry): QK^T and PV, a multiply-add counted as 2."""
    return 4 * H * d * int((idx >= 0).sum())

