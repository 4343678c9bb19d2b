"""Reference for the bf16 x bf16 -> fp32 GEMMs of DSv4's router and compressors (refactors.md 2, dsv4-layers.md 4.1).

    out[m, n] = sum_k x[m, k] * weight[n, k]          x [M, K], weight [N, K]  ->  out [M, N] fp32

computed as one fp32 matmul of fp32 copies. Every bf16 value is exact in fp32 and every bf16 x bf16 product
is exact in fp32 (8 + 8 significand bits <= 24), so the only rounding is the fp32 accumulation over K terms:
``|out - exact| <= gamma_K * (|x| @ |weight|^T)`` with ``gamma_K = K u / (1 - K u)``, ``u = 2^-24``, for any
summation order. On CUDA, TF32 is switched off for the call so the bound holds there too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from . import _checks as chk

FP32_UNIT_ROUNDOFF = 2.0 ** -24


def fp32_accumulation_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise worst-case error of an fp32-accumulated ``x @ weight.T`` with exact products, in fp64:
    ``gamma_K * (|x| @ |weight|^T)`` (Higham, recursive/any-order summation, K = ``x.shape[1]``)."""
    k = x.shape[1]
    gamma = k * FP32_UNIT_ROUNDOFF / (1 - k * FP32_UNIT_ROUNDOFF)
    return gamma * (x.double().abs() @ weight.double().abs().T)


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """Set ``torch.backends.cuda.matmul.allow_tf32`` for the block and restore it (no effect on CPU math)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def router_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x.float() @ weight.float().T`` -> fp32 [M, N], fp32 accumulation, TF32 off (x [M, K], weight [N, K])."""
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    chk.tensor("weight", weight, chk.FLOAT_DTYPES, dim=2)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected [N, K={x.shape[1]}] to match x [M, K], got {tuple(weight.shape)}")
    chk.same_device(x=x, weight=weight)
    with tf32_matmul(False):
        return torch.mm(x.float(), weight.float().T)
