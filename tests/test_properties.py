"""Property-based tests (hypothesis) over shapes and values: the references against independent math, and every
Triton kernel (under the interpreter on a CPU, on the GPU otherwise) against its reference.

Hypothesis draws shapes, magnitudes (powers of two spread over many binades) and a seed; tensors come from a
torch generator seeded with it, so examples stay cheap to generate and shrink. A fixed, derandomized profile keeps
CI stable (same examples every run), examples are few and shapes small: the interpreter is slow.

Tolerances (why each one):
- bf16 outputs of the same fp32 math: 1 bf16 ulp (the interpreter truncates fp32 -> bf16 where the GPU rounds).
- fp32 outputs: a few fp32 ulps (different reduction order).
- fp8: the kernels claim bitwise equality with the reference (pow2 scales, the same RNE e4m3 rounding).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4lab.kernels import registry
from dsv4lab.kernels.reference import attn_out as attn_ref
from dsv4lab.kernels.reference.attention import sparse_attention_with_sink
from dsv4lab.kernels.reference.mhc import sinkhorn
from dsv4lab.kernels.reference.moe import route as route_ref
from dsv4lab.kernels.reference.norms import rmsnorm
from dsv4lab.rope import base_inv_freq

# applied per test (not a global profile: other modules keep their own hypothesis settings)
fast = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
seeds = st.integers(0, 2**31 - 1)
binades = st.integers(-12, 12)           # power-of-two magnitude of a tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mant_bits(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]


def ulps(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``dtype`` ulp at |v| (float64), floored at the smallest normal's."""
    a = v.double().abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant_bits(dtype))


def on_dev(*xs):
    return tuple(x.to(DEV) if isinstance(x, torch.Tensor) else x for x in xs)


def cpu(out):
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


# ---- references against independent math ----------------------------------------------------------------------
@fast
@given(t=st.integers(1, 4), d=st.integers(1, 96), k=st.integers(-20, 20), seed=seeds)
def test_rmsnorm_is_invariant_to_power_of_two_scaling(t, d, k, seed):
    """With eps = 0, scaling x by 2^k scales mean(x^2) by 4^k and rsqrt by 2^-k exactly: same output bits."""
    g = gen(seed)
    x, w = torch.randn(t, d, generator=g), torch.randn(d, generator=g)
    assert torch.equal(rmsnorm(x * 2.0 ** k, w, 0.0), rmsnorm(x, w, 0.0))
    y = rmsnorm(x, None, 0.0).double()                      # unit RMS per row, up to fp32 rounding
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(t, dtype=torch.float64), rtol=1e-6)


@fast
@given(t=st.integers(1, 3), n=st.integers(2, 6), iters=st.integers(1, 25), spread=st.floats(0.1, 8.0), seed=seeds)
def test_sinkhorn_columns_sum_to_one(t, n, iters, spread, seed):
    """The last pass normalises columns: sums S/(S + eps) = 1 - O(eps); entries non-negative."""
    eps = 1e-6
    c = sinkhorn(spread * torch.randn(t, n, n, generator=gen(seed)), iters, eps)
    assert bool((c >= 0).all())
    assert float((c.double().sum(-2) - 1).abs().max()) <= 2 * eps + 1e-6     # + fp32 rounding of the sums


@fast
@given(t=st.integers(1, 5), e=st.sampled_from([4, 8, 16, 64]), k=st.integers(1, 8), rsf=st.floats(0.5, 3.0),
       bias=st.booleans(), seed=seeds)
def test_route_reference_picks_the_biased_top_k(t, e, k, rsf, bias, seed):
    """ids distinct, in range, the k best of sqrt(softplus(logit)) + bias; weights (unbiased scores) renormalised
    to sum to the scaling factor."""
    k = min(k, e)
    g = gen(seed)
    logits = 3 * torch.randn(t, e, generator=g)
    b = 0.1 * torch.randn(e, generator=g) if bias else None
    w, ids = route_ref(logits, k=k, routed_scaling_factor=rsf, bias=b)
    assert ids.shape == (t, k) and bool(((ids >= 0) & (ids < e)).all())
    assert all(len(set(row.tolist())) == k for row in ids)
    score = torch.sqrt(F.softplus(logits.double())) + (0 if b is None else b.double())
    chosen = torch.gather(score, 1, ids)
    others = score.scatter(1, ids, float("-inf"))
    assert bool((chosen.min(1).values >= others.max(1).values - 1e-6).all())    # fp32 vs fp64 near-ties only
    assert torch.allclose(w.double().sum(-1), torch.full((t,), rsf, dtype=torch.float64), rtol=1e-5)
    assert bool((w > 0).all())


