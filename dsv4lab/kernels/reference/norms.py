"""RMSNorm references (dsv4-layers.md conventions).

``rmsnorm``           one rounding:  ``out = round(w * x32 * rsqrt(mean(x32^2) + eps))`` (DS-ref, fused kernels).
``rmsnorm_two_round`` vLLM's eager RMSNorm: ``round(round(x32 * rsqrt(...)) * w)`` -- the normalised value is
                      rounded to the input dtype first, then multiplied by the weight in that dtype.
"""
from __future__ import annotations

import torch


def _check(x: torch.Tensor, weight: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError("weight: expected a floating-point tensor")
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"weight: expected shape ({x.shape[-1]},), got {tuple(weight.shape)}")


def _check_eps(eps: object) -> None:
    # a negative (or NaN) eps turns small rows into NaN silently: refuse it up front
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w * x32 * rsqrt(mean(x32^2, -1) + eps)`` in fp32, rounded once to ``out_dtype`` (default ``x.dtype``)."""
    _check(x, weight)
    _check_eps(eps)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(out_dtype or x.dtype)


def rmsnorm_two_round(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """vLLM eager RMSNorm: normalise in fp32, round to ``x.dtype``, then multiply by ``weight`` in ``x.dtype``."""
    _check(x, weight)
    _check_eps(eps)
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight.to(x.dtype)
