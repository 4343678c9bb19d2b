"""Lightning indexer reference (dsv4-layers.md 3.5): which ratio-4 compressed entries each query attends.

vLLM numerics without the fp8 quantisation of Q and K (fp32 logits, bf16 storage of q and k); no Hadamard
rotation or FP4 QAT (DS-ref only).
"""
from __future__ import annotations

import torch

from ...rope import apply_rope
from ._attn_checks import ANY_FLOAT, check_inv_freq, check_positions, check_prefill_positions, check_tensor
from .compressor import compress

RATIO = 4
_CHUNK_ELEMS = 1 << 24     # bound on the [rows, heads, entries] fp32 score block held at once


def check_indexer_inputs(x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, wq_b: torch.Tensor,
                         weights_proj: torch.Tensor, comp_ape: torch.Tensor, inv_freq: torch.Tensor,
                         topk: int) -> tuple[int, int, int]:
    """The input contract of every ``indexer_topk`` backend; returns ``(T, n_I, d_I)``."""
    check_tensor("x", x, ndim=2)
    T, D = x.shape
    check_tensor("qr", qr, shape=(T, None))
    check_positions(positions, T)
    check_prefill_positions(positions)
    check_tensor("weights_proj", weights_proj, shape=(None, D))
    n_heads = weights_proj.shape[0]
    check_tensor("wq_b", wq_b, shape=(None, qr.shape[1]))
    if n_heads == 0 or wq_b.shape[0] % n_heads:
        raise ValueError(f"wq_b: expected n_I*d_I rows with n_I = weights_proj rows = {n_heads}, "
                         f"got {wq_b.shape[0]} rows")
    head_dim = wq_b.shape[0] // n_heads
    check_tensor("comp_ape", comp_ape, dtypes=ANY_FLOAT, shape=(RATIO, 2 * head_dim))
    check_inv_freq(inv_freq, head_dim, "index_head_dim")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk: expected a positive int, got {topk!r}")
    return T, n_heads, head_dim


def indexer_topk(x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, wq_b: torch.Tensor,
                 weights_proj: torch.Tensor, comp_wkv: torch.Tensor, comp_wgate: torch.Tensor,
                 comp_ape: torch.Tensor, comp_norm_weight: torch.Tensor, inv_freq: torch.Tensor,
                 topk: int, *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k compressed entries per query of a prefill from position 0: ``(sel, logits)``.

    Shapes: ``x`` [T, D], ``qr`` [T, q_l] (the q_norm-ed low-rank query), ``wq_b`` [n_I*d_I, q_l],
    ``weights_proj`` [n_I, D], ``comp_*`` the indexer compressor (ratio 4, head_dim d_I, see ``compress``).

    - ``qI = bf16(qr @ wq_b.T).view(T, n_I, d_I)``, RoPE at ``positions`` on its last ``2*len(inv_freq)`` dims,
      stored bf16.
    - ``w = bf16(x @ weights_proj.T) * d_I^-0.5 * n_I^-0.5`` (fp32).
    - ``kI = compress(x, comp_*, 4, inv_freq, head_dim=d_I)`` [T//4, d_I] bf16.
    - ``logits[t, j] = sum_h w[t, h] * relu(qI[t, h] . kI[j])`` (fp32) for ``j < (t+1)//4``, else -inf.
    - ``sel[t]``: the ``min(topk, (t+1)//4)`` valid entries with the largest logits, in descending logit order
      (ties: lower index first), then -1 up to width ``topk`` (a fixed width, like vLLM's top-k buffer).

    Returns ``sel`` int64 [T, topk] and ``logits`` fp32 [T, T//4].
    """
    T, n_heads, head_dim = check_indexer_inputs(x, qr, positions, wq_b, weights_proj, comp_ape, inv_freq, topk)

    keys = compress(x, comp_wkv, comp_wgate, comp_ape, comp_norm_weight, RATIO, inv_freq,
                    head_dim=head_dim, eps=eps).float()                       # [n, d_I]
    n = keys.shape[0]
    q = (qr.float() @ wq_b.float().T).to(torch.bfloat16).view(T, n_heads, head_dim)
    q = apply_rope(q, positions, inv_freq).float()
    w = (x.float() @ weights_proj.float().T).to(torch.bfloat16).float() * (head_dim ** -0.5 * n_heads ** -0.5)

    logits = torch.empty(T, n, dtype=torch.float32, device=x.device)
    rows = max(1, _CHUNK_ELEMS // max(1, n_heads * n))
    for t0 in range(0, T, rows):
        s = torch.einsum("thd,jd->thj", q[t0:t0 + rows], keys).relu_()
        logits[t0:t0 + rows] = (s * w[t0:t0 + rows, :, None]).sum(dim=1)
    n_valid = (torch.arange(T, device=x.device) + 1) // RATIO
    invalid = torch.arange(n, device=x.device)[None, :] >= n_valid[:, None]
    logits.masked_fill_(invalid, float("-inf"))

    # stable descending sort: -inf (invalid) entries go last, ties keep the lower index first
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :topk]
    sel = torch.full((T, topk), -1, dtype=torch.int64, device=x.device)
    kept = order.shape[1]
    slot = torch.arange(kept, device=x.device)[None, :]
    sel[:, :kept] = torch.where(slot < n_valid[:, None], order, -1)
    return sel, logits
