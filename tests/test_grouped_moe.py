"""CPU parts of the Hopper grouped-GEMM MoE: fp4 -> fp8 conversion counts, contiguous-layout bookkeeping, the
whole pipeline with an emulated grouped GEMM (the Triton SwiGLU-quant under the interpreter), contracts.

DeepGEMM itself only runs on the GPU (bench/pr44367_megamoe.py); here ``grouped_gemm=`` is an fp32 emulation of
``m_grouped_fp8_gemm_nt_contiguous``: out[r] = bf16(deq(a[r]) @ deq(b[m_indices[r]]).T), padding rows 0.
"""
import math

import pytest
import torch

from dsv4lab.kernels.deep_gemm import grouped_moe as gm
from dsv4lab.kernels.reference.moe import moe_fp4, swiglu_expert
from dsv4lab.lab.numerics import compare, rel_rms
from dsv4lab.quant import (dequant_fp4, dequant_fp8, e2m1_encode, float_to_ue8m0, fp8_roundtrip, pack_fp4, quant_fp4,
                           quant_fp8)

D, I, E, K_TOP, L = 256, 128, 8, 2, 10.0


def emulated_grouped_gemm(a, a_sf, b, b_sf, m_indices):
    a32 = dequant_fp8(a, a_sf, 128)
    out = torch.zeros(a.shape[0], b.shape[1], device=a.device)
    for g in torch.unique(m_indices[m_indices >= 0]).tolist():
        rows = m_indices == g
        out[rows] = a32[rows] @ dequant_fp8(b[g], b_sf[g], (128, 128)).T
    return out.bfloat16()


def mxfp4_experts(n_exp, d, inter, seed):
    """Expert weights ~ N(0, 1/K) stored as MXFP4, like the checkpoint."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n_exp, inter, d, generator=g) / math.sqrt(d)
    w3 = torch.randn(n_exp, inter, d, generator=g) / math.sqrt(d)
    w2 = torch.randn(n_exp, d, inter, generator=g) / math.sqrt(inter)
    return (*quant_fp4(w1), *quant_fp4(w3), *quant_fp4(w2))


def fp8_shared(d, width, seed):
    """A shared expert holding dequantised 128x128 fp8 values (the checkpoint stores it in fp8)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(width, d, generator=g) / math.sqrt(d)
    w3 = torch.randn(width, d, generator=g) / math.sqrt(d)
    w2 = torch.randn(d, width, generator=g) / math.sqrt(width)
    return tuple(fp8_roundtrip(w, (128, 128)) for w in (w1, w3, w2))


def routing(t, n_exp, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g) + 0.1
    return (w / w.sum(-1, keepdim=True) * 1.5).float(), ids


# ---- conversion -------------------------------------------------------------------------------------------
def test_conversion_counts_hand_computed():
    """One 128x128 block. Row 0's first 1x32 group holds 6 at scale 2^0, so amax = 6 and the block scale is
    S = 2^ceil(log2(6/448)) = 2^-6: a value c * 2^s becomes c * 2^(s+6), exact iff a multiple of 2^-9 (the
    e4m3 subnormal step). Row 1: scale 2^-15, codes {0.5, 1, 1.5}: 0.5 -> 2^-10 (a tie, rounds to even 0:
    flushed), 1 -> 2^-9 (exact), 1.5 -> 1.5 * 2^-9 (a tie, rounds to 2^-8: inexact, not flushed).
    Row 2: scale 2^-14 (0.5 -> 2^-9, exact). Everything else is 0."""
    vals = torch.zeros(128, 128)
    vals[0, 0] = 6.0
    vals[1, 0:3] = torch.tensor([0.5, 1.0, 1.5]) * 2.0 ** -15
    vals[2, 0] = 0.5 * 2.0 ** -14
    scales = torch.full((128, 4), 2.0 ** -20)
    scales[0, 0], scales[1, 0], scales[2, 0] = 1.0, 2.0 ** -15, 2.0 ** -14
    codes = e2m1_encode(vals / scales.repeat_interleave(32, dim=1))
    packed, ue8m0 = pack_fp4(codes)[None], float_to_ue8m0(scales)[None]
    assert torch.equal(dequant_fp4(packed, ue8m0), vals[None])          # the fp4 source is what we built
    q, sf, st = gm.fp4_to_fp8_blocks(packed, ue8m0, "w")
    assert sf.item() == 2.0 ** -6
    assert (st.elements, st.nonzero, st.inexact, st.flushed, st.blocks, st.lossy_blocks) == (128 * 128, 5, 2, 1, 1, 1)
    back = dequant_fp8(q[0], sf[0], (128, 128))
    assert back[1, 0].item() == 0.0 and back[1, 1].item() == 2.0 ** -15 and back[1, 2].item() == 2.0 ** -14
    assert back[2, 0].item() == vals[2, 0].item() and back[0, 0].item() == 6.0
    assert st.max_rel_err == 1.0                                          # the flushed element


