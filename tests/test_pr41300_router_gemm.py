"""Refactor #41300 (router / compressor bf16 x bf16 -> fp32 GEMM): numerics of the variants against fp64, the
near-tie construction that flips top-6 routing under bf16 rounding only, and ``run(device="cpu")``."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4lab.kernels.reference.router_gemm import fp32_accumulation_bound, router_gemm
from dsv4lab.lab import results
from dsv4lab.refactors import pr41300_router_gemm as R

U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8-bit significand, round to nearest)


def test_shapes_follow_the_configs() -> None:
    flash = [(s.n, s.k) for s in R.gemm_shapes("flash")]
    assert flash == [(256, 4096), (2048, 4096), (1024, 4096), (512, 4096)]
    assert (R.gemm_shapes("pro")[0].n, R.gemm_shapes("pro")[0].k) == (384, 7168)
    assert [s.name for s in R.bench_shapes()][-1] == "router-pro"


def test_make_inputs_magnitudes() -> None:
    x, w = R.make_inputs(512, 256, 4096, seed=3)
    assert x.dtype == w.dtype == torch.bfloat16
    rms = float(x.float().pow(2).mean().sqrt())
    assert abs(rms - 1) < 0.01                       # 2M samples: sampling error of the RMS ~ 5e-4
    assert abs(float(w.float().std()) * 64 - 1) < 0.01  # std 1/sqrt(4096) = 1/64


@pytest.mark.parametrize("variant", ["bf16_linear", "emulated"])
def test_bf16_shortcut_error_is_one_bf16_rounding(variant: str) -> None:
    x, w = R.make_inputs(64, 256, 2048, seed=5)
    exact = x.double() @ w.double().T
    bound = fp32_accumulation_bound(x, w)
    out = R.bf16_linear(x, w) if variant == "bf16_linear" else R.round_logits_bf16(router_gemm(x, w))
    err = (out.double() - exact).abs()
    # |bf16(y32) - y32| <= u |y32| and |y32 - exact| <= B  =>  err <= u |exact| + (1 + u) B
    assert bool((err <= U_BF16 * exact.abs() + (1 + U_BF16) * bound).all())
    # the mean relative error of one rounding is ~ 2^-9 (E|delta| = ulp/4, ulp/|y| in (2^-8, 2^-7]),
    # measured where |y| is large enough that the fp32 accumulation error is negligible
    big = exact.abs() > 0.25
    mean_rel = float((err[big] / exact.abs()[big]).mean())
    assert 2.0 ** -10.5 < mean_rel < 2.0 ** -8.5, math.log2(mean_rel)


def test_fp32_paths_are_far_more_accurate_than_bf16() -> None:
    x, w = R.make_inputs(32, 512, 4096, seed=7)
    exact = R.oracle(x, w)
    bound = fp32_accumulation_bound(x, w)
    stats = {v: R.error_stats(R.VARIANTS[v](x, w), exact, bound) for v in ("upcast_fp32", "bf16_linear")}
    assert stats["upcast_fp32"]["err_over_fp32_bound"] <= 1.0
    assert stats["upcast_fp32"]["max_rel"] < 2.0 ** -16          # fp32 accumulation noise, far below bf16
    assert stats["bf16_linear"]["max_rel"] > 2.0 ** -12          # one bf16 rounding is visible
    assert stats["bf16_linear"]["max_rel"] <= U_BF16 * 1.01


def test_near_tie_construction() -> None:
    case = R.near_tie_case(64, 256, 1024, seed=11)
    a, b = case.pair
    exact = R.oracle(case.x, case.weight)
    gap = exact[:, b] - exact[:, a]
    assert torch.equal(gap, torch.full_like(gap, 2.0 ** -11))   # exact by construction
    assert float(case.bias[a] - case.bias[b]) == pytest.approx(2.0 ** -17, rel=1e-3)
    # the bf16 logits of the pair coincide for most tokens (both in one rounding interval)
    rounded = R.round_logits_bf16(router_gemm(case.x, case.weight))
    assert float((rounded[:, a] == rounded[:, b]).double().mean()) > 0.9


def test_near_tie_flips_top6_under_bf16_only() -> None:
    case = R.near_tie_case(128, 256, 2048, seed=0)
    exact = R.oracle(case.x, case.weight)
    ids_ref = R.selection_scores(exact, case.bias).topk(6, dim=-1).indices
    a, b = case.pair
    has_a, has_b = (ids_ref == a).any(-1), (ids_ref == b).any(-1)
    assert float(has_b.double().mean()) > 0.9        # the pair holds the last slot for most tokens
    assert bool((has_b | ~has_a).all())              # with exact logits a never beats b
    ref32 = router_gemm(case.x, case.weight)
    flips = {
        "reference": R.flip_rate(ids_ref, R.select_experts(ref32, case.bias)),
        "upcast_fp32": R.flip_rate(ids_ref, R.select_experts(R.upcast_fp32(case.x, case.weight), case.bias)),
        "bf16_emulated": R.flip_rate(ids_ref, R.select_experts(R.round_logits_bf16(ref32), case.bias)),
        "bf16_linear": R.flip_rate(ids_ref, R.select_experts(R.bf16_linear(case.x, case.weight), case.bias)),
    }
    assert flips["reference"] == 0.0 and flips["upcast_fp32"] == 0.0
    # expected ~ P(pair at the boundary) * P(same bf16 interval) ~ 0.98 * 0.98; 0.5 leaves room for the seed
    assert flips["bf16_emulated"] > 0.5 and flips["bf16_linear"] > 0.5


def test_flip_rate_hand_case() -> None:
    ref = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert R.flip_rate(ref, torch.tensor([[2, 1, 0], [3, 4, 6]])) == 0.5   # order ignored; row 2 differs
    assert R.flip_rate(ref[:0], ref[:0]) == 0.0


def test_overlap_stats_hand_cases() -> None:
    s = R.overlap_stats([(0.0, 10.0), (5.0, 15.0), (20.0, 30.0)])
    assert (s["span_us"], s["sum_us"], s["busy_us"], s["kernels"]) == (30.0, 30.0, 25.0, 3)
    assert s["overlap"] == 1.0
    assert R.overlap_stats([(0.0, 10.0), (0.0, 10.0)])["overlap"] == 2.0   # two kernels fully concurrent
    groups = R._intervals_by_iteration([(0, 5), (3, 8), (2000, 2005), (2001, 2003)], gap_us=1000)
    assert [len(g) for g in groups] == [2, 2]


def test_variant_availability_on_cpu() -> None:
    assert R.variant_availability("bf16_linear", "cpu") == (True, "")
    for v in ("before", "after", "upcast_tf32"):
        ok, why = R.variant_availability(v, "cpu")
        assert not ok and why
    with pytest.raises(ValueError, match="name"):
        R.variant_availability("nope", "cpu")


def test_run_cpu_records() -> None:
    recs = R.run(device="cpu", quick=True)
    for r in recs:
        assert results.validate(r) is None, r
        assert r["experiment"] == R.EXPERIMENT
    assert not [r for r in recs if r["metric"] == "error"]
    unavailable = {r["variant"]: r["reason"] for r in recs if r["metric"] == "unavailable"}
    assert set(unavailable) == {"before", "after", "upcast_tf32"} and all(unavailable.values())
    flips = {(r["variant"], r["case"]): r["value"] for r in recs if r["metric"] == "topk_flip_rate"}
    assert flips[("upcast_fp32", "near_tie")] == 0.0 and flips[("reference", "near_tie")] == 0.0
    assert flips[("bf16_linear", "near_tie")] > 0.5 and flips[("bf16_emulated", "near_tie")] > 0.5
    max_rel = {(r["variant"], r["shape"], r["tokens"]): r["value"] for r in recs if r["metric"] == "max_rel"}
    assert {v for v, _, _ in max_rel} == {"reference", "bf16_linear", "upcast_fp32"}
    assert all(val < 2.0 ** -16 for (v, _, _), val in max_rel.items() if v != "bf16_linear")
    times = [r for r in recs if r["metric"] == "time"]
    assert times and all(r["timing_mode"] == "cpu-clock" for r in times)
