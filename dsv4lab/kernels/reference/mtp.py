"""MTP norm references, dsv4-layers.md section 5 and refactors.md section 3 (PR #43746).

Input block of the MTP draft layer (vLLM):

    e = RMSNorm(where(position == 0, 0, embed); enorm)       [T, D]     masked rows give exactly 0
    h = RMSNorm(prev.view(T, n, D); hnorm)                   [T, n, D]  one norm per residual stream

Shared head norm before the LM head: ``RMSNorm(h; norm)`` [T, D]. All norms use ``eps = rms_norm_eps``.

Two roundings exist in vLLM: the fused Triton kernels of #43746 round once (``round(x32 * rrms * w32)``,
``two_rounding=False``); the eager RMSNorm they replaced rounds the normalised value to the input dtype and then
multiplies by the weight in that dtype (``two_rounding=True``). ``mtp_input_before_eager`` spells the replaced
eager sequence out as the separate torch ops it ran (the "before" variant of the refactor).
"""
from __future__ import annotations

import torch

from . import _checks as chk
from .norms import rmsnorm, rmsnorm_two_round


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, two_rounding: bool) -> torch.Tensor:
    return rmsnorm_two_round(x, weight, eps) if two_rounding else rmsnorm(x, weight, eps)


def _check_inputs(embed: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor, enorm_weight: torch.Tensor,
                  hnorm_weight: torch.Tensor, eps: float) -> tuple[int, int, int]:
    """Validates the MTP input-norm arguments; returns (T, n, D)."""
    chk.tensor("embed", embed, chk.FLOAT_DTYPES, dim=2)
    t, d = embed.shape
    chk.tensor("positions", positions, chk.INT_DTYPES, dim=1)
    if positions.shape[0] != t:
        raise ValueError(f"positions: expected one position per token ({t}), got shape {tuple(positions.shape)}")
    chk.tensor("prev", prev, (embed.dtype,))
    if prev.dim() == 2:
        if prev.shape[0] != t or prev.shape[1] % d or prev.shape[1] == 0:
            raise ValueError(f"prev: expected [{t}, n*{d}] or [{t}, n, {d}], got {tuple(prev.shape)}")
        n = prev.shape[1] // d
    elif prev.dim() == 3:
        if prev.shape[0] != t or prev.shape[2] != d or prev.shape[1] == 0:
            raise ValueError(f"prev: expected [{t}, n*{d}] or [{t}, n, {d}], got {tuple(prev.shape)}")
        n = prev.shape[1]
    else:
        raise ValueError(f"prev: expected 2 or 3 dims, got shape {tuple(prev.shape)}")
    for name, w in (("enorm_weight", enorm_weight), ("hnorm_weight", hnorm_weight)):
        chk.tensor(name, w, chk.FLOAT_DTYPES, dim=1)
        chk.shape(name, w, (d,))
    chk.positive_float("eps", eps)
    chk.same_device(embed=embed, positions=positions, prev=prev, enorm_weight=enorm_weight,
                    hnorm_weight=hnorm_weight)
    return t, n, d


def mtp_input_rmsnorm(embed: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor,
                      enorm_weight: torch.Tensor, hnorm_weight: torch.Tensor, eps: float = 1e-6, *,
                      two_rounding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked enorm of ``embed [T,D]`` and per-stream hnorm of ``prev [T,n*D] | [T,n,D]``.

    Returns ``(e [T,D], h [T,n,D])`` in ``embed.dtype``. Rows with ``positions == 0`` are zeroed before the
    enorm, so their output is exactly 0. ``two_rounding=False``: fused-kernel rounding (once);
    ``True``: vLLM eager RMSNorm (normalised value rounded, then times the weight in the input dtype).
    """
    t, n, d = _check_inputs(embed, positions, prev, enorm_weight, hnorm_weight, eps)
    masked = embed.masked_fill((positions == 0).unsqueeze(-1), 0)
    e = _norm(masked, enorm_weight, eps, two_rounding)
    h = _norm(prev.reshape(t, n, d), hnorm_weight, eps, two_rounding)
    return e, h


def mtp_shared_head_rmsnorm(h: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                            two_rounding: bool = False) -> torch.Tensor:
    """Shared-head RMSNorm of the MTP draft before the LM head: ``h [T,D]`` -> [T,D] in h's dtype."""
    chk.tensor("h", h, chk.FLOAT_DTYPES, dim=2)
    chk.tensor("weight", weight, chk.FLOAT_DTYPES, dim=1)
    chk.shape("weight", weight, (h.shape[1],))
    chk.positive_float("eps", eps)
    return _norm(h, weight, eps, two_rounding)


def _rmsnorm_eager_ops(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's native RMSNorm as its separate torch ops: fp32 variance, rsqrt, cast back, times the weight."""
    orig_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(orig_dtype)
    return normed * weight.to(orig_dtype)


def mtp_input_before_eager(embed: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor,
                           enorm_weight: torch.Tensor, hnorm_weight: torch.Tensor,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-#43746 eager MTP input block, op by op (~6 kernels on a GPU): the "before" variant.

    ``torch.where`` mask -> RMSNorm (two roundings) on ``embed`` -> ``view(T, n, D)`` -> RMSNorm on the
    streams. Same signature and outputs as ``mtp_input_rmsnorm``; equals it with ``two_rounding=True``.
    """
    t, n, d = _check_inputs(embed, positions, prev, enorm_weight, hnorm_weight, eps)
    masked = torch.where(positions.unsqueeze(-1) == 0, 0, embed)
    e = _rmsnorm_eager_ops(masked, enorm_weight, eps)
    streams = prev.view(-1, n, d)
    h = _rmsnorm_eager_ops(streams, hnorm_weight, eps)
    return e, h
