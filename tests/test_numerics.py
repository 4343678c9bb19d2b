"""lab.numerics against hand-computed cases."""
import math

import pytest
import torch

from dsv4lab.lab import results
from dsv4lab.lab.numerics import calc_diff, compare, max_abs, rel_rms, topk_overlap, ulp_diff, ulp_histogram

FIELDS = dict(experiment="unit", op="toy", backend="triton", variant="after", preset="toy", tokens=8)


# ---- scalar metrics ---------------------------------------------------------------------------------------
def test_calc_diff_of_x_and_2x_is_one_fifth():
    # 1 - 2 * sum(x * 2x) / sum(x^2 + 4x^2) = 1 - 4/5 = 0.2 for any non-zero x
    x = torch.randn(257, dtype=torch.float32)
    assert calc_diff(x, 2 * x) == pytest.approx(0.2, abs=1e-12)
    assert calc_diff(2 * x, x) == pytest.approx(0.2, abs=1e-12)


def test_calc_diff_identity_negation_and_zeros():
    x = torch.randn(64)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert calc_diff(x, -x) == pytest.approx(2.0, abs=1e-12)
    assert calc_diff(torch.zeros(4), torch.zeros(4)) == 0.0


def test_rel_rms_constructed_case():
    ref = torch.tensor([3.0, 4.0])            # ||ref|| = 5
    x = torch.tensor([3.0, 5.0])              # ||x - ref|| = 1
    assert rel_rms(x, ref) == pytest.approx(0.2, abs=1e-15)
    assert rel_rms(ref, ref) == 0.0
    assert rel_rms(torch.ones(3), torch.zeros(3)) == math.inf


def test_max_abs_reports_value_and_index():
    ref = torch.randn(4, 5, dtype=torch.float64)
    x = ref.clone()
    x[2, 3] += 0.5
    x[0, 1] -= 0.25
    value, index = max_abs(x, ref)
    assert index == (2, 3)
    assert value == pytest.approx(0.5, abs=1e-12)


# ---- ulps -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ulp_diff_of_nextafter_steps(dtype):
    x = (torch.randn(200) * 10).to(dtype)
    x = x[x != 0]
    up = torch.full_like(x, math.inf)
    y = x
    for steps in range(1, 4):
        y = torch.nextafter(y, up)
        assert torch.equal(ulp_diff(x, y), torch.full(x.shape, steps, dtype=torch.int64))
        assert torch.equal(ulp_diff(y, x), ulp_diff(x, y))


def test_ulp_diff_hand_cases():
    bf = torch.bfloat16
    one = torch.tensor([1.0], dtype=bf)
    assert ulp_diff(one, torch.tensor([1.0078125], dtype=bf)).item() == 1        # 1 + 2^-7: next bf16 after 1
    assert ulp_diff(one, torch.tensor([2.0], dtype=bf)).item() == 128            # 2^7 bf16 values in [1, 2)
    assert ulp_diff(torch.tensor([1.0]), torch.tensor([2.0])).item() == 2 ** 23  # fp32: 2^23 in [1, 2)
    assert ulp_diff(torch.tensor([0.0], dtype=bf), torch.tensor([-0.0], dtype=bf)).item() == 0
    tiny = torch.tensor([2.0 ** -133], dtype=bf)                                 # smallest bf16 subnormal
    assert ulp_diff(tiny, -tiny).item() == 2                                     # tiny -> 0 -> -tiny
    h = torch.float16
    assert ulp_diff(torch.tensor([65504.0], dtype=h), torch.tensor([math.inf], dtype=h)).item() == 1
    assert ulp_diff(torch.tensor([math.nan]), torch.tensor([1.0])).item() == -1


def test_ulp_diff_rejects_mixed_or_unsupported_dtypes():
    with pytest.raises(TypeError, match="a, b"):
        ulp_diff(torch.ones(2), torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="a, b"):
        ulp_diff(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="b: expected shape"):
        ulp_diff(torch.ones(2), torch.ones(3))


def test_ulp_histogram_bins():
    d = torch.tensor([0, 0, 1, 3, 4, 7, 8, 100, -1])
    assert ulp_histogram(d) == {"0": 2, "1": 1, "3": 1, "4-7": 2, "8-15": 1, "64-127": 1, "nan": 1}


# ---- compare ------------------------------------------------------------------------------------------------
def _oracle(n=512):
    return torch.randn(n, dtype=torch.float64)


def test_err_ratio_with_known_errors():
    o, u = _oracle(), torch.randn(512, dtype=torch.float64)
    eager, fused = o + 0.01 * u, o + 0.03 * u           # rel_rms(fused) = 3 * rel_rms(eager)
    c = compare(o, eager, fused)
    assert c.err_ratio == pytest.approx(3.0, rel=1e-12)
    assert not c.passed and "err_ratio" in c.reasons[0]
    assert compare(o, eager, fused, bar=4.0).passed
    c15 = compare(o, eager, o + 0.015 * u)
    assert c15.err_ratio == pytest.approx(1.5, rel=1e-12) and c15.passed
    assert c.eager_rel_rms == pytest.approx(0.01 * float(u.norm() / o.norm()), rel=1e-12)
    # max_abs variant: the largest |u| scales the same way
    assert compare(o, eager, fused, err="max_abs").err_ratio == pytest.approx(3.0, rel=1e-12)


