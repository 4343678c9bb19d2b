"""Indexer fp8 path references (dsv4-layers.md 3.5, vLLM numerics): Q RoPE + fp8 quant with the scale folded into
the head weights, per-row fp8 K, and the weighted-ReLU MQA logits of those fp8 operands.

    y       = bf16(RoPE(q, pos))                    q [T, n_I, d_I] bf16; fp32 rotation, one rounding
    scale   = 2^ceil(log2(max(amax_h(y), 1e-4) / 448))           one per (token, head)
    q8      = e4m3(y / scale)
    w_out   = w * scale * d_I^-0.5 * n_I^-0.5       w [T, n_I] fp32 (the bf16 weights_proj output)
    logits[t, j] = sum_h relu((q8[t,h] . k8[j]) * k_scale[j]) * w_out[t, h]      for ks[t] <= j < ke[t], else -inf
"""
from __future__ import annotations

import torch

from ...quant import FP8_AMAX_FLOOR, FP8_E4M3_MAX, pow2_scale, quant_fp8
from ...rope import apply_rope
from ._attn_checks import ANY_FLOAT, check_inv_freq, check_positions, check_tensor


def indexer_q_rope_quant(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q8 e4m3 [T, n_I, d_I], w_out fp32 [T, n_I])`` (module docstring)."""
    check_tensor("q", q, dtypes=(torch.bfloat16,), ndim=3)
    T, n_heads, head_dim = q.shape
    check_positions(positions, T)
    check_inv_freq(inv_freq, head_dim, "index_head_dim")
    check_tensor("weights", weights, dtypes=ANY_FLOAT, shape=(T, n_heads))
    y = apply_rope(q, positions, inv_freq).float()                       # bf16 round trip of the rotated values
    scale = pow2_scale(y.abs().amax(-1, keepdim=True), FP8_E4M3_MAX, FP8_AMAX_FLOOR)
    q8 = (y / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    w_out = weights.float() * scale[..., 0] * (head_dim ** -0.5 * n_heads ** -0.5)
    return q8, w_out


def quant_indexer_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer K cache rows: ``(k8 e4m3 [N, d_I], k_scale fp32 [N])`` with one power-of-two scale per row."""
    check_tensor("k", k, ndim=2)
    k8, s = quant_fp8(k, block=k.shape[1])
    return k8, s[:, 0].contiguous()


def fp8_mqa_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, w_out: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, N] of the fp8 operands (module docstring); -inf outside [ks[t], ke[t])."""
    T, n_heads, head_dim = q8.shape
    check_tensor("k8", k8, dtypes=(torch.float8_e4m3fn,), shape=(None, head_dim))
    N = k8.shape[0]
    s = torch.einsum("thd,nd->thn", q8.float(), k8.float()) * k_scale.float()[None, None, :]
    logits = (s.relu() * w_out.float()[:, :, None]).sum(1)
    j = torch.arange(N, device=q8.device)[None, :]
    return logits.masked_fill((j < ks[:, None]) | (j >= ke[:, None]), float("-inf"))
