"""Peer: the sparse attention core with sink on torch's FlexAttention (what a user would reach for first).

The per-query index lists become a dense boolean ``allowed[t, n]`` ([T, N]; a CSA top-k set differs per query, so
the mask_mod looks it up), turned into a block mask; K = V = kv as one KV head shared by all query heads
(``enable_gqa``). The sink is applied after the fact from the log-sum-exp (vLLM's split-kernel form):
``o = o_nosink * sigmoid(lse - sink)`` (``lse`` natural-log), with ``o = 0`` where a row has no candidate.
Differences from the op contract: a duplicated index counts once (the reference counts it twice); DSv4's lists
(window rows, then distinct compressed entries) have no duplicates.
"""
from __future__ import annotations

import functools

import torch

from ..reference._attn_checks import ANY_FLOAT, check_tensor


def dense_mask(idx: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``allowed`` [T, n_rows] bool: True where row t lists kv row n (-1 entries ignored)."""
    T = idx.shape[0]
    allowed = torch.zeros(T, n_rows + 1, dtype=torch.bool, device=idx.device)
    allowed.scatter_(1, torch.where(idx < 0, n_rows, idx.long()), True)
    return allowed[:, :n_rows].contiguous()


def build_block_mask(allowed: torch.Tensor, block_size: int = 128, compile_mask: bool | None = None):
    """FlexAttention ``BlockMask`` for the dense ``allowed`` matrix (one batch, broadcast over heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    T, N = allowed.shape
    if compile_mask is None:
        compile_mask = allowed.is_cuda
    return create_block_mask(mask_mod, None, None, T, N, device=allowed.device, BLOCK_SIZE=block_size,
                             _compile=compile_mask)


@functools.lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_with_sink(q: torch.Tensor, kv: torch.Tensor, block_mask, sink: torch.Tensor, scale: float,
                   allowed_any: torch.Tensor, *, compiled: bool = True, kernel_options: dict | None = None
                   ) -> torch.Tensor:
    """FlexAttention on prepared inputs: q [T, H, d], kv [N, d]; ``allowed_any`` [T] bool (row has a candidate)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = compiled_flex() if compiled else flex_attention
    qh = q.transpose(0, 1).unsqueeze(0)                              # [1, H, T, d]
    kh = kv.to(q.dtype).unsqueeze(0).unsqueeze(0)                    # [1, 1, N, d]
    o, lse = fn(qh, kh, kh, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True,
                kernel_options=kernel_options)
    o = o[0].transpose(0, 1).float()                                 # [T, H, d]
    lse = lse[0].transpose(0, 1).float()                             # [T, H]
    gate = torch.sigmoid(lse - sink.float()[None, :])
    o = torch.where(allowed_any[:, None, None], o * gate[..., None], torch.zeros_like(o))
    return o.to(torch.bfloat16)


def sparse_attention_flex(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """``sparse_attention`` on FlexAttention (module docstring); mask built per call. Eager on CPU."""
    check_tensor("q", q, ndim=3)
    T, H, d = q.shape
    check_tensor("kv", kv, shape=(None, d))
    check_tensor("idx", idx, dtypes=(torch.int64, torch.int32), shape=(T, None))
    check_tensor("sink", sink, dtypes=ANY_FLOAT, shape=(H,))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a python float, got {type(scale).__name__}")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= kv.shape[0]):   # the dense mask would index out
        raise ValueError(f"idx: expected entries in [-1, {kv.shape[0] - 1}] (rows of kv, -1 = masked), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")
    if T == 0:
        return torch.empty(0, H, d, dtype=torch.bfloat16, device=q.device)
    allowed = dense_mask(idx, kv.shape[0])
    bm = build_block_mask(allowed)
    return flex_with_sink(q, kv, bm, sink, float(scale), allowed.any(1), compiled=q.is_cuda)
