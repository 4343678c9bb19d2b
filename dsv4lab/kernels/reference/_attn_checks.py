"""Input contracts shared by the attention references (compressor, indexer, sparse core, output, prefill).

Every check raises before any math runs, with a message that names the argument and says what was expected:
TypeError for a wrong type or dtype, ValueError for a wrong rank, shape or value.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOATS = (torch.bfloat16, torch.float32)      # activations and weights: stored bf16, fp32 accepted for probes
ANY_FLOAT = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] = FLOATS,
                 shape: Sequence[int | None] | None = None, ndim: int | None = None) -> torch.Tensor:
    """``t`` is a tensor of one of ``dtypes`` with ``shape`` (``None`` = any size) or rank ``ndim``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    elif ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(t.shape)}")
    return t


def check_positions(positions: object, T: int) -> torch.Tensor:
    """``positions``: int tensor [T] (one absolute position per token)."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions: expected an integer torch.Tensor, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected an integer dtype (int64), got {positions.dtype}")
    if positions.dim() != 1 or positions.shape[0] != T:
        raise ValueError(f"positions: expected shape [{T}] (one per token), got {list(positions.shape)}")
    return positions


def check_prefill_positions(positions: torch.Tensor) -> None:
    """Compressed entries sit at block boundaries of absolute positions, so a no-cache prefill starts at 0."""
    T = positions.shape[0]
    if T and not torch.equal(positions.cpu(), torch.arange(T, dtype=positions.dtype)):
        raise ValueError("positions: expected 0..T-1 (a no-cache prefill from position 0; compressed blocks "
                         "are aligned to absolute positions)")


def check_inv_freq(inv_freq: object, dim: int, dim_name: str) -> torch.Tensor:
    """``inv_freq`` [rope_dim/2] float, with ``2 * len(inv_freq) <= dim``."""
    check_tensor("inv_freq", inv_freq, dtypes=ANY_FLOAT, ndim=1)
    assert isinstance(inv_freq, torch.Tensor)
    if 2 * inv_freq.numel() > dim:
        raise ValueError(f"inv_freq: rotates {2 * inv_freq.numel()} dims, more than {dim_name}={dim}")
    return inv_freq