def dense_attention64(q, kv, idx, sink, scale):
    """float64: each kv row weighted by how many times the token lists it; the sink joins the normaliser."""
    T, H, _ = q.shape
    counts = torch.zeros(T, kv.shape[0] + 1, dtype=torch.float64)
    counts.scatter_add_(1, torch.where(idx < 0, kv.shape[0], idx.long()), torch.ones(idx.shape, dtype=torch.float64))
    logits = torch.einsum("thd,nd->thn", q.double(), kv.double()) * scale
    m = torch.maximum(logits.amax(-1, keepdim=True), sink.double().view(1, H, 1))
    e = torch.exp(logits - m) * counts[:, None, :-1]
    den = e.sum(-1, keepdim=True) + torch.exp(sink.double().view(1, H, 1) - m)
    return torch.einsum("thn,nd->thd", e, kv.double()) / den


def attention_case(t, h, d, n, m, seed):
    g = gen(seed)
    q = torch.randn(t, h, d, generator=g).bfloat16()
    kv = torch.randn(n, d, generator=g).bfloat16()
    idx = torch.randint(-1, n, (t, m), generator=g)
    sink = 0.5 * torch.randn(h, generator=g)
    return q, kv, idx, sink, d ** -0.5


@fast
@given(t=st.integers(1, 4), h=st.integers(1, 4), d=st.sampled_from([16, 32, 64]), n=st.integers(1, 40),
       m=st.integers(1, 24), seed=seeds)
def test_sparse_attention_reference_vs_dense_oracle_and_list_order(t, h, d, n, m, seed):
    """The candidate list is a multiset: permuting it changes nothing beyond fp32 summation order; the result is
    within half a bf16 ulp (one rounding) + fp32 noise of a dense float64 count-weighted softmax."""
    q, kv, idx, sink, scale = attention_case(t, h, d, n, m, seed)
    o = sparse_attention_with_sink(q, kv, idx, sink, scale)
    o64 = dense_attention64(q, kv, idx, sink, scale)
    noise = 1e-5 * float(kv.double().abs().max())
    assert bool(((o.double() - o64).abs() <= 0.5 * ulps(o64, torch.bfloat16) + noise).all())
    perm = torch.randperm(m, generator=gen(seed + 1))
    o_perm = sparse_attention_with_sink(q, kv, idx[:, perm], sink, scale)
    assert bool(((o_perm.double() - o.double()).abs() <= ulps(o64, torch.bfloat16) + noise).all())


@fast
@given(t=st.integers(1, 4), h=st.integers(1, 4), d=st.sampled_from([128, 256]), mag=binades, seed=seeds)
def test_inv_rope_quant_reference_error_bound(t, h, d, mag, seed):
    """Dequantised output vs the fp32 rotated input: e4m3 half-ulp (2^-4 relative) or, below the normals, half the
    subnormal step (2^-10 * scale); scales are powers of two with amax/scale in (224, 448]."""
    g = gen(seed)
    o = (torch.randn(t, h, d, generator=g) * 2.0 ** mag).bfloat16()
    pos = torch.randint(0, 4096, (t,), generator=g)
    cache = attn_ref.rope_cos_sin_cache(base_inv_freq(64, 10000.0), 4096)
    y = attn_ref.inv_rope(o, pos, cache).reshape(t, h * d).double()
    q, s = attn_ref.inv_rope_fp8_quant(o, pos, cache)
    s64 = s.double().repeat_interleave(128, dim=1)
    deq = q.double() * s64
    assert bool(((deq - y).abs() <= 2.0 ** -4 * y.abs() + 2.0 ** -10 * s64).all())
    assert bool((torch.frexp(s)[0] == 0.5).all())
    amax = y.abs().view(t, -1, 128).amax(-1)
    ratio = amax / s.double()
    assert bool(((ratio > 224) & (ratio <= 448)).all())


# ---- Triton kernels against their references ---------------------------------------------------------------------
def triton_ok(op: str) -> None:
    ok, why = registry.availability(op, "triton")
    if not ok:
        pytest.skip(f"{op}/triton unavailable: {why}")


