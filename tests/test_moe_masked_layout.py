"""Masked grouped-GEMM layout of the Hopper MoE (triton/moe_masked_layout.py) against straightforward Python loops,
SwiGLU-quant over listed rows, and the whole masked pipeline vs the contiguous one with emulated GEMMs (bitwise:
both compute each valid row with the same math and share the combine kernel)."""
import math

import pytest
import torch

from dsv4lab.kernels.deep_gemm import grouped_moe as gm
from dsv4lab.kernels.triton import moe_masked_layout as ml
from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant
from dsv4lab.quant import dequant_fp8, quant_fp8
from test_grouped_moe import D, I, K_TOP, L, emulated_grouped_gemm, fp8_shared, mxfp4_experts, routing

E = 5
# The layout builders are driven with CPU tensors under the Triton interpreter. On a GPU machine the same kernels
# are checked end to end instead: bench/pr44367_megamoe.py records the masked pipeline bitwise against the
# contiguous one at every T it runs.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU-interpreter tests; on the GPU bench/pr44367_megamoe.py checks this path")


def loop_plan(ids, n_routed, n_shared, m_max):
    """The definition, slot by slot in flattened order: (groups, slot, masked_m) with overflow -> slot -1."""
    t, k = ids.shape
    chunks = max(1, math.ceil(t / m_max))
    g_all = n_routed + n_shared * chunks
    counts = [0] * g_all
    groups = torch.empty(t, k + n_shared, dtype=torch.int64)
    slot = torch.empty(t, k + n_shared, dtype=torch.int32)
    for ti in range(t):
        for j in range(k + n_shared):
            g = int(ids[ti, j]) if j < k else n_routed + (j - k) * chunks + ti // m_max
            groups[ti, j] = g
            if not 0 <= g < g_all or (j < k and g >= n_routed):
                slot[ti, j] = -1
                continue
            slot[ti, j] = counts[g] if counts[g] < m_max else -1
            counts[g] += 1
    return groups, slot, torch.tensor([min(c, m_max) for c in counts], dtype=torch.int32)


def check_plan(ids, n_shared, m_max=None, **kw):
    lay = ml.plan_masked(ids, E, n_shared, m_max, **kw)
    groups, slot, masked_m = loop_plan(ids, E, n_shared, lay.m_max)
    assert torch.equal(lay.slot, slot) and torch.equal(lay.masked_m, masked_m)
    assert torch.equal(lay.groups(ids), groups)
    return lay


def test_plan_matches_loop_with_empty_experts_and_shared_slices():
    ids = torch.tensor([[0, 3], [3, 0], [1, 3], [0, 1]])              # experts 2 and 4 receive no token
    lay = check_plan(ids, n_shared=2)
    assert lay.m_max == 128 and lay.shared_chunks == 1 and lay.masked_m.tolist() == [3, 2, 0, 3, 0, 4, 4]


def test_plan_t1_identical_sets_and_int32_ids():
    check_plan(torch.tensor([[4, 2]], dtype=torch.int32), n_shared=1)
    same = torch.tensor([[1, 4]] * 6)                                  # every token picks the same expert set
    lay = check_plan(same, n_shared=1)
    assert lay.slot[:, 0].tolist() == list(range(6)) and lay.masked_m.tolist() == [0, 6, 0, 0, 6, 6]
    _, ids = routing(9, E, K_TOP, seed=1)
    check_plan(ids, n_shared=0)


def test_plan_splits_shared_slices_into_chunks_of_m_max():
    _, ids = routing(130, E, 2, seed=2)                                # 130 tokens, m_max 256 needed by default
    assert ml.default_m_max(130) == 256
    lay = check_plan(ids, n_shared=1, m_max=128, validate=False)       # routed groups ~52 <= 128; shared: 128 + 2
    assert lay.shared_chunks == 2 and lay.masked_m[E:].tolist() == [128, 2]


def test_plan_overflow_and_bad_ids():
    dup = torch.zeros(129, 2, dtype=torch.int64)                      # each token repeats expert 0: 258 slots > 256
    with pytest.raises(ValueError, match="m_max"):
        ml.plan_masked(dup, E, 0, 256)
    lay = check_plan(dup, 0, 256, validate=False)                      # dropped, not written out of bounds
    assert int((lay.slot < 0).sum()) == 2 and lay.masked_m[0] == 256
    with pytest.raises(ValueError, match="m_max"):
        ml.plan_masked(torch.tensor([[0, 1]]), E, 0, 100)
    bad = torch.tensor([[0, 5], [-1, 2]])
    with pytest.raises(ValueError, match="ids"):
        ml.plan_masked(bad, E, 1)
    lay = check_plan(bad, 1, validate=False)
    assert lay.slot[0, 1] == -1 and lay.slot[1, 0] == -1
    with pytest.raises(TypeError, match="ids"):
        ml.plan_masked(torch.zeros(3, 2), E, 1)
    empty = ml.plan_masked(torch.empty(0, 2, dtype=torch.int64), E, 1)
    assert empty.slot.shape == (0, 3) and empty.masked_m.tolist() == [0] * (E + 1)


