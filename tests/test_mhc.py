"""mHC references (dsv4lab.kernels.reference.mhc): Sinkhorn, mhc_pre, mhc_post, fused post+pre, hc_head.

Oracles: hand-worked cases and an independent float64 re-implementation written from dsv4-layers.md 2.
"""
from __future__ import annotations

import math

import pytest
import torch

from dsv4lab.kernels.reference.mhc import hc_head, mhc_fused_post_pre, mhc_mixes, mhc_post, mhc_pre, sinkhorn
from dsv4lab.kernels.reference.norms import rmsnorm

EPS = 1e-6
N, D, T = 4, 256, 16


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 ulps between two bf16 tensors (sign-magnitude bit patterns mapped to ordered ints)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i >= 0, i, -(i & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


def params(n: int = N, d: int = D, mix_std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Realistic sublayer parameters: mix logits ~ N(0, mix_std), pre ~ 1/n, post ~ 1, comb near identity."""
    fn = torch.randn((2 + n) * n, n * d) * (mix_std / math.sqrt(n * d))
    scale = 0.5 + torch.rand(3)
    base = torch.cat([torch.full((n,), math.log(1 / (n - 1))), torch.zeros(n), torch.eye(n).flatten()])
    return fn, scale, base + 0.3 * torch.randn_like(base)


def residual(t: int = T, n: int = N, d: int = D) -> torch.Tensor:
    """Unit-RMS streams with different per-stream magnitudes (the streams drift apart in a real model)."""
    return (torch.randn(t, n, d) * torch.linspace(0.5, 2.0, n)[:, None]).bfloat16()


# ---- float64 oracle (independent code path) ---------------------------------------------------------
def sinkhorn64(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    c = logits.double().exp()
    c = c / c.sum(-1, keepdim=True) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def mixes64(r: torch.Tensor, fn, scale, base, post_mult=2.0, iters=20):
    t, n, d = r.shape
    x = r.double().reshape(t, n * d)
    m = (x @ fn.double().T) / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)
    s, b = scale.double(), base.double()
    pre = 1 / (1 + torch.exp(-(m[:, :n] * s[0] + b[:n]))) + EPS
    post = post_mult / (1 + torch.exp(-(m[:, n:2 * n] * s[1] + b[n:2 * n])))
    comb = sinkhorn64((m[:, 2 * n:] * s[2] + b[2 * n:]).reshape(t, n, n), iters, EPS)
    return pre, post, comb


# ---- Sinkhorn ---------------------------------------------------------------------------------------
def test_sinkhorn_2x2_by_hand() -> None:
    # logits [[0, ln 3], [0, 0]]: row softmax = [[1/4, 3/4], [1/2, 1/2]], then +eps.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    a, b, c, d = 0.25 + EPS, 0.75 + EPS, 0.5 + EPS, 0.5 + EPS
    col0, col1 = a + c + EPS, b + d + EPS
    one_pass = torch.tensor([[a / col0, b / col1], [c / col0, d / col1]])
    # iters=1 is the softmax row pass plus one column pass; a/col0 = (1/4+e)/(3/4+3e) = 1/3 exactly.
    assert torch.allclose(sinkhorn(logits, iters=1).double(), one_pass.double(), atol=1e-7, rtol=0)
    assert abs(sinkhorn(logits, iters=1)[0, 0].item() - 1 / 3) < 1e-7
    # Row/column scaling preserves the cross ratio K00 K11 / (K01 K10) = 1/3 of K = exp(logits); the only
    # doubly stochastic 2x2 matrix with that cross ratio is [[p, 1-p], [1-p, p]] with (p/(1-p))^2 = 1/3.
    p = 1 / (1 + math.sqrt(3.0))
    limit = torch.tensor([[p, 1 - p], [1 - p, p]])
    assert torch.allclose(sinkhorn(logits, iters=20), limit, atol=1e-5, rtol=0)


def test_sinkhorn_doubly_stochastic_and_matches_fp64() -> None:
    logits = torch.randn(512, N, N)  # realistic comb logits are O(1)
    c = sinkhorn(logits, iters=20, eps=EPS)
    assert c.dtype == torch.float32 and bool((c > 0).all())
    # The last pass normalises columns: sum = S/(S+eps) = 1 - ~eps, plus a few fp32 roundings (6e-8 each).
    assert (c.sum(-2) - 1).abs().max().item() < EPS + 1e-6
    # Rows converge geometrically but are only approximate after 20 iterations: for N(0,1) logits the worst
    # row error over 10^4 draws was 9e-4 (measured); 2e-3 documents that, with margin.
    row_err = (c.sum(-1) - 1).abs()
    assert row_err.max().item() < 2e-3
    assert row_err.mean().item() < (sinkhorn(logits, iters=3).sum(-1) - 1).abs().mean().item()
    # fp32 vs fp64 of the same algorithm: ~40 dependent divisions of O(1) values, each ~6e-8 relative.
    assert (c.double() - sinkhorn64(logits, 20, EPS)).abs().max().item() < 2e-6


# ---- mixes ------------------------------------------------------------------------------------------
def test_mix_ranges_realistic_and_saturated() -> None:
    r = residual()
    fn, scale, base = params()
    pre, post, comb = mhc_mixes(r, fn, scale, base)
    assert bool(((pre > EPS) & (pre < 1 + EPS)).all()) and bool(((post > 0) & (post < 2)).all())
    # not saturated at a realistic init (the point of the init): mixes stay well inside their ranges
    assert 0.05 < pre.min().item() and pre.max().item() < 0.9 and post.max().item() < 1.9
    # saturated logits: fp32 sigmoid reaches exactly 0 or 1, so the bounds become closed
    pre, post, _ = mhc_mixes(r, fn * 1e3, scale, base)
    assert bool(((pre >= EPS) & (pre <= 1 + EPS)).all()) and bool(((post >= 0) & (post <= 2)).all())
    assert pre.min().item() < 1e-3 and post.max().item() > 1.999  # really saturated


def test_mixes_match_fp64_oracle() -> None:
    r = residual()
    fn, scale, base = params()
    got = mhc_mixes(r, fn, scale, base)
    want = mixes64(r, fn, scale, base)
    # fp32 GEMM over nD = 1024 terms: relative error ~ sqrt(1024) * 6e-8 = 2e-6 on O(1) logits; sigmoid and
    # Sinkhorn do not amplify it (derivatives <= 1 for sigmoid; Sinkhorn ~ contraction on near-identity comb).
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max().item() < 2e-5


def test_first_layer_broadcast_shortcut() -> None:
    # All 4 streams equal e (the first layer): flatten(R) @ fn.T == e @ (sum of fn's n column blocks).T and
    # mean(x^2) == mean(e^2) -- the 4x smaller GEMM of vLLM's mhc_pre_broadcast kernel (dsv4-layers.md 2.8).
    e = torch.randn(T, D).bfloat16()
    r = e[:, None, :].expand(T, N, D).contiguous()
    fn, scale, base = params()
    _, post, comb = mhc_mixes(r, fn, scale, base)
    e64 = e.double()
    m = (e64 @ fn.double().view(-1, N, D).sum(1).T) / torch.sqrt((e64 * e64).mean(-1, keepdim=True) + EPS)
    s, b = scale.double(), base.double()
    assert (post.double() - 2 * torch.sigmoid(m[:, N:2 * N] * s[1] + b[N:2 * N])).abs().max().item() < 2e-5
    want_comb = sinkhorn64((m[:, 2 * N:] * s[2] + b[2 * N:]).view(T, N, N), 20, EPS)
    assert (comb.double() - want_comb).abs().max().item() < 2e-5


# ---- mhc_pre ----------------------------------------------------------------------------------------
def test_mhc_pre_matches_fp64_oracle() -> None:
    r = residual()
    fn, scale, base = params()
    w = (1 + 0.1 * torch.randn(D)).bfloat16()
    y, post, comb = mhc_pre(r, fn, scale, base, w)
    pre64, post64, comb64 = mixes64(r, fn, scale, base)
    collapse64 = (pre64[:, :, None] * r.double()).sum(1)
    # Without a weight the output is the rounded collapse: fp32 vs fp64 accumulation differs by ~1e-6
    # relative, so the single bf16 rounding can land on a neighbour: <= 1 ulp.
    y0, _, _ = mhc_pre(r, fn, scale, base, None)
    assert y0.dtype == torch.bfloat16 and y0.shape == (T, D)
    assert bf16_ulps(y0, collapse64.bfloat16()).max().item() <= 1
    # With the weight: round(collapse) -> fp64 RMSNorm -> round. The inner rounding may differ by 1 ulp
    # (above), which moves the normalised value by ~1 ulp before the final rounding: <= 2 ulps overall.
    c = collapse64.bfloat16().double()
    want = (c * torch.rsqrt((c * c).mean(-1, keepdim=True) + EPS) * w.double()).bfloat16()
    ulps = bf16_ulps(y, want)
    assert ulps.max().item() <= 2 and (ulps == 0).float().mean().item() > 0.95
    assert (post.double() - post64).abs().max().item() < 2e-5
    assert (comb.double() - comb64).abs().max().item() < 2e-5
    # the normalised output is exactly RMSNorm of the un-normalised one (same ops, one rounding)
    assert torch.equal(y, rmsnorm(y0, w, EPS))


def test_empty_tokens() -> None:
    fn, scale, base = params()
    r = residual(t=0)
    y, post, comb = mhc_pre(r, fn, scale, base, torch.ones(D, dtype=torch.bfloat16))
    assert y.shape == (0, D) and post.shape == (0, N) and comb.shape == (0, N, N)
    assert mhc_post(y, r, post, comb).shape == (0, N, D)
    assert hc_head(r, fn[:N], scale[:1], base[:N]).shape == (0, D)


# ---- mhc_post ---------------------------------------------------------------------------------------
def test_mhc_post_hand_case_uses_transpose() -> None:
    # n = 2, D = 2, fp32 so the hand arithmetic is exact up to fp32 rounding.
    f = torch.tensor([[10.0, 20.0]])
    r = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])           # stream 0 = [1, 2], stream 1 = [3, 4]
    post = torch.tensor([[0.5, 1.5]])
    comb = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])        # not symmetric
    # R'[0] = 0.5 f + C[0,0] R0 + C[1,0] R1 = [5, 10] + [0.9, 1.8] + [0.9, 1.2] = [6.8, 13.0]
    # R'[1] = 1.5 f + C[0,1] R0 + C[1,1] R1 = [15, 30] + [0.1, 0.2] + [2.1, 2.8] = [17.2, 33.0]
    want = torch.tensor([[[6.8, 13.0], [17.2, 33.0]]])
    got = mhc_post(f, r, post, comb)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # the porting bug (C @ R) gives [6.2, 12.2] for stream 0: the test can tell the two apart
    assert not torch.allclose(got[0, 0], torch.tensor([6.2, 12.2]), atol=1e-3)


def test_mhc_post_matches_fp64_oracle() -> None:
    r = residual()
    f = torch.randn(T, D).bfloat16()
    fn, scale, base = params()
    _, post, comb = mhc_mixes(r, fn, scale, base)
    got = mhc_post(f, r, post, comb)
    want = post.double()[:, :, None] * f.double()[:, None, :] + torch.einsum("tjk,tjd->tkd", comb.double(),
                                                                            r.double())
    # one rounding of an fp32 sum of 5 terms: fp32 error ~1e-7 relative -> at most 1 bf16 ulp
    assert got.dtype == torch.bfloat16 and bf16_ulps(got, want.bfloat16()).max().item() <= 1


def test_fused_post_pre_is_post_then_pre_bitwise() -> None:
    r = residual()
    f = torch.randn(T, D).bfloat16()
    fn_a, scale_a, base_a = params()
    fn_b, scale_b, base_b = params()
    w = (1 + 0.1 * torch.randn(D)).bfloat16()
    _, post, comb = mhc_mixes(r, fn_a, scale_a, base_a)
    new_r, y, post2, comb2 = mhc_fused_post_pre(f, r, post, comb, fn_b, scale_b, base_b, w)
    ref_r = mhc_post(f, r, post, comb)
    ref_y, ref_post, ref_comb = mhc_pre(ref_r, fn_b, scale_b, base_b, w)
    assert new_r.dtype == torch.bfloat16
    for got, want in ((new_r, ref_r), (y, ref_y), (post2, ref_post), (comb2, ref_comb)):
        assert torch.equal(got, want)


# ---- hc_head ----------------------------------------------------------------------------------------
def test_hc_head_matches_fp64_oracle() -> None:
    r = residual()
    fn = torch.randn(N, N * D) * (0.5 / math.sqrt(N * D))
    scale, base = torch.tensor([0.8]), torch.full((N,), math.log(1 / (N - 1))) + 0.2 * torch.randn(N)
    got = hc_head(r, fn, scale, base)
    x = r.double().reshape(T, -1)
    m = (x @ fn.double().T) / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)
    pre = torch.sigmoid(m * scale.double() + base.double()) + EPS
    want = (pre[:, :, None] * r.double()).sum(1)
    assert got.dtype == torch.bfloat16 and bf16_ulps(got, want.bfloat16()).max().item() <= 1


# ---- bad input --------------------------------------------------------------------------------------
def _pre_args():
    fn, scale, base = params()
    return dict(residual=residual(), fn=fn, scale=scale, base=base, norm_weight=torch.ones(D, dtype=torch.bfloat16))


@pytest.mark.parametrize("name,value,exc", [
    ("residual", torch.randn(T, N * D).bfloat16(), ValueError),
    ("residual", torch.randint(0, 3, (T, N, D)), TypeError),
    ("fn", torch.randn(24, N * D).double(), TypeError),
    ("fn", torch.randn(24, D), ValueError),
    ("scale", torch.ones(2), ValueError),
    ("base", torch.zeros(23), ValueError),
    ("norm_weight", torch.ones(D + 1), ValueError),
])
def test_mhc_pre_bad_input(name: str, value: torch.Tensor, exc: type) -> None:
    args = _pre_args()
    args[name] = value
    with pytest.raises(exc, match=name):
        mhc_pre(**args)


def test_bad_scalars_and_post_input() -> None:
    args = _pre_args()
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        mhc_pre(**args, sinkhorn_iters=0)
    with pytest.raises(ValueError, match="hc_eps"):
        mhc_pre(**args, hc_eps=0.0)
    with pytest.raises(ValueError, match="logits"):
        sinkhorn(torch.zeros(3, 4))
    r = residual()
    f = torch.randn(T, D).bfloat16()
    post, comb = torch.ones(T, N), torch.full((T, N, N), 0.25)
    with pytest.raises(TypeError, match="f"):
        mhc_post(f.float(), r, post, comb)
    with pytest.raises(ValueError, match="f"):
        mhc_post(f[:-1], r, post, comb)
    with pytest.raises(ValueError, match="comb"):
        mhc_post(f, r, post, comb[:, :2])
    with pytest.raises(TypeError, match="post"):
        mhc_post(f, r, post.bfloat16(), comb)
    with pytest.raises(ValueError, match="fn"):  # hc_head takes fn [n, nD], not [(2+n)n, nD]
        hc_head(r, params()[0], torch.ones(1), torch.zeros(N))


# ---- modules ----------------------------------------------------------------------------------------
def test_mhc_module_init_is_realistic() -> None:
    from dsv4lab.config import get_config
    from dsv4lab.layers.mhc import HCHead, MHC

    cfg = get_config("toy")
    module = MHC(cfg, seed=3)
    assert module.fn.shape == (cfg.hc_mix_dim, N * D) and module.fn.dtype == torch.float32
    r = residual()
    pre, post, comb = mhc_mixes(r, module.fn, module.scale, module.base)
    # pre ~ 1/n, post ~ 1, comb leaning diagonal but far from the identity or uniform: nothing saturates
    assert 0.05 < pre.mean().item() < 0.5 and pre.max().item() < 0.95
    assert 0.5 < post.mean().item() < 1.5 and post.min().item() > 0.02 and post.max().item() < 1.98
    diag = comb.diagonal(dim1=-2, dim2=-1).mean().item()
    assert 1 / N + 0.05 < diag < 0.9
    y, post2, comb2 = module.pre(r, None)
    assert torch.equal(post2, post) and torch.equal(comb2, comb)
    with pytest.raises(ValueError, match="residual"):
        module.pre(r[:, :2], None)
    head = HCHead(cfg, seed=3)
    assert head.fn.shape == (N, N * D) and head(r).shape == (T, D)