@fast
@given(t=st.integers(0, 4), d=st.integers(8, 300), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       mag=binades, seed=seeds)
def test_triton_mtp_shared_head_rmsnorm(t, d, dtype, mag, seed):
    triton_ok("mtp_shared_head_rmsnorm")
    g = gen(seed)
    h = (torch.randn(t, d, generator=g) * 2.0 ** mag).to(dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    want = registry.get("mtp_shared_head_rmsnorm", "reference")(h, w, 1e-6)
    got = cpu(registry.get("mtp_shared_head_rmsnorm", "triton")(*on_dev(h, w), 1e-6))
    lim = ulps(want, dtype) * (1 if dtype == torch.bfloat16 else 8)     # fp32: reduction order, a few ulps
    assert got.dtype == dtype and got.shape == (t, d)
    assert bool(((got.double() - want.double()).abs() <= lim).all())


@fast
@given(t=st.integers(0, 4), n=st.integers(1, 4), d=st.integers(8, 200), mag=binades, seed=seeds)
def test_triton_mtp_input_rmsnorm(t, n, d, mag, seed):
    triton_ok("mtp_input_rmsnorm")
    g = gen(seed)
    embed = (torch.randn(t, d, generator=g) * 2.0 ** mag).bfloat16()
    prev = (torch.randn(t, n * d, generator=g) * 2.0 ** -mag).bfloat16()
    pos = torch.randint(0, 3, (t,), generator=g)                        # zeros: masked first tokens
    ew, hw = ((1 + 0.1 * torch.randn(d, generator=g)).bfloat16() for _ in range(2))
    args = (embed, pos, prev, ew, hw, 1e-6)
    we, wh = registry.get("mtp_input_rmsnorm", "reference")(*args)
    ge, gh = cpu(registry.get("mtp_input_rmsnorm", "triton")(*on_dev(*args)))
    assert ge.shape == we.shape and gh.shape == wh.shape
    for got, want in ((ge, we), (gh, wh)):
        assert bool(((got.double() - want.double()).abs() <= ulps(want, torch.bfloat16)).all())
    assert bool((ge[pos == 0] == 0).all())


@fast
@given(t=st.integers(0, 4), h=st.integers(1, 5), d=st.sampled_from([128, 256]), mag=binades, seed=seeds)
def test_triton_inv_rope_fp8_quant_bitwise(t, h, d, mag, seed):
    triton_ok("inv_rope_fp8_quant")
    g = gen(seed)
    o = (torch.randn(t, h, d, generator=g) * 2.0 ** mag).bfloat16()
    pos = torch.randint(0, 4096, (t,), generator=g)
    cache = attn_ref.rope_cos_sin_cache(base_inv_freq(64, 10000.0), 4096)
    rq, rs = attn_ref.inv_rope_fp8_quant(o, pos, cache)
    tq, ts = cpu(registry.get("inv_rope_fp8_quant", "triton")(*on_dev(o, pos, cache)))
    assert torch.equal(tq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(ts, rs)


@fast
@given(t=st.integers(0, 4), n=st.integers(1, 6), d=st.sampled_from([64, 128]), mag=binades, seed=seeds)
def test_triton_indexer_q_rope_quant_bitwise(t, n, d, mag, seed):
    triton_ok("indexer_q_rope_quant")
    g = gen(seed)
    q = (torch.randn(t, n, d, generator=g) * 2.0 ** mag).bfloat16()
    pos = torch.randint(0, 5000, (t,), generator=g)
    inv = base_inv_freq(32 if d == 64 else 64, 10000.0)
    w = torch.randn(t, n, generator=g)
    r8, rw = registry.get("indexer_q_rope_quant", "reference")(q, pos, inv, w)
    t8, tw = cpu(registry.get("indexer_q_rope_quant", "triton")(*on_dev(q, pos, inv, w)))
    assert torch.equal(t8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(tw, rw)


@fast
@given(t=st.integers(0, 5), e=st.sampled_from([8, 16, 64]), k=st.integers(1, 8), bias=st.booleans(),
       rsf=st.floats(0.5, 3.0), seed=seeds)
def test_triton_moe_routing(t, e, k, bias, rsf, seed):
    """Same experts in the same order (continuous random logits: no ties); weights within 6 fp32 ulps
    (tests/test_moe_routing.py derives the bound)."""
    triton_ok("moe_routing")
    from dsv4lab.lab.numerics import ulp_diff

    k = min(k, e)
    g = gen(seed)
    logits = 3 * torch.randn(t, e, generator=g)
    b = 0.1 * torch.randn(e, generator=g) if bias else None
    rw, rid = route_ref(logits, k=k, routed_scaling_factor=rsf, bias=b)
    tw, tid = cpu(registry.get("moe_routing", "triton")(*on_dev(logits), k=k, routed_scaling_factor=rsf,
                                                          bias=None if b is None else b.to(DEV)))
    assert torch.equal(tid, rid)
    if t:
        assert ulp_diff(tw, rw).max().item() <= 6


@fast
@given(m=st.integers(0, 6), inter=st.sampled_from([128, 256]), mag=binades, indices=st.booleans(), seed=seeds)
def test_triton_swiglu_quant(m, inter, mag, indices, seed):
    """Scales equal to the unfused chain's, codes within one e4m3 step (an ulp of exp() may cross a midpoint);
    padded rows (m_indices = -1) are zero."""
    pytest.importorskip("triton")
    from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant
    from dsv4lab.quant import quant_fp8

    g = gen(seed)
    gu = (torch.randn(m, 2 * inter, generator=g) * 2.0 ** (mag // 3)).bfloat16()
    mi = torch.where(torch.rand(m, generator=g) < 0.3, -1, 0).to(torch.int32) if indices else None
    limit = 10.0
    gg, uu = gu.float().chunk(2, dim=-1)
    hh = F.silu(gg.clamp(max=limit)) * uu.clamp(-limit, limit)
    if mi is not None:
        hh = torch.where((mi >= 0)[:, None], hh, torch.zeros_like(hh))
    rq, rs = quant_fp8(hh, 128, pow2=True)
    tq, ts = cpu(swiglu_quant(*on_dev(gu), limit, None if mi is None else mi.to(DEV)))
    assert torch.equal(ts, rs)
    order = lambda q: torch.where(q.view(torch.uint8).int() >= 128, -(q.view(torch.uint8).int() - 128),  # noqa: E731
                                  q.view(torch.uint8).int())
    assert tq.numel() == 0 or int((order(tq) - order(rq)).abs().max()) <= 1
    if mi is not None and m:
        assert bool((tq[mi < 0].float() == 0).all())


@fast
@given(t=st.integers(1, 4), h=st.integers(1, 5), d=st.sampled_from([16, 32, 64]), n=st.integers(1, 40),
       m=st.integers(1, 24), splits=st.integers(1, 3), seed=seeds)
def test_triton_sparse_attention(t, h, d, n, m, splits, seed):
    """One pass and split lists + combine: within 2 bf16 ulps of the reference (both round once from fp32 with
    different summation orders; the interpreter truncates) + fp32 noise."""
    triton_ok("sparse_attention")
    from dsv4lab.kernels.triton.sparse_attention import sparse_attention_launch

    q, kv, idx, sink, scale = attention_case(t, h, d, n, m, seed)
    ref = sparse_attention_with_sink(q, kv, idx, sink, scale)
    got = cpu(sparse_attention_launch(*on_dev(q, kv, idx.to(torch.int32), sink), scale, num_splits=splits))
    noise = 1e-5 * float(kv.double().abs().max()) + (2.0 ** -9 * float(kv.double().abs().max()) if DEV == "cuda" else 0)
    assert got.shape == ref.shape
    assert bool(((got.double() - ref.double()).abs() <= 2 * ulps(ref, torch.bfloat16) + noise).all())


@fast
@given(blocks=st.integers(0, 3), extra=st.integers(0, 3), hd=st.sampled_from([64, 128]), dm=st.sampled_from([32, 64]),
       seed=seeds)
def test_triton_compressor(blocks, extra, hd, dm, seed):
    """Ratio-4 compressor (overlapping blocks): one entry per complete block, within 1 bf16 ulp of the reference
    (same fp32 operations; tests/test_compressor_triton.py)."""
    triton_ok("compressor")
    g = gen(seed)
    T, r = 4 * blocks + extra, 4
    x = torch.randn(T, dm, generator=g).bfloat16()
    wkv, wg = ((torch.randn(2 * hd, dm, generator=g) / math.sqrt(dm)).bfloat16() for _ in range(2))
    ape = 0.1 * torch.randn(r, 2 * hd, generator=g)
    nw = (1 + 0.05 * torch.randn(hd, generator=g)).bfloat16()
    inv = base_inv_freq(64, 160000.0)
    args = (x, wkv, wg, ape, nw, r, inv)
    ref = registry.get("compressor", "reference")(*args, head_dim=hd)
    got = cpu(registry.get("compressor", "triton")(*on_dev(*args), head_dim=hd))
    assert got.shape == ref.shape == (blocks, hd)
    assert bool(((got.double() - ref.double()).abs() <= ulps(ref, torch.bfloat16)).all())