def test_scatter_rows_scales_and_combine():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0, 3], [3, 0], [1, 3]])
    x_q, x_sf = quant_fp8(torch.randn(3, D, generator=g), 128)
    lay = ml.plan_masked(ids, E, 1)
    a, a_sf, rows = ml.scatter_masked(x_q, x_sf, ids, lay)
    assert a.shape == (E + 1, 128, D) and a_sf.shape == (E + 1, 128, D // 128) and a_sf.stride()[1] == 1
    groups = lay.groups(ids)
    for t in range(3):
        for j in range(3):
            gi, s = int(groups[t, j]), int(lay.slot[t, j])
            assert int(rows[t, j]) == gi * 128 + s
            assert torch.equal(a[gi, s].view(torch.uint8), x_q[t].view(torch.uint8)) and torch.equal(a_sf[gi, s], x_sf[t])
    # combine: fp32 products then sums in slot order, shared weight 1, one rounding; a dropped row adds nothing
    out = torch.randn(rows.max().item() + 1, 96, generator=g).bfloat16()
    w = torch.rand(3, 2, generator=g) + 0.1
    rows[2, 1] = -1
    got = ml.combine_rows(out, rows, w, torch.bfloat16)
    ref = torch.zeros(3, 96)
    for t in range(3):
        for j in range(3):
            if rows[t, j] >= 0:
                ref[t] = ref[t] + (w[t, j] if j < 2 else torch.tensor(1.0)) * out[rows[t, j]].float()
    assert torch.equal(ml.combine_rows(out, rows, w, torch.float32), ref)
    assert torch.equal(got, ref.bfloat16())           # one RNE rounding (done on the bits under the interpreter)
    with pytest.raises(ValueError, match="weights"):
        ml.combine_rows(out, rows, torch.rand(3, 4), torch.bfloat16)


def test_swiglu_quant_listed_rows_mn_major_scales_equal_row_major():
    g = torch.Generator().manual_seed(4)
    m_max, groups, inter = 128, 2, 256
    gate_up = torch.randn(groups * m_max, 2 * inter, generator=g).bfloat16() * 3
    rows = torch.tensor([0, 5, 130, -1], dtype=torch.int32)
    q, sf = swiglu_quant(gate_up, L, rows=rows, group_rows=m_max)
    assert sf.shape == (groups, m_max, inter // 128) and sf.stride()[1] == 1
    q_ref, sf_ref = swiglu_quant(gate_up[[0, 5, 130]], L)
    for n, r in enumerate((0, 5, 130)):
        assert torch.equal(q[r].view(torch.uint8), q_ref[n].view(torch.uint8))
        assert torch.equal(sf[r // m_max, r % m_max], sf_ref[n])
    with pytest.raises(ValueError, match="rows"):
        swiglu_quant(gate_up, L, torch.zeros(groups * m_max, dtype=torch.int32), rows=rows)
    with pytest.raises(ValueError, match="group_rows"):
        swiglu_quant(gate_up, L, rows=rows, group_rows=100)


def emulated_masked_gemm(a, a_sf, b, b_sf, masked_m, expected_m):
    """fp32 emulation of m_grouped_fp8_gemm_nt_masked; rows past masked_m are NaN (must never be read)."""
    out = torch.full((a.shape[0], a.shape[1], b.shape[1]), float("nan"))
    for g in range(a.shape[0]):
        m = int(masked_m[g])
        if m:
            out[g, :m] = dequant_fp8(a[g, :m], a_sf[g, :m], 128) @ dequant_fp8(b[g], b_sf[g], (128, 128)).T
    return out.bfloat16()


def test_masked_pipeline_bitwise_equal_to_contiguous():
    ex = gm.prepare_experts(*mxfp4_experts(4, D, I, seed=5), shared=fp8_shared(D, I, seed=6))
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(7)).bfloat16()
    weights, ids = routing(6, 4, K_TOP, seed=8)
    yc = gm.experts_forward(x, weights, ids, ex, swiglu_limit=L, alignment=4, grouped_gemm=emulated_grouped_gemm)
    assert gm.layout_for(6) == "gemv" and gm.layout_for(9) == "masked" and gm.layout_for(65) == "contiguous"
    assert gm.layout_for(8192, dict(gm.LAYOUT_POLICY, masked_min_tokens=4096)) == "masked"
    ym = gm.experts_forward(x, weights, ids, ex, swiglu_limit=L, layout="masked", masked_gemm=emulated_masked_gemm)
    assert torch.equal(yc, ym) and torch.isfinite(ym.float()).all()
    # the prefill form: M_max from the largest routed group, shared slice split into chunk groups
    ym2 = gm.experts_forward(x, weights, ids, ex, swiglu_limit=L, layout="masked", masked_gemm=emulated_masked_gemm,
                             policy=dict(gm.LAYOUT_POLICY, static_m_max_tokens=0), validate_ids=False)
    assert torch.equal(yc, ym2)
    with pytest.raises(ValueError, match="layout"):
        gm.experts_forward(x, weights, ids, ex, swiglu_limit=L, layout="ragged")


def test_combine_refuses_rows_outside_out_unless_told_they_are_trusted():
    out = torch.randn(4, 32).bfloat16()
    w = torch.rand(2, 1)
    with pytest.raises(ValueError, match="rows"):
        ml.combine_rows(out, torch.tensor([[0, 4], [1, 2]]), w, torch.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        ml.combine_rows(out, torch.tensor([[0, -2], [1, 2]]), w, torch.bfloat16)
    ok = ml.combine_rows(out, torch.tensor([[0, -1], [1, 2]]), w, torch.float32)
    assert torch.equal(ok[0], w[0, 0] * out[0].float())
