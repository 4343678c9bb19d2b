"""MoE references: router (sqrt-softplus, bias or hash selection) and SwiGLU-clamp experts, dsv4-layers.md 4.

    logits = x @ gate.T                                   fp32 [T, E]
    s      = sqrt(softplus(logits))
    ids    = tid2eid[input_ids]            (hash layers)  or  topk(s + bias, k)      [T, k]
    w      = s.gather(ids);  w = w / max(sum(w), 1e-20) * routed_scaling_factor       weights from UNBIASED s
    expert(x)  = (silu(min(x w1^T, L)) * clamp(x w3^T, -L, L)) w2^T                   L = swiglu_limit
    y      = round(sum_j w_j expert_{ids_j}(x) + shared(x))                           fp32 accumulate

The reference keeps every intermediate in fp32 (no bf16/fp8 rounding of the expert activations); the point
where the routing weight is applied (before w2 in DS-ref, after w2 in vLLM) is equal in exact arithmetic.
Routed experts are stored as MXFP4 (``dsv4lab.quant.quant_fp4``: e2m1 + UE8M0 per 1x32 along K);
``moe_fp4`` dequantises the touched experts with ``dequant_fp4`` and runs ``moe``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...quant import dequant_fp4
from . import _checks as chk

_F32 = (torch.float32,)
_UINT8 = (torch.uint8, torch.int8)
FP4_BLOCK = 32
Weights3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """Gate GEMM with fp32 output: ``x.float() @ gate_weight.float().T`` -> [T, E] fp32 (x [T,D], gate [E,D])."""
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    chk.tensor("gate_weight", gate_weight, chk.FLOAT_DTYPES, dim=2)
    if gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"gate_weight: expected [E, {x.shape[1]}], got {tuple(gate_weight.shape)}")
    chk.same_device(x=x, gate_weight=gate_weight)
    return x.float() @ gate_weight.float().T


def route(logits: torch.Tensor, *, k: int, routed_scaling_factor: float, bias: torch.Tensor | None = None,
          tid2eid: torch.Tensor | None = None, input_ids: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """DSv4 routing (dsv4-layers.md 4.1): returns ``(weights fp32 [T,k], ids int64 [T,k])``.

    Hash layers pass ``tid2eid [V,k]`` and ``input_ids [T]`` (then ``bias`` must be None); other layers pick
    ``topk(s + bias, k)`` (``bias`` fp32 [E], None = no correction). Each row of weights sums to
    ``routed_scaling_factor`` (the denominator is clamped at 1e-20 like vLLM's torch fallback).
    """
    chk.tensor("logits", logits, _F32, dim=2)
    t, e = logits.shape
    k = chk.positive_int("k", k)
    if k > e:
        raise ValueError(f"k: expected <= number of experts {e}, got {k}")
    rsf = chk.positive_float("routed_scaling_factor", routed_scaling_factor)
    if (tid2eid is None) != (input_ids is None):
        raise ValueError("tid2eid/input_ids: hash routing needs both (got only "
                         f"{'tid2eid' if input_ids is None else 'input_ids'})")
    if bias is not None:
        if tid2eid is not None:
            raise ValueError("bias: hash layers route by tid2eid and take no bias")
        chk.tensor("bias", bias, _F32, dim=1)
        chk.shape("bias", bias, (e,))
    if tid2eid is not None:
        chk.tensor("tid2eid", tid2eid, chk.INT_DTYPES, dim=2)
        if tid2eid.shape[1] != k:
            raise ValueError(f"tid2eid: expected [V, k={k}], got {tuple(tid2eid.shape)}")
        chk.tensor("input_ids", input_ids, chk.INT_DTYPES, dim=1)
        chk.shape("input_ids", input_ids, (t,))
        if t and (int(input_ids.min()) < 0 or int(input_ids.max()) >= tid2eid.shape[0]):
            raise ValueError(f"input_ids: expected token ids in [0, {tid2eid.shape[0]})")
        if tid2eid.numel() and (int(tid2eid.min()) < 0 or int(tid2eid.max()) >= e):
            raise ValueError(f"tid2eid: expected expert ids in [0, {e})")
    chk.same_device(logits=logits, bias=bias, tid2eid=tid2eid, input_ids=input_ids)

    scores = torch.sqrt(F.softplus(logits))
    if tid2eid is not None:
        ids = tid2eid[input_ids.long()].long()
    else:
        selection = scores if bias is None else scores + bias
        ids = torch.topk(selection, k, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * rsf, ids


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                  limit: float) -> torch.Tensor:
    """One SwiGLU expert with the DSv4 clamp, fp32 math and fp32 output [T, D] (dsv4-layers.md 4.2):

        g = x w1^T, u = x w3^T;  h = silu(min(g, L)) * clamp(u, -L, L);  y = h w2^T
    x [T,D], w1/w3 [I,D], w2 [D,I] (any float dtype; dequantised weights).
    """
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    d = x.shape[1]
    chk.tensor("w1", w1, chk.FLOAT_DTYPES, dim=2)
    if w1.shape[1] != d:
        raise ValueError(f"w1: expected [I, {d}], got {tuple(w1.shape)}")
    i = w1.shape[0]
    chk.tensor("w3", w3, chk.FLOAT_DTYPES, dim=2)
    chk.shape("w3", w3, (i, d))
    chk.tensor("w2", w2, chk.FLOAT_DTYPES, dim=2)
    chk.shape("w2", w2, (d, i))
    limit = chk.positive_float("limit", limit)
    x32 = x.float()
    gate = x32 @ w1.float().T
    up = x32 @ w3.float().T
    h = F.silu(torch.clamp(gate, max=limit)) * torch.clamp(up, -limit, limit)
    return h @ w2.float().T


def _check_routing(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, n_experts: int) -> None:
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    chk.tensor("weights", weights, _F32, dim=2)
    if weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights: expected [{x.shape[0]}, k] (one row per token of x), got {tuple(weights.shape)}")
    chk.tensor("ids", ids, chk.INT_DTYPES, dim=2)
    chk.shape("ids", ids, tuple(weights.shape))
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise ValueError(f"ids: expected expert ids in [0, {n_experts})")


def _check_shared(shared: Weights3 | None, d: int) -> None:
    if shared is None:
        return
    if not isinstance(shared, (tuple, list)) or len(shared) != 3:
        raise TypeError("shared: expected None or a (w1, w3, w2) tuple")
    w1, w3, w2 = shared
    chk.tensor("shared[0] (w1)", w1, chk.FLOAT_DTYPES, dim=2)
    if w1.shape[1] != d:
        raise ValueError(f"shared[0] (w1): expected [I_shared, {d}], got {tuple(w1.shape)}")
    chk.tensor("shared[1] (w3)", w3, chk.FLOAT_DTYPES, dim=2)
    chk.shape("shared[1] (w3)", w3, tuple(w1.shape))
    chk.tensor("shared[2] (w2)", w2, chk.FLOAT_DTYPES, dim=2)
    chk.shape("shared[2] (w2)", w2, (d, w1.shape[0]))


def _combine(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             expert: Callable[[int], Weights3], shared: Weights3 | None, limit: float) -> torch.Tensor:
    """``round(sum_j w_j expert_{ids_j}(x) + shared(x))``, grouped by expert, fp32 accumulation."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        w1, w3, w2 = expert(e)
        out = swiglu_expert(x[rows], w1, w3, w2, limit)
        y.index_add_(0, rows, weights[rows, slots].unsqueeze(-1) * out)
    if shared is not None:
        y = y + swiglu_expert(x, *shared, limit)
    return y.to(x.dtype)


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
        w2: torch.Tensor, *, swiglu_limit: float, shared: Weights3 | None = None) -> torch.Tensor:
    """Routed + shared experts with float (dequantised) weights -> [T, D] in x's dtype.

    x [T,D]; weights fp32 [T,k] and ids int [T,k] from ``route``; w1/w3 [E,I,D], w2 [E,D,I];
    shared = (w1 [Is,D], w3 [Is,D], w2 [D,Is]) or None.
    """
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    d = x.shape[1]
    chk.tensor("w1", w1, chk.FLOAT_DTYPES, dim=3)
    if w1.shape[2] != d:
        raise ValueError(f"w1: expected [E, I, {d}], got {tuple(w1.shape)}")
    n_exp, inter, _ = w1.shape
    chk.tensor("w3", w3, chk.FLOAT_DTYPES, dim=3)
    chk.shape("w3", w3, (n_exp, inter, d))
    chk.tensor("w2", w2, chk.FLOAT_DTYPES, dim=3)
    chk.shape("w2", w2, (n_exp, d, inter))
    _check_routing(x, weights, ids, n_exp)
    _check_shared(shared, d)
    limit = chk.positive_float("swiglu_limit", swiglu_limit)
    return _combine(x, weights, ids, lambda e: (w1[e], w3[e], w2[e]), shared, limit)


