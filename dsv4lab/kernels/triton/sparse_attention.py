"""Triton: sparse MQA attention with a per-head sink over per-query index lists (dsv4-layers.md 3.6).

Same contract as ``dsv4lab.kernels.reference.attention.sparse_attention_with_sink``:

    l_u    = scale * q[t,h] . kv[idx[t,u]]                      (fp32 accumulate; V = K)
    p_u    = exp(l_u) / (sum_u' exp(l_u') + exp(sink[h]))
    o[t,h] = sum_u p_u kv[idx[t,u]]                             (bf16; a row with no candidate gives 0)

Design. All heads of a token read the same K rows (MQA), so one program owns a token and a tile of BLOCK_H heads
and walks the token's index list in chunks of BLOCK_N entries: gather the K rows [BLOCK_N, d] once, scores =
q_tile [BLOCK_H, d] @ K^T on the tensor cores, online softmax (running max starts at the sink logit, so it is never
-inf while the sink is finite), acc += p @ K. The sink enters the normaliser at the end:
``o = acc / (l + exp(sink - m))``. Work is in the log2 domain (exp2 of logits pre-multiplied by log2 e).

Decode (few tokens) splits each index list over ``num_splits`` programs (flash-decoding); each writes its
unnormalised (acc, m, l) in fp32 and a combine kernel merges them with the sink. Prefill runs unsplit.

Precision. On the GPU q and K stay bf16 in ``tl.dot`` (fp32 accumulation) and p is rounded to bf16 before p @ K
(relative error <= 2^-9 per weight, so |o - o_exact| <= 2^-9 max|K| beyond the output rounding). Under the
interpreter bf16 ``tl.dot`` is wrong (triton#11584), so operands are cast to fp32 and p stays fp32.

Index entries outside [0, N) are masked like -1 (the range is validated on the host for CPU tensors only, to keep
the GPU path free of a device sync).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference._attn_checks import ANY_FLOAT, check_tensor

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # fixed when @triton.jit below runs
_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 264          # ~2 waves of the H100's 132 SMs; below this decode splits the index lists
_MIN_SPLIT_ENTRIES = 128        # a split's fp32 partial [BLOCK_H, d] should not outweigh the K rows it read


@triton.jit
def _attend_chunks(q, kv_ptr, idx_row_ptr, n_rows, stride_kv, start, length, end, m, l, acc, scale_log2e,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax over index entries [start, min(start + length, end)) of one token; returns (m, l, acc)."""
    dims = tl.arange(0, HEAD_DIM)
    for u0 in range(0, length, BLOCK_N):
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
                        n_heads, n_rows, n_cand, split_len, n_splits,
                        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, scale_log2e,
                        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, CONST_SPLIT_LEN: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    h_ok = heads < n_heads
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None].to(tl.int64) * stride_qh + dims[None, :],
                mask=h_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
    m = sink                                                    # running max starts at the sink logit
    l = tl.zeros([BLOCK_H], dtype=tl.float32)                   # sum of exp2(s - m) over candidates only
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    idx_row = idx_ptr + token * stride_it
    if CONST_SPLIT_LEN > 0:     # interpreter: a runtime loop bound fails there with numpy >= 2.4 (1-element scalars)
        m, l, acc = _attend_chunks(q, kv_ptr, idx_row, n_rows, stride_kv, split * CONST_SPLIT_LEN, CONST_SPLIT_LEN,
                                   n_cand, m, l, acc, scale_log2e, HEAD_DIM, BLOCK_N, DOT_FP32)
    else:
        m, l, acc = _attend_chunks(q, kv_ptr, idx_row, n_rows, stride_kv, split * split_len, split_len,
                                   n_cand, m, l, acc, scale_log2e, HEAD_DIM, BLOCK_N, DOT_FP32)
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
                    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Merge the splits of one token x head tile: o = sum_s 2^(m_s-M) acc_s / (sum_s 2^(m_s-M) l_s + 2^(sink-M))."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
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
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
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
    if q.device.type == "cpu" and idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= kv.shape[0]):
        raise ValueError(f"idx: expected entries in [-1, {kv.shape[0] - 1}] (rows of kv, -1 = masked), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")


def default_config(T: int, H: int, M: int, d: int) -> dict:
    """Heuristic launch config: head tile, list chunk, warps and splits (decode splits when programs are few)."""
    block_h = max(16, min(64, triton.next_power_of_2(H)))
    block_n = 32 if d >= 256 else 64
    programs = T * triton.cdiv(H, block_h)
    splits = 1
    if programs < _TARGET_PROGRAMS and M > _MIN_SPLIT_ENTRIES:
        splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(M, _MIN_SPLIT_ENTRIES)))
    return {"block_h": block_h, "block_n": block_n, "num_splits": splits,
            "num_warps": 8 if block_h * d >= 64 * 256 else 4, "num_stages": 2}


def sparse_attention_launch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                            scale: float, *, block_h: int | None = None, block_n: int | None = None,
                            num_splits: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """``sparse_attention_with_sink`` with explicit launch knobs (None = ``default_config``)."""
    _check_args(q, kv, idx, sink, scale)
    T, H, d = q.shape
    M = idx.shape[1]
    out = torch.empty(T, H, d, dtype=torch.bfloat16, device=q.device)
    if T == 0 or H == 0:
        return out
    cfg = default_config(T, H, M, d)
    for k, v in (("block_h", block_h), ("block_n", block_n), ("num_splits", num_splits),
                 ("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k}: expected a positive int, got {v!r}")
            cfg[k] = v
    if _INTERPRETED:
        cfg["num_stages"] = 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    sink = sink.contiguous()
    splits = max(1, min(cfg["num_splits"], max(1, triton.cdiv(M, cfg["block_n"]))))
    split_len = triton.cdiv(max(M, 1), splits)
    split_len = triton.cdiv(split_len, cfg["block_n"]) * cfg["block_n"]      # whole chunks per split
    splits = max(1, triton.cdiv(max(M, 1), split_len))
    head_blocks = triton.cdiv(H, cfg["block_h"])
    if splits > 1:
        part_acc = torch.empty(T * H * splits * d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(T * H * splits * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out       # unused
    scale_log2e = float(scale) * _LOG2E
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _sparse_attn_kernel[(T, head_blocks, splits)](
        q, kv, idx, sink, out, part_acc, part_ml, H, kv.shape[0], M, split_len, splits,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1), scale_log2e,
        HEAD_DIM=d, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"], SPLIT=splits > 1, DOT_FP32=_INTERPRETED,
        CONST_SPLIT_LEN=split_len if _INTERPRETED else 0, **launch)
    if splits > 1:
        _combine_kernel[(T, head_blocks)](
            part_acc, part_ml, sink, out, H, splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_H=cfg["block_h"], SPLITS_P2=triton.next_power_of_2(splits),
            num_warps=cfg["num_warps"])
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

