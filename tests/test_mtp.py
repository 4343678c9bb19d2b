"""MTP norm references (dsv4lab.kernels.reference.mtp): masked enorm + per-stream hnorm, shared-head norm,
and the pre-#43746 eager op sequence. The MTP layer itself is tested in test_model.py.
"""
from __future__ import annotations

import pytest
import torch

from dsv4lab.kernels.reference.mtp import mtp_input_before_eager, mtp_input_rmsnorm, mtp_shared_head_rmsnorm

T, N, D, EPS = 12, 4, 256, 1e-6


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i >= 0, i, -(i & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


def inputs():
    embed = torch.randn(T, D).bfloat16()
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1])   # three sequences packed together
    prev = (torch.randn(T, N * D) * 3).bfloat16()                     # the residual is not unit-RMS
    enorm = (1 + 0.2 * torch.randn(D)).bfloat16()
    hnorm = (1 + 0.2 * torch.randn(D)).bfloat16()
    return embed, positions, prev, enorm, hnorm


def norm64(x: torch.Tensor, w: torch.Tensor, two_rounding: bool) -> torch.Tensor:
    x64 = x.double()
    y = x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + EPS)
    if two_rounding:   # bf16 x bf16 in torch = exact product rounded once to bf16
        return (y.bfloat16().double() * w.double()).bfloat16()
    return (y * w.double()).bfloat16()


@pytest.mark.parametrize("two_rounding", [False, True])
def test_masked_rows_zero_and_matches_fp64(two_rounding: bool) -> None:
    embed, positions, prev, enorm, hnorm = inputs()
    e, h = mtp_input_rmsnorm(embed, positions, prev, enorm, hnorm, EPS, two_rounding=two_rounding)
    assert e.shape == (T, D) and h.shape == (T, N, D) and e.dtype == h.dtype == torch.bfloat16
    masked = positions == 0
    assert bool((e[masked] == 0).all())
    assert bool((e[~masked] != 0).any(-1).all())
    # fp32 vs fp64 rsqrt/mean move the value by ~1e-7 relative, so a rounding can flip: <= 1 ulp
    assert bf16_ulps(e[~masked], norm64(embed[~masked], enorm, two_rounding)).max().item() <= 1
    assert bf16_ulps(h, norm64(prev.view(T, N, D), hnorm, two_rounding)).max().item() <= 1


def test_streams_normalised_independently_and_prev_layouts_agree() -> None:
    embed, positions, prev, enorm, hnorm = inputs()
    prev = prev.view(T, N, D) * torch.tensor([0.1, 1.0, 10.0, 100.0])[:, None].bfloat16()
    _, h3 = mtp_input_rmsnorm(embed, positions, prev, enorm, hnorm, EPS)
    _, h2 = mtp_input_rmsnorm(embed, positions, prev.reshape(T, N * D), enorm, hnorm, EPS)
    assert torch.equal(h2, h3)
    # per-stream RMS of h / hnorm is ~1 whatever the stream's scale (a norm over all nD would not do that)
    rms = (h3.double() / hnorm.double()).pow(2).mean(-1).sqrt()
    assert (rms - 1).abs().max().item() < 0.02


def test_one_vs_two_roundings_differ_by_at_most_one_or_two_ulps() -> None:
    embed, positions, prev, enorm, hnorm = inputs()
    _, h1 = mtp_input_rmsnorm(embed, positions, prev, enorm, hnorm, EPS)
    _, h2 = mtp_input_rmsnorm(embed, positions, prev, enorm, hnorm, EPS, two_rounding=True)
    ulps = bf16_ulps(h1, h2)
    # one rounding is within 0.5 ulp of exact, two roundings within ~1 ulp (0.5 ulp scaled by |w| ~ 1, + 0.5)
    assert ulps.max().item() <= 2
    assert 0 < (ulps > 0).float().mean().item() < 0.5   # "a fraction of elements differ" (refactors.md 3.c)


def test_before_eager_equals_two_rounding_bitwise() -> None:
    embed, positions, prev, enorm, hnorm = inputs()
    e_ref, h_ref = mtp_input_rmsnorm(embed, positions, prev, enorm, hnorm, EPS, two_rounding=True)
    e, h = mtp_input_before_eager(embed, positions, prev, enorm, hnorm, EPS)
    assert torch.equal(e, e_ref) and torch.equal(h, h_ref)
    assert e.shape == (T, D) and h.shape == (T, N, D)


@pytest.mark.parametrize("two_rounding", [False, True])
def test_shared_head_norm(two_rounding: bool) -> None:
    h = (torch.randn(T, D) * 5).bfloat16()
    w = (1 + 0.2 * torch.randn(D)).bfloat16()
    got = mtp_shared_head_rmsnorm(h, w, EPS, two_rounding=two_rounding)
    assert got.dtype == torch.bfloat16 and bf16_ulps(got, norm64(h, w, two_rounding)).max().item() <= 1


def test_empty_tokens() -> None:
    _, _, _, enorm, hnorm = inputs()
    e, h = mtp_input_rmsnorm(torch.zeros(0, D).bfloat16(), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0, N * D).bfloat16(), enorm, hnorm)
    assert e.shape == (0, D) and h.shape == (0, N, D)


def test_bad_input() -> None:
    embed, positions, prev, enorm, hnorm = inputs()
    with pytest.raises(ValueError, match="positions"):
        mtp_input_rmsnorm(embed, positions[:-1], prev, enorm, hnorm)
    with pytest.raises(TypeError, match="positions"):
        mtp_input_rmsnorm(embed, positions.float(), prev, enorm, hnorm)
    with pytest.raises(ValueError, match="prev"):
        mtp_input_rmsnorm(embed, positions, prev[:, :-1], enorm, hnorm)
    with pytest.raises(TypeError, match="prev"):
        mtp_input_rmsnorm(embed, positions, prev.float(), enorm, hnorm)
    with pytest.raises(ValueError, match="hnorm_weight"):
        mtp_input_before_eager(embed, positions, prev, enorm, hnorm[:-1])
    with pytest.raises(ValueError, match="eps"):
        mtp_input_rmsnorm(embed, positions, prev, enorm, hnorm, 0.0)
    with pytest.raises(ValueError, match="weight"):
        mtp_shared_head_rmsnorm(embed, enorm[:-1])
