"""Triton router (sqrt-softplus, bias top-k or hash, renormalise, scale) vs the reference and an fp64 oracle.

Tolerance for the weights: the kernel's s = sqrt(softplus(x)) is within 2 fp32 ulps of the fp64 value (series
truncation < 2^-30, ~5 roundings each <= 1/2 ulp, sqrt halves the relative error); the tree sum of <= 8 positive
terms adds < k/2 ulps relative and div_rn one more rounding, the final scaling one more: 4 ulps bound the
result vs the fp64 oracle for k = 6 in practice, and we allow 6 (the reference itself is within 2-3).
"""
import pytest
import torch
import torch.nn.functional as F

from dsv4lab.kernels import registry
from dsv4lab.kernels.reference.moe import route as route_ref
from dsv4lab.kernels.triton.moe_routing import route
from dsv4lab.lab.numerics import topk_overlap, ulp_diff

WEIGHT_ULPS = 6


def on(device, fn, *args, **kw):
    """Call ``fn`` with every tensor argument moved to ``device``; tensor results come back on the CPU."""
    mv = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = fn(*(mv(a) for a in args), **{k: mv(v) for k, v in kw.items()})
    return tuple(o.cpu() for o in out)


def oracle(logits, k, rsf, bias=None, tid2eid=None, input_ids=None):
    """fp64 routing: scores, selection (by the fp64 biased score), weights."""
    s = torch.sqrt(F.softplus(logits.double()))
    sel = s if bias is None else s + bias.double()
    ids = tid2eid[input_ids].long() if tid2eid is not None else sel.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    return (w / w.sum(-1, keepdim=True) * rsf), ids, sel


def router_logits(t, e, seed):
    """Gate logits of a unit-RMS x [t, 4096] against weights ~ N(0, 1/4096): ~N(0, 1) per entry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 4096, generator=g)
    w = torch.randn(e, 4096, generator=g) / 64.0
    return x @ w.T


@pytest.mark.parametrize("n_experts,k,rsf", [(256, 6, 1.5), (384, 6, 2.5)])
def test_bias_topk_matches_reference_and_oracle(n_experts, k, rsf, device):
    t = 12
    logits = router_logits(t, n_experts, seed=n_experts)
    g = torch.Generator().manual_seed(1)
    bias = 8.08 + 0.05 * torch.randn(n_experts, generator=g)   # Flash-like biases (all near 8.08)
    w, ids = on(device, route, logits, k=k, routed_scaling_factor=rsf, bias=bias)
    w_ref, ids_ref = route_ref(logits, k=k, routed_scaling_factor=rsf, bias=bias)
    w64, ids64, sel64 = oracle(logits, k, rsf, bias=bias)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (t, k)
    # every mismatch with the fp64 selection must be a near tie at the fp32 level (none expected here)
    ov = topk_overlap(ids64, ids, sel64, tie_rtol=2.0 ** -20)
    assert ov.unexplained_rows == 0
    assert torch.equal(ids, ids_ref)                  # same order too: both largest-first
    assert ulp_diff(w, w64.float()).max().item() <= WEIGHT_ULPS
    assert ulp_diff(w, w_ref).max().item() <= WEIGHT_ULPS
    # weights come from the UNBIASED scores: each row sums to rsf (not to something involving 8.08)
    assert torch.allclose(w.double().sum(-1), torch.full((t,), rsf, dtype=torch.float64), rtol=1e-6)


def test_no_bias_and_wide_logit_range(device):
    """bias=None selects by s alone; logits from -30 to 30 exercise both softplus branches (threshold 20)."""
    t, e, k = 8, 64, 4
    g = torch.Generator().manual_seed(3)
    logits = torch.rand(t, e, generator=g) * 60 - 30
    logits[:, :8] = torch.tensor([-30.0, -20.0, -5.0, -1e-3, 0.0, 5.0, 20.5, 30.0])
    w, ids = on(device, route, logits, k=k, routed_scaling_factor=1.0)
    w64, ids64, _ = oracle(logits, k, 1.0)
    assert torch.equal(ids, ids64)                    # no near ties in uniform draws at this spacing
    assert ulp_diff(w, w64.float()).max().item() <= WEIGHT_ULPS


def test_hash_routing(device):
    t, e, k, vocab = 10, 48, 6, 100
    g = torch.Generator().manual_seed(4)
    tid2eid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    input_ids = torch.randint(0, vocab, (t,), generator=g)
    logits = router_logits(t, e, seed=5)
    w, ids = on(device, route, logits, k=k, routed_scaling_factor=1.5, tid2eid=tid2eid, input_ids=input_ids)
    w64, ids64, _ = oracle(logits, k, 1.5, tid2eid=tid2eid, input_ids=input_ids)
    assert torch.equal(ids, tid2eid[input_ids].long())   # slot order of the table is kept
    assert ulp_diff(w, w64.float()).max().item() <= WEIGHT_ULPS


def test_exact_ties_go_to_the_lower_expert_id(device):
    """Equal logits and equal bias for experts 3, 5, 9, 12 competing for the last 2 of k = 4 slots."""
    e, k = 16, 4
    logits = torch.full((1, e), -2.0)
    logits[0, [1, 7]] = 3.0                     # two clear winners
    logits[0, [3, 5, 9, 12]] = 1.0              # a four-way exact tie for the remaining two slots
    w, ids = on(device, route, logits, k=k, routed_scaling_factor=1.0, bias=torch.zeros(e))
    assert ids.tolist() == [[1, 7, 3, 5]]
    s_hi, s_lo = (torch.sqrt(F.softplus(torch.tensor(v, dtype=torch.float64))) for v in (3.0, 1.0))
    want = torch.tensor([s_hi, s_hi, s_lo, s_lo]) / (2 * s_hi + 2 * s_lo)
    assert ulp_diff(w[0], want.float()).max().item() <= WEIGHT_ULPS


def test_empty_batch_and_registry(device):
    w, ids = on(device, route, torch.empty(0, 16), k=2, routed_scaling_factor=1.0)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == torch.int64
    assert registry.get("moe_routing", "triton") is route


def test_bad_input_raises_before_launch(device):
    logits = torch.randn(4, 16, device=device)
    zeros = lambda *shape, **kw: torch.zeros(*shape, device=device, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="logits"):
        route(logits.half(), k=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="k"):
        route(logits, k=17, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        route(logits, k=2, routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        route(torch.randn(16, 4, device=device).T, k=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="bias"):
        route(logits, k=2, routed_scaling_factor=1.0, bias=zeros(15))
    tid2eid = zeros(8, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="tid2eid/input_ids"):
        route(logits, k=2, routed_scaling_factor=1.0, tid2eid=tid2eid)
    with pytest.raises(ValueError, match="bias"):
        route(logits, k=2, routed_scaling_factor=1.0, bias=zeros(16), tid2eid=tid2eid,
              input_ids=zeros(4, dtype=torch.int64))
    if device == "cpu":   # id ranges are checked on CPU tensors only (a GPU check would sync every call)
        with pytest.raises(ValueError, match="input_ids"):
            route(logits, k=2, routed_scaling_factor=1.0, tid2eid=tid2eid, input_ids=torch.full((4,), 8))
        with pytest.raises(ValueError, match="tid2eid"):
            route(logits, k=2, routed_scaling_factor=1.0, tid2eid=tid2eid + 16, input_ids=zeros(4, dtype=torch.int64))