def moe_fp4(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            w1: torch.Tensor, w1_scale: torch.Tensor, w3: torch.Tensor, w3_scale: torch.Tensor,
            w2: torch.Tensor, w2_scale: torch.Tensor, *, swiglu_limit: float,
            shared: Weights3 | None = None) -> torch.Tensor:
    """``moe`` with MXFP4 routed experts (the DSv4 checkpoint layout), dequantised per touched expert.

    w1/w3: packed e2m1 uint8 [E, I, D/2] with UE8M0 scales uint8 [E, I, D/32]; w2: [E, D, I/2] with [E, D, I/32].
    """
    chk.tensor("x", x, chk.FLOAT_DTYPES, dim=2)
    d = x.shape[1]
    chk.tensor("w1", w1, _UINT8, dim=3)
    n_exp, inter = w1.shape[0], w1.shape[1]
    if d % FP4_BLOCK or inter % FP4_BLOCK:
        raise ValueError(f"x/w1: D={d} and I={inter} must be multiples of {FP4_BLOCK} for MXFP4 experts")
    chk.shape("w1", w1, (n_exp, inter, d // 2))
    chk.tensor("w3", w3, _UINT8, dim=3)
    chk.shape("w3", w3, (n_exp, inter, d // 2))
    chk.tensor("w2", w2, _UINT8, dim=3)
    chk.shape("w2", w2, (n_exp, d, inter // 2))
    for name, s, shp in (("w1_scale", w1_scale, (n_exp, inter, d // FP4_BLOCK)),
                         ("w3_scale", w3_scale, (n_exp, inter, d // FP4_BLOCK)),
                         ("w2_scale", w2_scale, (n_exp, d, inter // FP4_BLOCK))):
        chk.tensor(name, s, _UINT8, dim=3)
        chk.shape(name, s, shp)
    _check_routing(x, weights, ids, n_exp)
    _check_shared(shared, d)
    limit = chk.positive_float("swiglu_limit", swiglu_limit)

    def expert(e: int) -> Weights3:
        return (dequant_fp4(w1[e], w1_scale[e], FP4_BLOCK), dequant_fp4(w3[e], w3_scale[e], FP4_BLOCK),
                dequant_fp4(w2[e], w2_scale[e], FP4_BLOCK))

    return _combine(x, weights, ids, expert, shared, limit)
