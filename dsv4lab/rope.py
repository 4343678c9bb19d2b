"""Rotary position embedding as DSv4 uses it (dsv4-layers.md section 3.3).

GPT-J (interleaved) pairs on the LAST ``rope_dim`` (64) channels: pair i is ``(x[off+2i], x[off+2i+1])``
rotated by ``pos * inv_freq[i]``. Window-only layers use base 10000 and no YaRN; compressed layers use base
160000 with the YaRN frequency blend (no magnitude scaling). The inverse rotation (by ``-theta``) undoes the
query's rotation on the attention output.
"""
from __future__ import annotations

import math

import torch

from .config import DSv4Config, YarnScaling


def base_inv_freq(rope_dim: int, base: float) -> torch.Tensor:
    """``inv_freq[i] = base^(-2i/rope_dim)`` for i < rope_dim/2, computed in float64, returned fp32."""
    if rope_dim <= 0 or rope_dim % 2:
        raise ValueError(f"rope_dim: expected a positive even int, got {rope_dim}")
    if base <= 0:
        raise ValueError(f"base: expected > 0, got {base}")
    i = torch.arange(0, rope_dim, 2, dtype=torch.float64)
    return (base ** (-i / rope_dim)).float()


def yarn_correction_range(rope_dim: int, base: float, yarn: YarnScaling) -> tuple[int, int]:
    """Pair indices (low, high) between which YaRN blends: ``low = floor(d ln(L0/(beta_fast 2pi)) / (2 ln base))``,
    ``high = ceil(d ln(L0/(beta_slow 2pi)) / (2 ln base))``, clamped to [0, d-1]. (15, 25) for base 160000."""
    def dim_of(rot: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(yarn.beta_fast)), 0)
    high = min(math.ceil(dim_of(yarn.beta_slow)), rope_dim - 1)
    return low, high


def yarn_inv_freq(rope_dim: int, base: float, yarn: YarnScaling) -> torch.Tensor:
    """YaRN blend: ``inv/factor * ramp + inv * (1 - ramp)``, ``ramp[i] = clamp((i-low)/(high-low), 0, 1)``."""
    inv = base_inv_freq(rope_dim, base).double()
    low, high = yarn_correction_range(rope_dim, base, yarn)
    span = (high - low) if high != low else 0.001  # DS-ref nudges a zero-width ramp the same way
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
    return (inv / yarn.factor * ramp + inv * (1 - ramp)).float()


def layer_inv_freq(cfg: DSv4Config, layer: int) -> torch.Tensor:
    """The inverse-frequency table of decoder layer ``layer`` (its indexer shares it)."""
    if cfg.compress_ratio(layer) > 1:
        return yarn_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
    return base_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``positions[:, None] * inv_freq[None, :]`` in fp32, shape [T, rope_dim/2]."""
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected an integer tensor, got {positions.dtype}")
    ang = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2*len(inv_freq)`` channels of ``x`` (GPT-J interleaved) at ``positions``.

    ``x``: [T, ..., d] with ``positions`` [T]. Forward ``(e, o) -> (e c - o s, o c + e s)``; inverse uses ``-s``.
    Math in fp32; returns a new tensor of ``x.dtype`` (the other channels are copied unchanged).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    rd = 2 * inv_freq.numel()
    if x.dim() < 2 or x.shape[-1] < rd:
        raise ValueError(f"x: expected [T, ..., d] with d >= {rd}, got shape {tuple(x.shape)}")
    if positions.dim() != 1 or positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions: expected shape [{x.shape[0]}] (one per token of x), got {tuple(positions.shape)}")
    cos, sin = rope_cos_sin(positions, inv_freq)
    if inverse:
        sin = -sin
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rd // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    r = x[..., x.shape[-1] - rd:].float()
    e, o = r[..., 0::2], r[..., 1::2]
    rot = torch.stack((e * cos - o * sin, o * cos + e * sin), dim=-1).flatten(-2)
    out = x.clone()
    out[..., x.shape[-1] - rd:] = rot.to(x.dtype)
    return out
