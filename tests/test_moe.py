"""MoE references (dsv4lab.kernels.reference.moe): router, SwiGLU-clamp experts, fp4 experts, combine.

Oracles: a one-token route and a clamped expert worked by hand, and a dense all-experts float64
reformulation of the sparse dispatch.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4lab.kernels.reference.moe import moe, moe_fp4, route, router_logits, swiglu_expert
from dsv4lab.quant import dequant_fp4, quant_fp4

T, D, E, K, I, L = 24, 256, 8, 2, 128, 10.0


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i >= 0, i, -(i & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


def experts(e: int = E, i: int = I, d: int = D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights ~ N(0, 1/K) for each GEMM's reduction dim K."""
    return torch.randn(e, i, d) / math.sqrt(d), torch.randn(e, i, d) / math.sqrt(d), torch.randn(e, d, i) / math.sqrt(i)


def expert64(x: torch.Tensor, w1, w3, w2, limit: float = L) -> torch.Tensor:
    g, u = x.double() @ w1.double().T, x.double() @ w3.double().T
    h = F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    return h @ w2.double().T


# ---- router -----------------------------------------------------------------------------------------
def test_router_logits_fp32() -> None:
    x = torch.randn(T, D).bfloat16()
    gate = (torch.randn(E, D) / math.sqrt(D)).bfloat16()
    got = router_logits(x, gate)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    # fp32 GEMM over D = 256 terms of O(1/16) products: error ~ sqrt(256) * 6e-8 * |logit| << 1e-5
    assert (got.double() - x.double() @ gate.double().T).abs().max().item() < 1e-5


def test_route_one_token_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    w, ids = route(logits, k=2, routed_scaling_factor=1.5, bias=bias)
    # selection: s + bias = [s0, s1, s2 + 5, s3] with s3 = sqrt(ln(1 + e^2)) = 1.458 > s1 = 1.144 -> experts {2, 3}
    s2, s3 = math.sqrt(math.log1p(math.exp(-1.0))), math.sqrt(math.log1p(math.exp(2.0)))
    want = {2: 1.5 * s2 / (s2 + s3), 3: 1.5 * s3 / (s2 + s3)}   # weights from the UNBIASED scores
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    got = {int(e): float(v) for e, v in zip(ids[0], w[0])}
    assert got.keys() == want.keys()
    for e in want:
        assert abs(got[e] - want[e]) < 1e-6
    # without the bias the two best unbiased scores win: experts {1, 3}
    _, ids = route(logits, k=2, routed_scaling_factor=1.5)
    assert set(ids[0].tolist()) == {1, 3}


@pytest.mark.parametrize("mode", ["plain", "bias", "hash"])
def test_route_weights_sum_to_scaling_factor(mode: str) -> None:
    logits = torch.randn(T, E) * 2
    kw: dict = {}
    if mode == "bias":
        kw["bias"] = torch.randn(E)
    if mode == "hash":
        kw["tid2eid"] = torch.rand(100, E).argsort(-1)[:, :K]
        kw["input_ids"] = torch.randint(0, 100, (T,))
    w, ids = route(logits, k=K, routed_scaling_factor=2.5, **kw)
    assert w.shape == ids.shape == (T, K)
    assert bool((w > 0).all())
    assert (w.sum(-1) - 2.5).abs().max().item() < 1e-6   # a sum of 2 fp32 values ~1.25 each
    s = torch.sqrt(F.softplus(logits))
    # weights come from the unbiased scores of the chosen experts (a few fp32 roundings apart)
    assert torch.allclose(w, 2.5 * s.gather(1, ids) / s.gather(1, ids).sum(-1, keepdim=True), rtol=1e-6, atol=0)


def test_hash_layer_picks_tid2eid_rows() -> None:
    tid2eid = torch.rand(50, E).argsort(-1)[:, :K]
    input_ids = torch.randint(0, 50, (T,))
    logits = torch.randn(T, E)
    w, ids = route(logits, k=K, routed_scaling_factor=1.5, tid2eid=tid2eid, input_ids=input_ids)
    assert torch.equal(ids, tid2eid[input_ids])
    # the hash choice ignores the scores: the chosen experts are generally NOT the top-k by score
    top = torch.topk(logits, K).indices.sort(-1).values
    assert not torch.equal(ids.sort(-1).values, top)


def test_route_empty_tokens() -> None:
    w, ids = route(torch.zeros(0, E), k=K, routed_scaling_factor=1.5, bias=torch.zeros(E))
    assert w.shape == ids.shape == (0, K)