def test_conversion_of_realistic_weights_is_exact():
    w1, s1, _, _, w2, s2 = mxfp4_experts(3, D, I, seed=1)
    for packed, scale in ((w1, s1), (w2, s2)):
        q, sf, st = gm.fp4_to_fp8_blocks(packed, scale)
        assert st.inexact == 0 and st.lossy_blocks == 0 and st.nonzero > 0.8 * st.elements
        assert torch.equal(dequant_fp8(q, sf, (128, 128)), dequant_fp4(packed, scale))
        assert bool((torch.frexp(sf)[0] == 0.5).all())                  # pow2 block scales


def test_prepare_experts_layout_and_shared_split():
    weights = mxfp4_experts(E, D, I, seed=2)
    shared = fp8_shared(D, 2 * I, seed=3)                                # n_shared_experts = 2 -> 2 groups
    ex = gm.prepare_experts(*weights, shared=shared)
    assert (ex.n_routed, ex.n_shared_groups, ex.n_groups, ex.hidden, ex.inter) == (E, 2, E + 2, D, I)
    assert ex.w13.shape == (E + 2, 2 * I, D) and ex.w13_sf.shape == (E + 2, 2 * I // 128, D // 128)
    assert ex.w2.shape == (E + 2, D, I) and ex.w2_sf.shape == (E + 2, D // 128, I // 128)
    w1, s1, w3, s3, w2, s2 = weights
    assert torch.equal(dequant_fp8(ex.w13[3], ex.w13_sf[3], (128, 128))[:I], dequant_fp4(w1[3], s1[3]))
    assert torch.equal(dequant_fp8(ex.w13[3], ex.w13_sf[3], (128, 128))[I:], dequant_fp4(w3[3], s3[3]))
    # slice 1 of the shared expert = rows I..2I of its w1/w3, columns I..2I of its w2, all exact
    assert torch.equal(dequant_fp8(ex.w13[E + 1], ex.w13_sf[E + 1], (128, 128)),
                       torch.cat((shared[0][I:], shared[1][I:])))
    assert torch.equal(dequant_fp8(ex.w2[E + 1], ex.w2_sf[E + 1], (128, 128)), shared[2][:, I:])
    assert all(st.inexact == 0 for st in ex.stats.values())
    assert ex.bytes_per_group() == 3 * D * I + 4 * (2 * I // 128 * D // 128 + D // 128 * I // 128)
    # the split is exact algebra: sum of the slices' SwiGLU outputs == the wide expert
    x = torch.randn(5, D)
    wide = swiglu_expert(x, *shared, L)
    split = sum(swiglu_expert(x, shared[0][r], shared[1][r], shared[2][:, r], L)
                for r in (slice(0, I), slice(I, 2 * I)))
    assert torch.allclose(wide, split, rtol=1e-5, atol=1e-6)


# ---- bookkeeping ------------------------------------------------------------------------------------------
def test_plan_contiguous_hand_computed():
    groups = torch.tensor([[2, 0], [0, 1], [2, 2]])
    lay = gm.plan_contiguous(groups, n_groups=4, alignment=4)
    assert lay.counts.tolist() == [2, 1, 3, 0] and lay.starts.tolist() == [0, 4, 8, 12]
    assert lay.m_indices.tolist() == [0, 0, -1, -1, 1, -1, -1, -1, 2, 2, 2, -1]
    assert lay.m_indices.dtype == torch.int32
    assert lay.row.tolist() == [[8, 0], [1, 4], [9, 10]]


@pytest.mark.parametrize("alignment", [1, 8, 128])
def test_plan_contiguous_properties(alignment):
    t, k, n_groups = 37, 6, 20
    g = torch.Generator().manual_seed(alignment)
    groups = torch.stack([torch.randperm(n_groups, generator=g)[:k] for _ in range(t)])
    lay = gm.plan_contiguous(groups, n_groups, alignment)
    m = lay.num_rows
    assert m % alignment == 0 and bool((lay.starts % alignment == 0).all())
    rows = lay.row.reshape(-1)
    assert rows.unique().numel() == t * k                       # every slot has its own row
    assert torch.equal(lay.m_indices[rows].long(), groups.reshape(-1))
    assert int((lay.m_indices < 0).sum()) == m - t * k          # everything else is padding
    for grp in range(n_groups):                                 # group rows are one contiguous run from start
        r = torch.nonzero(lay.m_indices == grp).flatten()
        if r.numel():
            assert torch.equal(r, torch.arange(lay.starts[grp], lay.starts[grp] + lay.counts[grp]))
    sizes = torch.bincount(groups.reshape(-1), minlength=n_groups)
    assert m == int(((sizes + alignment - 1) // alignment * alignment).sum())


def test_gather_rows_and_slot_table():
    weights, ids = routing(5, E, K_TOP, seed=4)
    groups, slot_w = gm.slot_table(weights, ids, E, 2)
    assert groups[:, K_TOP:].tolist() == [[E, E + 1]] * 5 and bool((slot_w[:, K_TOP:] == 1).all())
    lay = gm.plan_contiguous(groups, E + 2, 8)
    x_q, x_sf = quant_fp8(torch.randn(5, D), 128)
    a, a_sf = gm.gather_rows(x_q, x_sf, lay)
    for t in range(5):
        for j in range(K_TOP + 2):
            r = lay.row[t, j]
            assert torch.equal(a[r].view(torch.uint8), x_q[t].view(torch.uint8)) and torch.equal(a_sf[r], x_sf[t])
    pad = lay.m_indices < 0
    assert a.view(torch.uint8)[pad].sum().item() == 0 and bool((a_sf[pad] == gm.ZERO_ROW_SCALE).all())


# ---- the pipeline, end to end with an emulated grouped GEMM ------------------------------------------------
def slotwise_fp8_emulation(x, weights, ids, ex, limit):
    """Independent of the layout code: per slot, the same fp8 recipe (x 1x128, bf16 GEMM outputs, h 1x128)."""
    x_q, x_sf = quant_fp8(x, 128)
    x32 = dequant_fp8(x_q, x_sf, 128)
    y = torch.zeros(x.shape[0], x.shape[1])
    slots = [(j, ids[:, j], weights[:, j]) for j in range(ids.shape[1])]
    slots += [(None, torch.full((x.shape[0],), ex.n_routed + s), torch.ones(x.shape[0])) for s in range(ex.n_shared_groups)]
    w13 = [dequant_fp8(ex.w13[e], ex.w13_sf[e], (128, 128)) for e in range(ex.n_groups)]
    w2 = [dequant_fp8(ex.w2[e], ex.w2_sf[e], (128, 128)) for e in range(ex.n_groups)]
    for _, grp, w in slots:
        for t in range(x.shape[0]):
            e = int(grp[t])
            gu = (x32[t:t + 1] @ w13[e].T).bfloat16().float()
            g, u = gu.chunk(2, dim=-1)
            h = torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
            hq, hs = quant_fp8(h, 128)
            out = (dequant_fp8(hq, hs, 128) @ w2[e].T).bfloat16().float()
            y[t] += w[t] * out[0]
    return y.bfloat16()


def oracle64(x, weights, ids, w_deq, shared, limit):
    """fp64 routed + shared experts on the dequantised weights."""
    x64 = x.double()

    def expert(w1, w3, w2, rows):
        g, u = x64[rows] @ w1.double().T, x64[rows] @ w3.double().T
        return (torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)) @ w2.double().T

    y = expert(*shared, slice(None))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            y[t] += weights[t, j].double() * expert(w_deq[0][e], w_deq[1][e], w_deq[2][e], slice(t, t + 1))[0]
    return y


def test_pipeline_matches_slotwise_emulation_reference_and_oracle(device):
    t = 8
    weights4 = mxfp4_experts(E, D, I, seed=5)
    shared = fp8_shared(D, I, seed=6)
    ex = gm.prepare_experts(*weights4, shared=shared)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, D, generator=g).bfloat16()               # unit-RMS activations
    weights, ids = routing(t, E, K_TOP, seed=8)
    if device != "cpu":   # the same pipeline with the Triton kernel on the GPU (the GEMM stays emulated)
        ex_dev = gm.HopperExperts(*(t.to(device) for t in (ex.w13, ex.w13_sf, ex.w2, ex.w2_sf)), ex.n_routed,
                                  ex.n_shared_groups)
        got = gm.experts_forward(x.to(device), weights.to(device), ids.to(device), ex_dev, swiglu_limit=L,
                                 alignment=4, grouped_gemm=emulated_grouped_gemm).cpu()
    else:
        got = gm.experts_forward(x, weights, ids, ex, swiglu_limit=L, alignment=4, grouped_gemm=emulated_grouped_gemm)
    assert got.dtype == torch.bfloat16 and got.shape == (t, D)
    # 1) the layout code changes nothing but fp32 summation order inside the emulated GEMM
    emu = slotwise_fp8_emulation(x, weights, ids, ex, L)
    assert rel_rms(got, emu) < 2e-3
    # 2) against the fp32 reference on the same dequantised weights and the fp64 oracle: the fp8 activations
    #    (x and h, e4m3 RMS relative error ~2.5% each) dominate; a wrong row or weight would be O(1)
    ref = moe_fp4(x, weights, ids, *weights4, swiglu_limit=L, shared=shared)
    w_deq = [dequant_fp4(weights4[i], weights4[i + 1]) for i in (0, 2, 4)]
    y64 = oracle64(x, weights, ids, w_deq, shared, L)
    c = compare(y64, ref, got)
    assert c.rel_rms < 0.08 and c.eager_rel_rms < 0.01 and c.nonfinite_mismatch == 0
    assert compare(y64, emu, got).err_ratio <= 1.5                # as accurate as the unfused fp8 chain


def test_pipeline_empty_and_contracts():
    ex = gm.prepare_experts(*mxfp4_experts(2, D, I, seed=9))
    out = gm.experts_forward(torch.empty(0, D).bfloat16(), torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int64),
                             ex, swiglu_limit=L, alignment=8, grouped_gemm=emulated_grouped_gemm)
    assert out.shape == (0, D)
    x = torch.randn(3, D).bfloat16()
    weights, ids = routing(3, 2, 2, seed=10)
    with pytest.raises(ValueError, match="x"):
        gm.experts_forward(torch.randn(3, D + 128), weights, ids, ex, swiglu_limit=L, alignment=8)
    with pytest.raises(ValueError, match="ids"):
        gm.experts_forward(x, weights, ids + 5, ex, swiglu_limit=L, alignment=8)
    with pytest.raises(ValueError, match="swiglu_limit"):
        gm.experts_forward(x, weights, ids, ex, swiglu_limit=-1.0, alignment=8)
    w = mxfp4_experts(2, D, I, seed=11)
    with pytest.raises(ValueError, match="CUDA"):
        gm.moe_experts(x, weights, ids, *w, swiglu_limit=L)
    with pytest.raises(ValueError, match="w1_scale"):
        gm.prepare_experts(w[0], w[1][..., :-1], *w[2:])
    with pytest.raises(ValueError, match="multiple"):
        gm.prepare_experts(*w, shared=(torch.randn(64, D), torch.randn(64, D), torch.randn(D, 64)))
    with pytest.raises(ValueError, match="multiples of 128"):
        gm.prepare_experts(*quant_fp4(torch.randn(2, 64, D)), *quant_fp4(torch.randn(2, 64, D)),
                           *quant_fp4(torch.randn(2, D, 64)))
