"""Triton: the DSv4 router after the gate GEMM, one program per token (dsv4-layers.md 4.1, kernel row 18).

    s   = sqrt(softplus(logits))                                     fp32 [T, E]
    ids = tid2eid[input_ids]                 (hash layers)           int64 [T, k]
        = the k largest of s + bias, largest first (otherwise; bias None = 0)
    w   = s[ids] / max(sum_j s[ids_j], 1e-20) * routed_scaling_factor   fp32 [T, k]  (weights from UNBIASED s)

Same signature, contract and outputs as ``dsv4lab.kernels.reference.moe.route``. Differences, by design:

- softplus is evaluated as ``max(x, 0) + log1p(exp(-|x|))`` with ``log1p(y) = 2 atanh(y / (2 + y))`` summed as a
  degree-17 odd series (|y / (2 + y)| <= 1/3, truncation < 2^-30). Triton has no log1p, ``tl.log`` on the GPU
  is an approximate ``lg2`` with an absolute (not relative) error bound, and libdevice is not available under
  the interpreter; the series keeps s within a few fp32 ulps of torch's ``log1p(exp(x))`` everywhere.
  sqrt and the division are the correctly rounded ``sqrt_rn`` / ``div_rn``.
- Top-k is k rounds of argmax over the E selection scores; an exact tie goes to the LOWER expert id
  (``torch.topk`` leaves the order of equal values unspecified). Because s may differ from the reference by
  an ulp or two, two experts whose reference selection scores are within a few ulps may also come out in the
  other order; random inputs essentially never have such near ties (the tests check that every mismatch is one).
- The weight sum is a tree reduction (torch sums in its own order): weights agree to a few ulps, not bitwise.

Input contract (checked before launch): logits fp32 [T, E] (last dim contiguous), 1 <= k <= E, bias fp32 [E] or
None, hash routing needs both tid2eid int [V, k] and input_ids int [T] and no bias. Token and expert ids are
range-checked on CPU tensors only (a GPU check would cost a device sync per call).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import _checks as chk
from .inv_rope_fp8_quant import _INTERPRETED

_F32 = (torch.float32,)
DENOM_FLOOR = 1e-20      # vLLM's torch fallback clamps the weight sum here


@triton.jit
def _sqrt_softplus(x):
    """sqrt(softplus(x)) in fp32: softplus = max(x, 0) + 2 atanh(z), z = y / (2 + y), y = exp(-|x|)."""
    y = tl.exp(-tl.abs(x))
    z = tl.div_rn(y, 2.0 + y)
    z2 = z * z
    series = 1.0 / 17.0
    series = series * z2 + 1.0 / 15.0
    series = series * z2 + 1.0 / 13.0
    series = series * z2 + 1.0 / 11.0
    series = series * z2 + 1.0 / 9.0
    series = series * z2 + 1.0 / 7.0
    series = series * z2 + 1.0 / 5.0
    series = series * z2 + 1.0 / 3.0
    series = series * z2 + 1.0
    softplus = tl.maximum(x, 0.0) + 2.0 * z * series
    # torch's softplus returns x itself above its threshold 20; the series term is then < ulp(x) / 2 anyway
    softplus = tl.where(x > 20.0, x, softplus)
    return tl.sqrt_rn(softplus)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, tid2eid_ptr, input_ids_ptr, weights_ptr, ids_ptr,
                  n_experts, stride_logits, stride_tid2eid, routed_scaling_factor,
                  K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HASH: tl.constexpr, DENOM_FLOOR: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    expert = tl.arange(0, BLOCK_E)
    in_range = expert < n_experts
    logits = tl.load(logits_ptr + token * stride_logits + expert, mask=in_range, other=0.0)
    scores = _sqrt_softplus(logits)
    slot = tl.arange(0, K_PAD)
    slot_valid = slot < K

    if HASH:
        tok = tl.load(input_ids_ptr + token).to(tl.int64)
        ids = tl.load(tid2eid_ptr + tok * stride_tid2eid + slot, mask=slot_valid, other=-1).to(tl.int64)
    else:
        selection = scores
        if HAS_BIAS:
            selection = selection + tl.load(bias_ptr + expert, mask=in_range, other=0.0)
        selection = tl.where(in_range, selection, float("-inf"))
        ids = tl.full([K_PAD], -1, tl.int64)
        for j in tl.static_range(K):
            best = tl.argmax(selection, axis=0)          # lowest index among equal maxima
            ids = tl.where(slot == j, best.to(tl.int64), ids)
            selection = tl.where(expert == best, float("-inf"), selection)

    # gather the UNBIASED scores of the chosen experts: one match per row, so the sum is exact
    match = (ids[:, None] == expert[None, :].to(tl.int64)) & slot_valid[:, None]
    weights = tl.sum(tl.where(match, scores[None, :], 0.0), axis=1)
    total = tl.maximum(tl.sum(weights, axis=0), DENOM_FLOOR)
    weights = tl.div_rn(weights, total) * routed_scaling_factor
    # a NaN logit must not vanish: the GPU's max/argmax skip NaN (fmax semantics), so the chosen weights could
    # come out finite; the reference (torch.topk) propagates it, so the row's weights become NaN here too
    row_nan = tl.max(((logits != logits) & in_range).to(tl.int32), axis=0) > 0
    weights = tl.where(row_nan, float("nan"), weights)

    out = token * K + slot
    tl.store(weights_ptr + out, weights, mask=slot_valid)
    tl.store(ids_ptr + out, ids, mask=slot_valid)


def check_route_args(logits: torch.Tensor, k: int, routed_scaling_factor: float, bias: torch.Tensor | None,
                     tid2eid: torch.Tensor | None, input_ids: torch.Tensor | None) -> float:
    """The input contract of ``route`` (the reference's, plus a contiguous last axis); returns the scaling factor."""
    chk.tensor("logits", logits, _F32, dim=2)
    t, e = logits.shape
    chk.positive_int("k", k)
    if k > e:
        raise ValueError(f"k: expected <= number of experts {e}, got {k}")
    rsf = chk.positive_float("routed_scaling_factor", routed_scaling_factor)
    if logits.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"logits: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {logits.device}")
    if e and logits.stride(1) != 1:
        raise ValueError(f"logits: expected a contiguous last axis, got strides {tuple(logits.stride())}")
    if (tid2eid is None) != (input_ids is None):
        raise ValueError("tid2eid/input_ids: hash routing needs both (got only "
                         f"{'tid2eid' if input_ids is None else 'input_ids'})")
    if bias is not None:
        if tid2eid is not None:
            raise ValueError("bias: hash layers route by tid2eid and take no bias")
        chk.tensor("bias", bias, _F32, dim=1)
        chk.shape("bias", bias, (e,))
        if not bias.is_contiguous():
            raise ValueError("bias: expected a contiguous tensor")
    if tid2eid is not None:
        chk.tensor("tid2eid", tid2eid, chk.INT_DTYPES, dim=2)
        if tid2eid.shape[1] != k:
            raise ValueError(f"tid2eid: expected [V, k={k}], got {tuple(tid2eid.shape)}")
        if tid2eid.stride(1) != 1:
            raise ValueError(f"tid2eid: expected a contiguous last axis, got strides {tuple(tid2eid.stride())}")
        chk.tensor("input_ids", input_ids, chk.INT_DTYPES, dim=1)
        chk.shape("input_ids", input_ids, (t,))
        chk.index_range("input_ids", input_ids, 0, tid2eid.shape[0], "token ids (rows of tid2eid)")
        chk.index_range("tid2eid", tid2eid, 0, e, "expert ids")
    chk.same_device(logits=logits, bias=bias, tid2eid=tid2eid, input_ids=input_ids)
    return rsf


def route(logits: torch.Tensor, *, k: int, routed_scaling_factor: float, bias: torch.Tensor | None = None,
          tid2eid: torch.Tensor | None = None, input_ids: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``moe_routing``: ``(weights fp32 [T, k], ids int64 [T, k])``, ids largest-first."""
    rsf = check_route_args(logits, k, routed_scaling_factor, bias, tid2eid, input_ids)
    t, e = logits.shape
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    hashed = tid2eid is not None
    dummy = logits  # never read: the constexpr flags compile the unused loads away
    _route_kernel[(t,)](
        logits, bias if bias is not None else dummy, tid2eid if hashed else dummy,
        input_ids if hashed else dummy, weights, ids,
        e, logits.stride(0), tid2eid.stride(0) if hashed else 0, rsf,
        K=k, K_PAD=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(e),
        HAS_BIAS=bias is not None, HASH=hashed, DENOM_FLOOR=DENOM_FLOOR, num_warps=4)
    return weights, ids