# ---- experts ----------------------------------------------------------------------------------------
def test_swiglu_clamp_by_hand() -> None:
    x = torch.tensor([[1.0]])
    w1 = torch.tensor([[20.0], [-20.0], [1.0]])    # gate = [20, -20, 1]
    w3 = torch.tensor([[30.0], [-30.0], [0.5]])    # up   = [30, -30, 0.5]
    w2 = torch.tensor([[1.0, 1.0, 1.0]])

    def silu(v: float) -> float:
        return v / (1 + math.exp(-v))
    # gate clamped from above only (20 -> 10, -20 stays), up clamped both ways (30 -> 10, -30 -> -10)
    want = silu(10.0) * 10.0 + silu(-20.0) * -10.0 + silu(1.0) * 0.5
    got = swiglu_expert(x, w1, w3, w2, limit=10.0)
    assert got.dtype == torch.float32 and abs(got.item() - want) < 1e-5


def test_moe_dispatch_equals_dense_onehot_fp64() -> None:
    x = torch.randn(T, D).bfloat16()
    w1, w3, w2 = experts()
    shared = tuple(t[0] for t in experts(e=1))
    weights, ids = route(torch.randn(T, E), k=K, routed_scaling_factor=1.5, bias=0.1 * torch.randn(E))
    got = moe(x, weights, ids, w1, w3, w2, swiglu_limit=L, shared=shared)
    # dense formulation: every expert on every token, combined with a one-hot [T, E] weight matrix
    dense_w = torch.zeros(T, E, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    all_out = torch.stack([expert64(x, w1[e], w3[e], w2[e]) for e in range(E)], 1)   # [T, E, D]
    want = (dense_w[:, :, None] * all_out).sum(1) + expert64(x, *shared)
    # fp32 accumulation (~1e-6 relative) then one bf16 rounding: at most 1 ulp from bf16(fp64)
    assert got.dtype == torch.bfloat16 and got.shape == (T, D)
    assert bf16_ulps(got, want.bfloat16()).max().item() <= 1
    # the shared expert is really added, and without routed experts only the shared part remains
    no_shared = moe(x, weights, ids, w1, w3, w2, swiglu_limit=L)
    assert bf16_ulps(no_shared, (want - expert64(x, *shared)).bfloat16()).max().item() <= 1


def test_moe_fp4_uses_dequantised_experts() -> None:
    x = torch.randn(T, D).bfloat16()
    w1, w3, w2 = experts()
    (q1, s1), (q3, s3), (q2, s2) = quant_fp4(w1), quant_fp4(w3), quant_fp4(w2)
    assert q1.shape == (E, I, D // 2) and s1.shape == (E, I, D // 32)
    weights, ids = route(torch.randn(T, E), k=K, routed_scaling_factor=1.5)
    got = moe_fp4(x, weights, ids, q1, s1, q3, s3, q2, s2, swiglu_limit=L)
    deq = [dequant_fp4(q, s) for q, s in ((q1, s1), (q3, s3), (q2, s2))]
    # same ops on the dequantised weights: bitwise
    assert torch.equal(got, moe(x, weights, ids, *deq, swiglu_limit=L))
    # and fp4 really changed the weights (e2m1 + pow2 scale: ~10-20% relative RMS error per weight)
    rel = ((deq[0] - w1).norm() / w1.norm()).item()
    assert 0.02 < rel < 0.3
    assert not torch.equal(got, moe(x, weights, ids, w1, w3, w2, swiglu_limit=L))


def test_moe_empty_tokens() -> None:
    w1, w3, w2 = experts()
    out = moe(torch.zeros(0, D).bfloat16(), torch.zeros(0, K), torch.zeros(0, K, dtype=torch.int64),
              w1, w3, w2, swiglu_limit=L)
    assert out.shape == (0, D) and out.dtype == torch.bfloat16


# ---- bad input --------------------------------------------------------------------------------------
def test_route_bad_input() -> None:
    logits = torch.randn(T, E)
    with pytest.raises(ValueError, match="k"):
        route(logits, k=E + 1, routed_scaling_factor=1.5)
    with pytest.raises(TypeError, match="logits"):
        route(logits.bfloat16(), k=K, routed_scaling_factor=1.5)
    with pytest.raises(ValueError, match="bias"):
        route(logits, k=K, routed_scaling_factor=1.5, bias=torch.zeros(E + 1))
    with pytest.raises(ValueError, match="input_ids"):
        route(logits, k=K, routed_scaling_factor=1.5, tid2eid=torch.zeros(10, K, dtype=torch.int64))
    tid2eid = torch.zeros(10, K, dtype=torch.int64)
    with pytest.raises(ValueError, match="input_ids"):
        route(logits, k=K, routed_scaling_factor=1.5, tid2eid=tid2eid, input_ids=torch.full((T,), 10))
    with pytest.raises(ValueError, match="input_ids"):
        route(logits, k=K, routed_scaling_factor=1.5, tid2eid=tid2eid, input_ids=torch.zeros(T - 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias"):
        route(logits, k=K, routed_scaling_factor=1.5, bias=torch.zeros(E), tid2eid=tid2eid,
              input_ids=torch.zeros(T, dtype=torch.int64))
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        route(logits, k=K, routed_scaling_factor=0.0)


def test_moe_bad_input() -> None:
    x = torch.randn(T, D).bfloat16()
    w1, w3, w2 = experts()
    weights, ids = route(torch.randn(T, E), k=K, routed_scaling_factor=1.5)
    with pytest.raises(ValueError, match="ids"):
        moe(x, weights, ids + E, w1, w3, w2, swiglu_limit=L)
    with pytest.raises(TypeError, match="weights"):
        moe(x, weights.bfloat16(), ids, w1, w3, w2, swiglu_limit=L)
    with pytest.raises(ValueError, match="weights"):
        moe(x[:-1], weights, ids, w1, w3, w2, swiglu_limit=L)
    with pytest.raises(ValueError, match="w2"):
        moe(x, weights, ids, w1, w3, w2.transpose(1, 2), swiglu_limit=L)
    with pytest.raises(ValueError, match="shared"):
        moe(x, weights, ids, w1, w3, w2, swiglu_limit=L, shared=(w1[0], w3[0], w2[0, :, :-1]))
    q, s = quant_fp4(w1)
    with pytest.raises(ValueError, match="w1_scale"):
        moe_fp4(x, weights, ids, q, s[..., :-1], q, s, *quant_fp4(w2), swiglu_limit=L)
    with pytest.raises(TypeError, match="w1"):
        moe_fp4(x, weights, ids, w1, s, q, s, *quant_fp4(w2), swiglu_limit=L)


# ---- the MoE module -----------------------------------------------------------------------------------
def test_moe_layer_equals_dense_fp64_with_dequantised_fp4() -> None:
    from dsv4lab.config import get_config
    from dsv4lab.layers.moe import MoE

    cfg = get_config("toy")
    layer = MoE(cfg, 2, seed=5)                    # layer 2: bias routing
    assert not layer.hash_layer and layer.gate.bias.dtype == torch.float32
    ex = layer.experts
    assert ex.w1.dtype == torch.uint8 and ex.w1.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, D // 2)
    assert ex.w2_scale.shape == (cfg.n_routed_experts, D, cfg.moe_intermediate_size // 32)
    x = torch.randn(T, D).bfloat16()
    with torch.no_grad():
        got = layer(x)
        weights, ids = layer.route(x)
    w1, w3, w2 = (dequant_fp4(getattr(ex, n), getattr(ex, f"{n}_scale")) for n in ("w1", "w3", "w2"))
    sh = layer.shared_experts
    dense_w = torch.zeros(T, cfg.n_routed_experts, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    want = sum(dense_w[:, e, None] * expert64(x, w1[e], w3[e], w2[e], cfg.swiglu_limit)
               for e in range(cfg.n_routed_experts)) + expert64(x, sh.w1, sh.w3, sh.w2, cfg.swiglu_limit)
    assert bf16_ulps(got, want.bfloat16()).max().item() <= 1     # as in the dense test above
    # realistic scale: unit-RMS input -> O(1) output
    assert 0.2 < got.float().pow(2).mean().sqrt().item() < 3


def test_moe_layer_hash_routing() -> None:
    from dsv4lab.config import get_config
    from dsv4lab.layers.moe import MoE

    cfg = get_config("toy")
    layer = MoE(cfg, 0, seed=5)
    assert layer.hash_layer and layer.gate.tid2eid.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    x, tokens = torch.randn(T, D).bfloat16(), torch.randint(0, cfg.vocab_size, (T,))
    _, ids = layer.route(x, tokens)
    assert torch.equal(ids, layer.gate.tid2eid[tokens])
    with pytest.raises(ValueError, match="input_ids"):
        layer(x)
