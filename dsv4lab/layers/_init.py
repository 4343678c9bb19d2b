"""Deterministic random initialisation shared by the layer modules.

Every module draws its weights on the CPU from its own ``torch.Generator``, seeded from the model seed and the
module's path (``derive_seed(seed, "layers", 3, "ffn")``), so a (config, seed) pair fixes every weight and
changing one module's shapes leaves the others' weights unchanged. crc32 is used instead of ``hash()``
because Python salts string hashes per process.
"""
from __future__ import annotations

import zlib

import torch

from ..quant import fp8_roundtrip

FP8_WEIGHT_BLOCK = (128, 128)


def derive_seed(seed: int, *path: object) -> int:
    """A 31-bit seed for the module at ``path`` under the model seed ``seed``."""
    return zlib.crc32("/".join(str(p) for p in (int(seed), *path)).encode()) & 0x7FFFFFFF


def generator(seed: int, *path: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *path))


def normal(gen: torch.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    """fp32 ``N(mean, std^2)`` draw of ``shape`` from ``gen``."""
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def linear_weight(gen: torch.Generator, out_features: int, in_features: int, *, fp8: bool = False) -> torch.Tensor:
    """bf16 ``[out, in]`` weight ~ N(0, 1/in) (unit-RMS outputs for unit-RMS inputs).

    ``fp8=True``: the values are round-tripped through fp8 e4m3 with UE8M0 128x128 block scales first, as the
    checkpoint stores them (skipped when a dim is not a multiple of 128, which only tiny test shapes hit).
    """
    w = normal(gen, (out_features, in_features), in_features ** -0.5)
    if fp8 and out_features % FP8_WEIGHT_BLOCK[0] == 0 and in_features % FP8_WEIGHT_BLOCK[1] == 0:
        w = fp8_roundtrip(w, FP8_WEIGHT_BLOCK)
    return w.to(torch.bfloat16)


def norm_weight(gen: torch.Generator, dim: int) -> torch.Tensor:
    """bf16 RMSNorm weight ~ 1 + N(0, 0.05^2) (trained norms are not all-ones; a plain 1 would hide bugs)."""
    return normal(gen, (dim,), 0.05, 1.0).to(torch.bfloat16)


def frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)
