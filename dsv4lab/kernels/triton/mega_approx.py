"""Triton: one PTX approximate instruction elementwise, to reproduce DeepGEMM MegaMoE's fast-math SwiGLU bitwise.

    op 'ex2': y = ex2.approx.f32(x)        (what CUDA's __expf applies to x * log2 e without -ftz)
    op 'rcp': y = rcp.approx.ftz.f32(x)    (DeepGEMM's math::fast_rcp)

Used by ``deep_gemm/mega_moe_unfused.silu_mega(fast_math=True)``; the surrounding multiplies and adds stay in
torch so that each is one correctly rounded fp32 operation, as in the fused kernel. Inline PTX has no meaning under
the Triton interpreter: CUDA tensors only.

Input contract: fp32 CUDA tensor (any shape; made contiguous); op in {'ex2', 'rcp'}.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk

_ASM = {"ex2": "ex2.approx.f32 $0, $1;", "rcp": "rcp.approx.ftz.f32 $0, $1;"}
_BLOCK = 1024


@triton.jit
def _approx_kernel(x_ptr, y_ptr, n, ASM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    y = tl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(y_ptr + offs, y, mask=mask)


def approx_elementwise(x: torch.Tensor, op: str) -> torch.Tensor:
    """``op`` ('ex2' | 'rcp') applied elementwise with the PTX approximate instruction -> fp32, x's shape."""
    chk.tensor("x", x, (torch.float32,))
    if op not in _ASM:
        raise ValueError(f"op: expected one of {sorted(_ASM)}, got {op!r}")
    if x.device.type != "cuda":
        raise ValueError(f"x: inline PTX needs a CUDA tensor, got device {x.device}")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _approx_kernel[(triton.cdiv(n, _BLOCK),)](x, y, n, ASM=_ASM[op], BLOCK=_BLOCK)
    return y
