"""DeepGEMM: the grouped low-rank wo_a projection as ``fp8_einsum('bhr,hdr->bhd')`` on Hopper (dsv4-layers.md 3.7).

    z[t, g, :] = deq(a)[t, g, :] @ deq(w)[g].T        a e4m3 [T, G, r] + fp32 scales [T, G, r/128]   (1x128)
                                                      w e4m3 [G, o_l, r] + fp32 scales [G, o_l/128, r/128] (128x128)
    z bf16 [T, G, o_l];  out = z.flatten(1) @ wo_b.T

SM90 facts (stack.md section 2): only the 'bhr,hdr->bhd' form of fp8_einsum runs on sm_90, with FP32 scale factors
and recipe (1, 128, 128); scales must be exact powers of two (DeepGEMM reads only their exponent). DeepGEMM is
imported on first call: it cannot be imported on a CPU machine. Each shape JIT-compiles on its first call.
"""
from __future__ import annotations

import torch

from ..reference.attn_out import EINSUM_RECIPE, check_fp8_einsum_args, quantize_wo_a

EQUATION = "bhr,hdr->bhd"


def _deep_gemm():
    import deep_gemm  # lazy: a CUDA-only extension

    return deep_gemm


def fp8_einsum_wo_a(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """DeepGEMM backend of ``fp8_einsum_wo_a``: z bf16 [T, G, o_l] (written into ``out`` when given).

    Input contract: ``check_fp8_einsum_args`` (a/w e4m3, a_scale [T, G, r/128] and w_scale [G, o_l/128, r/128]
    fp32 powers of two, r and o_l multiples of 128, one CUDA device). ``a`` may be a strided group view of the
    contiguous [T, H*d] quant output (DeepGEMM permutes it to [G, T, r] without a copy).
    """
    t, g, n, _ = check_fp8_einsum_args(a, a_scale, w, w_scale, out)
    if a.device.type != "cuda":
        raise ValueError(f"a: the deep_gemm backend needs CUDA tensors, got device {a.device}")
    if out is None:
        out = torch.empty((t, g, n), dtype=torch.bfloat16, device=a.device)
    if t == 0:
        return out
    _deep_gemm().fp8_einsum(EQUATION, (a, a_scale), (w, w_scale), out, recipe=EINSUM_RECIPE)
    return out


def o_proj_fp8(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a_q: torch.Tensor,
               wo_a_scale: torch.Tensor, wo_b: torch.Tensor) -> torch.Tensor:
    """The SM90 o-proj: Triton inverse-RoPE quant -> DeepGEMM fp8 einsum (z bf16) -> bf16 wo_b GEMM -> [T, D].

    wo_b is a bf16 weight [D, G*o_l] here (vLLM runs it as a block-fp8 linear; that GEMM is measured elsewhere).
    """
    from ..triton.inv_rope_fp8_quant import inv_rope_fp8_quant

    q, s = inv_rope_fp8_quant(o, positions, cos_sin_cache)
    t, g = o.shape[0], wo_a_q.shape[0]
    z = fp8_einsum_wo_a(q.view(t, g, -1), s.view(t, g, -1), wo_a_q, wo_a_scale)
    return z.flatten(1) @ wo_b.T


__all__ = ["EQUATION", "fp8_einsum_wo_a", "o_proj_fp8", "quantize_wo_a"]
