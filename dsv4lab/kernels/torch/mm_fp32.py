"""The "after" path of vLLM PR #41300: ``torch.mm(x, weight.T, out_dtype=torch.float32)``.

    out[m, n] = sum_k x[m, k] * weight[n, k]      bf16 x bf16 -> fp32, fp32 accumulation, no bf16 rounding

One ATen op (``aten::mm.dtype``, cuBLASLt underneath) replaces the custom cuBLAS extension
(``dsv4lab.kernels.cuda.cublas_gemm``). ``aten::mm.dtype`` has a CUDA kernel only (stack.md 4), so ``mm_fp32``
falls back on CPU to an fp32 upcast matmul and ``path_label`` says which one ran. Both are exact in their
products (bf16 x bf16 fits in fp32); they differ only in fp32 summation order.

The input contract (``check_bf16_gemm_inputs``) is shared with the cuBLAS extension so that before and after
reject the same inputs, before any launch.
"""
from __future__ import annotations

import torch

AFTER_CALL = "torch.mm(x, weight.T, out_dtype=torch.float32)"
CPU_FALLBACK_CALL = "torch.mm(x.float(), weight.float().T)"


def check_bf16_gemm_inputs(x: object, weight: object, *, require_cuda: bool) -> None:
    """Raise TypeError/ValueError naming the argument unless x [M, K] and weight [N, K] are bf16, 2-D, contiguous,
    on one device (a CUDA device when ``require_cuda``) with matching K."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.bfloat16:
            raise TypeError(f"{name}: expected dtype bfloat16, got {str(t.dtype).removeprefix('torch.')}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous (row-major) tensor, got strides {t.stride()}")
    for name, t in (("x", x), ("weight", weight)):
        if require_cuda and t.device.type != "cuda":
            raise ValueError(f"{name}: expected a CUDA tensor, got device {t.device}")
    if x.device != weight.device:
        raise ValueError(f"weight: expected the device of x ({x.device}), got {weight.device}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected [N, K={x.shape[1]}] to match x [M, K], got {tuple(weight.shape)}")


def router_gemm_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.mm(x, weight.T, out_dtype=torch.float32)`` -> fp32 [M, N]; CUDA only (x [M, K], weight [N, K])."""
    check_bf16_gemm_inputs(x, weight, require_cuda=True)
    return torch.mm(x, weight.T, out_dtype=torch.float32)


def path_label(device: torch.device | str) -> str:
    """The call ``mm_fp32`` makes on ``device``, for plots and records."""
    if torch.device(device).type == "cuda":
        return AFTER_CALL
    return f"{CPU_FALLBACK_CALL}  (CPU fallback: aten::mm.dtype is CUDA-only)"


def mm_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The after path on CUDA; on any other device the fp32 upcast matmul (see ``path_label``)."""
    check_bf16_gemm_inputs(x, weight, require_cuda=False)
    if x.is_cuda:
        return torch.mm(x, weight.T, out_dtype=torch.float32)
    return torch.mm(x.float(), weight.float().T)
