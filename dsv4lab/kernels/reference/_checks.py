"""Input-contract helpers shared by the mHC / MoE / MTP references.

Every failure names the argument and says what was expected, so a caller (or a fused kernel's launcher that
re-uses these checks) gets a ValueError/TypeError before any work is done.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

# Range checks of index tensors on a GPU read two scalars back (one device sync, ~10-30 us). They run by default;
# DSV4LAB_GPU_RANGE_CHECKS=0 turns them off on the GPU (CPU tensors are always checked). They never run while a
# CUDA graph is being captured or torch.compile traces, where a sync is impossible.
GPU_RANGE_CHECKS = os.environ.get("DSV4LAB_GPU_RANGE_CHECKS", "1") != "0"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, x: object, dtypes: Sequence[torch.dtype] | None = None,
           dim: int | None = None) -> torch.Tensor:
    """``x`` is a tensor with one of ``dtypes`` and ``dim`` dims (None = any)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(x.shape)}")
    return x


def shape(name: str, x: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(x.shape)}")


def same_device(**tensors: torch.Tensor | None) -> None:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"tensors on different devices: {devs}")


def positive_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def positive_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name}: expected a positive float, got {v!r}")
    return float(v)


def index_range(name: str, x: torch.Tensor, lo: int, hi: int, what: str = "values") -> None:
    """ValueError unless every entry of integer tensor ``x`` lies in ``[lo, hi)`` (see GPU_RANGE_CHECKS)."""
    if x.numel() == 0 or torch.compiler.is_compiling():
        return
    if x.device.type == "cuda":
        if not GPU_RANGE_CHECKS or torch.cuda.is_current_stream_capturing():
            return
    mn, mx = (int(v) for v in torch.aminmax(x))
    if mn < lo or mx >= hi:
        raise ValueError(f"{name}: expected {what} in [{lo}, {hi - 1}], got range [{mn}, {mx}]")
