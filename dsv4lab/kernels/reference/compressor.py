"""KV compressor reference (dsv4-layers.md 3.4): softmax-gated pooling of blocks of r tokens into one entry.

Used twice per compressed layer: the attention compressor (head_dim 512, ratio 4 or 128, fp8 nope) and the
indexer's compressor (head_dim 128, ratio 4, kept bf16 here: the vLLM path without Hadamard / FP4).
"""
from __future__ import annotations

import torch

from ...quant import fp8_roundtrip
from ...rope import apply_rope
from ._attn_checks import ANY_FLOAT, check_inv_freq, check_tensor
from .norms import rmsnorm

RATIOS = (4, 128)
FP8_KV_BLOCK = 64      # the KV nope part is stored fp8 with one UE8M0 scale per 64 channels


def compress(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
             norm_weight: torch.Tensor, ratio: int, inv_freq: torch.Tensor, *, head_dim: int,
             eps: float = 1e-6, fp8_nope: bool = False) -> torch.Tensor:
    """Compressed KV entries of a prefill from position 0: ``[T // ratio, head_dim]`` bf16.

    With ``c = 2`` if ``ratio == 4`` (overlap) else 1 and ``hd = head_dim``:

    - ``A = x @ wkv.T``, ``S = x @ wgate.T + ape[t % ratio]``: fp32 ``[T, c*hd]`` (bf16 operands, fp32 result).
    - Entry i pools, per channel ``ch``, candidates with softmax weights over their scores:
      ratio 128: the block's tokens ``t in [128 i, 128 (i+1))`` with ``(A[t, ch], S[t, ch])``;
      ratio 4: first the 4 tokens of block i-1 with the FIRST half ``(A[t, ch], S[t, ch])``, then the 4 tokens
      of block i with the SECOND half ``(A[t, hd+ch], S[t, hd+ch])``; block -1 is absent (score -inf, value 0).
    - ``y = RMSNorm(pooled; norm_weight)`` on the fp32 pooled vector, RoPE (GPT-J, last ``2*len(inv_freq)``
      dims) at position ``i * ratio``, rounded to bf16 once (vLLM's fused compress kernel order).
    - ``fp8_nope``: the first ``hd - rope`` dims go through an fp8 e4m3 round trip with UE8M0 scales per
      64-block (how the compressed KV cache stores them).

    Only complete blocks produce entries; entry i is visible to query t iff ``t >= i*ratio + ratio - 1``.
    """
    check_tensor("x", x, ndim=2)
    if ratio not in RATIOS:
        raise ValueError(f"ratio: expected one of {RATIOS} (0 = window-only layers have no compressor), got {ratio!r}")
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
    T, D = x.shape
    width = (2 if ratio == 4 else 1) * head_dim
    check_tensor("wkv", wkv, shape=(width, D))
    check_tensor("wgate", wgate, shape=(width, D))
    check_tensor("ape", ape, dtypes=ANY_FLOAT, shape=(ratio, width))
    check_tensor("norm_weight", norm_weight, dtypes=ANY_FLOAT, shape=(head_dim,))
    check_inv_freq(inv_freq, head_dim, "head_dim")
    nope = head_dim - 2 * inv_freq.numel()
    if fp8_nope and nope % FP8_KV_BLOCK:
        raise ValueError(f"head_dim: fp8_nope needs the nope part ({nope}) to be a multiple of {FP8_KV_BLOCK}")

    n = T // ratio
    if n == 0:
        return torch.empty(0, head_dim, dtype=torch.bfloat16, device=x.device)
    xs = x[: n * ratio].float()
    value = (xs @ wkv.float().T).view(n, ratio, width)
    # blocks start at multiples of ratio, so the offset inside a block is t % ratio
    score = (xs @ wgate.float().T).view(n, ratio, width) + ape.float()
    if ratio == 4:
        absent_v = value.new_zeros(1, ratio, head_dim)
        absent_s = score.new_full((1, ratio, head_dim), float("-inf"))
        prev_v = torch.cat([absent_v, value[:-1, :, :head_dim]])
        prev_s = torch.cat([absent_s, score[:-1, :, :head_dim]])
        value = torch.cat([prev_v, value[:, :, head_dim:]], dim=1)     # [n, 8, hd], previous block first
        score = torch.cat([prev_s, score[:, :, head_dim:]], dim=1)
    pooled = (torch.softmax(score, dim=1) * value).sum(dim=1)          # [n, hd] fp32

    y = rmsnorm(pooled, norm_weight, eps, out_dtype=torch.float32)
    entry_pos = torch.arange(n, device=x.device) * ratio
    y = apply_rope(y, entry_pos, inv_freq).to(torch.bfloat16)
    if fp8_nope and nope:
        y[:, :nope] = fp8_roundtrip(y[:, :nope], FP8_KV_BLOCK)
    return y
