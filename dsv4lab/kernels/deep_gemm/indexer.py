"""Lightning indexer on Hopper (dsv4-layers.md 3.5): Triton compressor + Triton Q quant + DeepGEMM fp8 MQA logits.

Same signature and outputs as ``dsv4lab.kernels.reference.indexer.indexer_topk`` (``sel`` int64 [T, topk] with -1
padding, ``logits`` fp32 [T, T//4] with -inf where not causal), with vLLM's fp8 numerics:

    kI            = compressor(x; ratio 4, hd = d_I)  (Triton)  -> fp8 rows with one pow2 fp32 scale each
    q8, w_out     = indexer_q_rope_quant(bf16(qr @ wq_b.T), positions, w = bf16(x @ weights_proj.T))   (Triton)
    logits[t, j]  = deep_gemm.fp8_mqa_logits(q8, (k8, k_scale), w_out, ks = 0, ke = (t+1)//4)   (-inf outside)
    sel           = torch.topk(logits, min(topk, T//4)), -1 where j >= (t+1)//4

So the selection differs from the bf16 reference only where fp8 noise swaps near-tied logits
(``lab.numerics.topk_overlap`` with the reference logits measures that). DeepGEMM is imported lazily.
"""
from __future__ import annotations

import torch

from ..reference.indexer import check_indexer_inputs
from ..reference.indexer_q import quant_indexer_k
from ..triton.compressor import compress
from ..triton.indexer_q import indexer_q_rope_quant

RATIO = 4


def mqa_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, w_out: torch.Tensor,
               ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """``deep_gemm.fp8_mqa_logits`` -> fp32 [T, N] (-inf outside [ks, ke)); same contract as the reference
    ``indexer_q.fp8_mqa_logits``. SM90 supports 32 or 64 heads."""
    import deep_gemm

    N = k8.shape[0]
    logits = deep_gemm.fp8_mqa_logits(q8, (k8, k_scale), w_out, ks, ke, clean_logits=True)
    return logits[:, :N]


def indexer_topk(x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, wq_b: torch.Tensor,
                 weights_proj: torch.Tensor, comp_wkv: torch.Tensor, comp_wgate: torch.Tensor,
                 comp_ape: torch.Tensor, comp_norm_weight: torch.Tensor, inv_freq: torch.Tensor,
                 topk: int, *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM backend of ``indexer_topk`` (module docstring). CUDA, SM90, n_I in {32, 64}."""
    T, n_heads, head_dim = check_indexer_inputs(x, qr, positions, wq_b, weights_proj, comp_ape, inv_freq, topk)
    if n_heads not in (32, 64):
        raise ValueError(f"weights_proj: DeepGEMM's SM90 fp8_mqa_logits takes 32 or 64 heads, got {n_heads}")
    if not x.is_cuda:
        raise ValueError(f"x: the DeepGEMM backend needs CUDA tensors, got {x.device}")

    n = T // RATIO
    sel = torch.full((T, topk), -1, dtype=torch.int64, device=x.device)
    if n == 0:
        return sel, torch.empty(T, 0, dtype=torch.float32, device=x.device)
    keys = compress(x, comp_wkv, comp_wgate, comp_ape, comp_norm_weight, RATIO, inv_freq, head_dim=head_dim, eps=eps)
    k8, k_scale = quant_indexer_k(keys)
    q = torch.mm(qr, wq_b.T).view(T, n_heads, head_dim)               # bf16 out, fp32 accumulate
    w = torch.mm(x, weights_proj.T).float()
    q8, w_out = indexer_q_rope_quant(q, positions, inv_freq, w)
    n_valid = ((torch.arange(T, device=x.device) + 1) // RATIO).to(torch.int32)
    logits = mqa_logits(q8, k8, k_scale, w_out, torch.zeros_like(n_valid), n_valid)
    kept = min(topk, n)
    order = torch.topk(logits, kept, dim=1).indices
    slot = torch.arange(kept, device=x.device)[None, :]
    sel[:, :kept] = torch.where(slot < n_valid[:, None].long(), order, -1)
    return sel, logits