def test_err_ratio_edge_cases():
    o = _oracle(16)
    assert compare(o, o.clone(), o.clone()).err_ratio == 1.0           # both exact: 0/0 counts as 1
    c = compare(o, o.clone(), o + 1e-3)
    u = torch.finfo(o.dtype).eps / 2                                   # eager exact: its error counts as rounding
    assert c.err_ratio == pytest.approx(rel_rms(o + 1e-3, o) / u) and not c.passed
    tiny = o * (1 + u / 4)                                             # fused within rounding of an exact eager
    assert compare(o, o.clone(), tiny).err_ratio == pytest.approx(1.0) and compare(o, o.clone(), tiny).passed


def test_nan_in_fused_is_flagged_and_fails():
    o = _oracle(64)
    eager = (o + 1e-3 * torch.randn(64, dtype=torch.float64)).float()
    fused = eager.clone()
    fused[5] = math.nan
    c = compare(o, eager, fused)
    assert not c.passed
    assert c.nonfinite_mismatch == 1 and c.nonfinite["fused"]["nan"] == 1
    assert math.isfinite(c.max_abs) and math.isfinite(c.rel_rms)      # metrics over the finite positions
    assert c.ulp_hist["nan"] == 1


def test_matching_inf_is_excluded_but_wrong_sign_fails():
    o = _oracle(32)
    o[3] = math.inf
    eager = o.float()
    fused = o.float().clone()
    assert compare(o, eager, fused).passed
    fused[3] = -math.inf
    c = compare(o, eager, fused)
    assert not c.passed and c.nonfinite_mismatch == 1


def test_bitwise_equal_and_ulp_histogram():
    o = _oracle(300)
    eager = o.to(torch.bfloat16)
    c = compare(o, eager, eager.clone())
    assert c.bitwise_equal and c.passed and c.ulp_hist == {"0": 300} and c.ulp_max == 0
    bumped = eager.clone()
    bumped[7] = torch.nextafter(bumped[7:8], torch.tensor([math.inf], dtype=torch.bfloat16))[0]
    c = compare(o, eager, bumped)
    assert c.bitwise_equal is False and c.ulp_hist == {"0": 299, "1": 1} and c.ulp_max == 1


def test_compare_validates_inputs_before_computing():
    o = _oracle(8)
    with pytest.raises(ValueError, match="fused: expected shape"):
        compare(o, o, o[:4])
    with pytest.raises(TypeError, match="fused: expected a torch.Tensor"):
        compare(o, o, [1.0])
    with pytest.raises(TypeError, match="topk_overlap"):
        compare(o.long(), o.long(), o.long())
    with pytest.raises(ValueError, match="err:"):
        compare(o, o, o, err="cosine")


def test_compare_without_eager_and_to_records():
    o = _oracle(16)
    c = compare(o, None, o + 1e-6)
    assert c.err_ratio is None and c.passed
    c = compare(o, o + 1e-3, o + 1e-3)
    recs = c.to_records(**FIELDS)
    by_metric = {r["metric"]: r for r in recs}
    assert {"max_abs", "rel_rms", "calc_diff", "err_ratio", "bitwise_equal", "nonfinite", "passed"} <= set(by_metric)
    assert by_metric["err_ratio"]["value"] == pytest.approx(1.0)
    assert by_metric["max_abs"]["dtype"] == "float64"
    for r in recs:
        assert results.validate(r) is None
    with pytest.raises(TypeError, match="missing"):
        c.to_records(experiment="x")


# ---- top-k ----------------------------------------------------------------------------------------------
def test_topk_overlap_constructed_sets():
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]])
    b = torch.tensor([[3, 2, 1, 0], [4, 5, 6, 9], [9, 8, -1, -1]])   # row 1 shares 3 of 4
    r = topk_overlap(a, b)
    assert r.overlap.tolist() == [1.0, 0.75, 1.0]
    assert r.mean_overlap == pytest.approx(2.75 / 3)
    assert r.min_overlap == 0.75 and r.mismatched_rows == 1 and r.rows_equal == pytest.approx(2 / 3)
    assert r.passed is None


def test_topk_near_ties_explain_mismatches():
    scores = torch.tensor([[5.0, 4.0, 3.0, 1.0, 0.0],          # clear gap at the boundary (k=2): 4 vs 3
                           [5.0, 4.0, 3.999, 1.0, 0.0]])       # near tie: 4 vs 3.999 (gap 2.5e-4 relative)
    ref = torch.tensor([[0, 1], [0, 1]])
    swapped_tie = torch.tensor([[0, 1], [0, 2]])               # only the tied row differs
    r = topk_overlap(ref, swapped_tie, scores)
    assert r.near_tie_fraction == 0.5 and r.unexplained_rows == 0 and r.passed
    swapped_clear = torch.tensor([[0, 2], [0, 1]])             # the clear row differs: a real error
    r = topk_overlap(ref, swapped_clear, scores)
    assert r.unexplained_rows == 1 and r.passed is False
    recs = r.to_records(**FIELDS)
    assert [x["metric"] for x in recs] == ["topk_overlap", "near_tie_fraction", "topk_unexplained_rows"]


def test_topk_overlap_validation():
    with pytest.raises(ValueError, match="a: a row holds the same index twice"):
        topk_overlap(torch.tensor([[1, 1]]), torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="b: expected an integer index tensor"):
        topk_overlap(torch.tensor([[1, 2]]), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="b: expected shape"):
        topk_overlap(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 3]]))

