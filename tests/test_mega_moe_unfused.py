"""CPU tests of the elementwise parts of dsv4lab/kernels/deep_gemm/mega_moe_unfused.py (DeepGEMM MegaMoE's
arithmetic, unfused) against independent fp64 formulations and hand-derived cases; the GEMMs are emulated in fp32
(deep_gemm cannot be imported here). The bitwise comparison with the fused kernel itself is a GPU bench
(bench/pr44367_megamoe.py mega phase, bench/pr44367_megamoe_ep.py)."""
import math

import pytest
import torch

from dsv4lab.kernels.deep_gemm import mega_moe_unfused as mu
from dsv4lab.kernels.deep_gemm.grouped_moe import HopperExperts, quantize_blocks_fp8
from dsv4lab.quant import dequant_fp8, quant_fp8

E4M3_REL_HALF_ULP = 2.0 ** -4      # e4m3: 3 mantissa bits -> RNE error <= 2^-4 relative (normal range)
E4M3_SUBNORMAL_STEP = 2.0 ** -9    # e4m3 subnormal spacing (times the block scale)


def _ceil_log2_fp64(v: float) -> int:
    """Exact ceil(log2 v) for a positive normal float via frexp (v = m 2^e, m in [0.5, 1))."""
    m, e = math.frexp(v)
    return e - 1 if m == 0.5 else e


def test_ceil_log2_bits_vs_frexp():
    vals = torch.cat([torch.rand(2000) * 10.0 ** torch.randint(-30, 30, (2000,)).float(),
                      2.0 ** torch.arange(-126, 127, dtype=torch.float32),
                      torch.tensor([1.0, 3.0, 448.0, 0.75])]).float()
    vals = vals[(vals > 0) & torch.isfinite(vals) & (vals >= torch.finfo(torch.float32).tiny)]
    got = mu.ceil_log2_bits(vals)
    want = torch.tensor([_ceil_log2_fp64(float(v)) for v in vals], dtype=torch.int32)
    assert torch.equal(got, want)
    # DeepGEMM's bit rule at the edges: 0 -> -127, any subnormal -> -126
    assert mu.ceil_log2_bits(torch.tensor([0.0, 1e-45, 1e-40])).tolist() == [-127, -126, -126]


def test_pow2_from_exponent_exact():
    e = torch.arange(-126, 128, dtype=torch.int32)
    assert torch.equal(mu.pow2_from_exponent(e).double(), torch.pow(2.0, e.double()))
    assert mu.pow2_from_exponent(torch.tensor([-127])).item() == 0.0


def test_mega_scales_hand_cases():
    amax = torch.tensor([0.0, 1.0, 448.0, 449.0, 224.0, 3.5], dtype=torch.float32)
    sf, sf_inv = mu.mega_e4m3_scales(amax)
    # 1/448 = 0.00223 lies in (2^-9, 2^-8]; 448/448 = 1 exactly in fp32; 449/448 > 1; 224/448 = 1/2; 3.5/448 = 2^-7
    assert sf.tolist() == [0.0, 2.0 ** -8, 1.0, 2.0, 0.5, 2.0 ** -7]
    assert sf_inv[0].item() == 2.0 ** 127        # all-zero block: zero codes (0 * 2^127), no floor
    assert torch.equal(sf[1:] * sf_inv[1:], torch.ones(5))


def test_mega_scales_vs_fp64_rule():
    amax = (torch.randn(5000).abs() * 10.0 ** torch.randint(-6, 4, (5000,)).float()).float() + 1e-30
    sf, sf_inv = mu.mega_e4m3_scales(amax)
    scaled32 = (amax.double() * float(torch.tensor(1 / 448, dtype=torch.float32))).float()   # one fp32 rounding
    want = torch.tensor([2.0 ** _ceil_log2_fp64(float(v)) for v in scaled32])
    assert torch.equal(sf.double(), want)
    assert torch.equal(sf_inv.double(), 1.0 / want)
    assert bool((amax.double() * sf_inv.double() <= 448.0 * (1 + 2 ** -22)).all())   # saturation never needed


def test_to_e4m3_satfinite_saturates_and_rounds_even():
    v = torch.tensor([500.0, -1e6, 448.0, 1.0625, 1.1875, 0.0])
    q = mu.to_e4m3_satfinite(v).float()
    # 1.0625 is the tie between 1.0 and 1.125 -> even (1.0); 1.1875 between 1.125 and 1.25 -> even (1.25)
    assert q.tolist() == [448.0, -448.0, 448.0, 1.0, 1.25, 0.0]


def _swiglu64(l1: torch.Tensor, w: torch.Tensor, limit: float) -> torch.Tensor:
    """fp64 clamp-SwiGLU times the row weight, the gate clamped from above only."""
    inter = l1.shape[1] // 2
    g = l1[:, :inter].double().clamp(max=limit)
    u = l1[:, inter:].double().clamp(-limit, limit)
    return g * torch.sigmoid(g) * u * w.double()[:, None]


@pytest.mark.parametrize("limit", [2.0, 10.0])
def test_swiglu_weighted_quant_vs_fp64(limit):
    m, inter = 9, 256
    l1 = (torch.randn(m, 2 * inter) * 3.0).float()        # 3x unit RMS: some entries hit the clamp at L=2
    w = torch.rand(m).float() * 2.5
    w[3] = 0.0                                            # a padding row
    q, sf = mu.swiglu_weighted_quant(l1, w, limit, fast_math=False)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, inter) and sf.shape == (m, inter // 64)
    h = _swiglu64(l1, w, limit)
    blocks = h.view(m, inter // 64, 64)
    deq = (q.float().view(m, inter // 64, 64).double() * sf.double()[..., None])
    # e4m3 RNE: half an ulp relative in the normal range, half a subnormal step (x sf) below it; + fp32 h error
    bound = torch.maximum(blocks.abs() * E4M3_REL_HALF_ULP, sf.double()[..., None] * E4M3_SUBNORMAL_STEP / 2)
    assert bool(((deq - blocks).abs() <= bound * (1 + 1e-5) + blocks.abs() * 1e-6).all())
    # scale rule on the fp64 amax (away from power-of-two boundaries, where fp32 rounding may decide)
    ratio = blocks.abs().amax(-1) / 448.0
    ok = ratio > 0
    log2 = torch.log2(ratio[ok])
    far = (log2 - log2.round()).abs() > 1e-4
    assert torch.equal(sf[ok][far].double(), torch.pow(2.0, torch.ceil(log2[far])))
    assert bool((q[3].float() == 0).all()) and bool((sf[3] == 0).all())      # weight 0 -> zero codes, sf 0


def test_weight_applied_before_quantisation():
    """A power-of-two weight is exact in fp32: same codes, scale times the weight (weight before the quantiser)."""
    l1 = torch.randn(4, 256).float()
    q1, sf1 = mu.swiglu_weighted_quant(l1, torch.ones(4), 10.0, fast_math=False)
    q8, sf8 = mu.swiglu_weighted_quant(l1, torch.full((4,), 0.125), 10.0, fast_math=False)
    assert torch.equal(q1.view(torch.uint8), q8.view(torch.uint8))
    assert torch.equal(sf8, sf1 * 0.125)
    # a non-power-of-two weight changes the codes (it is not applied after the quantiser)
    q3, _ = mu.swiglu_weighted_quant(l1, torch.full((4,), 0.3), 10.0, fast_math=False)
    assert not torch.equal(q1.view(torch.uint8), q3.view(torch.uint8))


def test_gate_clamped_from_above_only():
    inter = 64
    l1 = torch.zeros(2, 2 * inter)
    l1[0, :inter], l1[0, inter:] = 30.0, 30.0      # gate and up both clamped to L = 2
    l1[1, :inter], l1[1, inter:] = -30.0, 1.0      # gate NOT clamped below: silu(-30) ~ -2.8e-12, not silu(-2)
    q, sf = mu.swiglu_weighted_quant(l1, torch.ones(2), 2.0, fast_math=False)
    deq = q.float() * sf.repeat_interleave(64, dim=1)
    assert deq[0, 0].item() == pytest.approx(2.0 * torch.sigmoid(torch.tensor(2.0)).item() * 2.0, rel=2 ** -4)
    assert deq[1, 0].item() == pytest.approx(-30.0 * math.exp(-30.0) / (1 + math.exp(-30.0)), rel=2 ** -4)


def test_fast_math_cpu_fallback_close():
    g = torch.randn(4096).float() * 4
    acc, fast = mu.silu_mega(g, False), mu.silu_mega(g, True)
    # exp2 of the rounded product g * log2(e): its half-ulp error |g log2 e| 2^-24 becomes a relative error of
    # ~|g| 2^-24 in exp, hence in sig for g < 0; plus a few ulps of the other roundings
    tol = (fast.double() - acc.double()).abs() / acc.double().abs().clamp_min(1e-30)
    assert bool((tol <= 2.0 ** -23 * (4 + g.double().abs())).all())


def test_zero_interleave_is_per64_gemm():
    """deq(A') @ deq(W')^T with per-128 scales on the interleaved operands == the per-64-scaled product (fp64)."""
    m, n, inter = 6, 128, 256
    q, sf = mu.swiglu_weighted_quant(torch.randn(m, 2 * inter), torch.rand(m) + 0.5, 10.0, fast_math=False)
    w2q, w2sf, _ = quantize_blocks_fp8(torch.randn(1, n, inter) / inter ** 0.5)
    wide, wide_sf = mu.interleaved_l2_weights(w2q, w2sf)
    a2 = mu.zero_interleave_rows(q)
    assert a2.shape == (m, 2 * inter) and wide.shape == (1, n, 2 * inter) and wide_sf.shape == (1, 1, 4)
    assert bool((a2.float().view(m, -1, 2, 64)[:, :, 0] == 0).all())          # zeros first in every 128-block
    lhs = dequant_fp8(a2, sf, 128).double() @ dequant_fp8(wide[0], wide_sf[0], (128, 128)).double().T
    h64 = q.float().double() * sf.double().repeat_interleave(64, dim=1)
    rhs = h64 @ dequant_fp8(w2q[0], w2sf[0], (128, 128)).double().T
    assert torch.equal(lhs, rhs)        # both exact in fp64 (e4m3 products, pow2 scales, 256 terms)


def test_combine_slots_sum_without_weights():
    t, k, dim = 5, 3, 64
    vals = (torch.randn(t * k + 2, dim) * 4).bfloat16()      # bf16 of similar magnitude: fp32 sum of 3 is exact
    row = torch.randperm(t * k + 2)[: t * k].view(t, k)
    y = mu.combine_slots(vals, row)
    want = vals[row].double().sum(dim=1).to(torch.bfloat16)   # exact sum, one rounding
    assert torch.equal(y, want)


def _emulated_l1(a, a_sf, b, b_sf_rows):
    """fp32 GEMM on dequantised operands (per-row B scales); padding rows are zero."""
    return dequant_fp8(a, a_sf, 128) @ (b.float() * b_sf_rows.repeat_interleave(128, dim=1)).T


def _emulated_l2(a, a_sf, b, b_sf, m_indices):
    out = torch.zeros(a.shape[0], b.shape[1])
    a32 = dequant_fp8(a, a_sf, 128)
    for g in torch.unique(m_indices[m_indices >= 0]).tolist():
        rows = m_indices == g
        out[rows] = a32[rows] @ dequant_fp8(b[g], b_sf[g], (128, 128)).T
    return out.bfloat16()


def _toy(e=4, d=256, inter=128):
    w13, s13, _ = quantize_blocks_fp8(torch.randn(e, 2 * inter, d) / d ** 0.5)
    w2, s2, _ = quantize_blocks_fp8(torch.randn(e, d, inter) / inter ** 0.5)
    return HopperExperts(w13, s13, w2, s2, e, 0)


def test_unfused_like_mega_end_to_end_vs_fp64():
    experts, t, k, limit = _toy(), 7, 2, 10.0
    x_q, x_sf = quant_fp8(torch.randn(t, experts.hidden), 128, pow2=True)
    ids = torch.stack([torch.randperm(experts.n_routed)[:k] for _ in range(t)])
    w = torch.rand(t, k) + 0.2
    y, mid = mu.unfused_like_mega(x_q, x_sf, w, ids, experts, swiglu_limit=limit, fast_math=False,
                                  l1_gemm=_emulated_l1, l2_gemm=_emulated_l2, alignment=8, return_intermediates=True)
    assert y.dtype == torch.bfloat16 and y.shape == (t, experts.hidden)
    x64 = dequant_fp8(x_q, x_sf, 128).double()
    y64 = torch.zeros(t, experts.hidden, dtype=torch.float64)
    for ti in range(t):
        for j in range(k):
            e = int(ids[ti, j])
            w13 = dequant_fp8(experts.w13[e], experts.w13_sf[e], (128, 128)).double()
            w2 = dequant_fp8(experts.w2[e], experts.w2_sf[e], (128, 128)).double()
            l1 = x64[ti:ti + 1] @ w13.T
            row = int(mid["layout"].row[ti, j])
            assert torch.allclose(mid["l1"][row].double(), l1[0], rtol=1e-5, atol=1e-5)   # fp32 L1, no bf16
            y64[ti] += (_swiglu64(l1, w[ti, j:j + 1], limit) @ w2.T)[0]
    err = (y.double() - y64).norm() / y64.norm()
    # e4m3 intermediate (<= 2^-4 relative per element, ~2^-4/sqrt(3) rms) + bf16 slot/out roundings
    assert err < 0.05, err
    assert mid["q_sf"].shape == (mid["l1"].shape[0], experts.inter // 64)


def test_unfused_like_mega_input_checks_and_empty():
    experts = _toy()
    x_q, x_sf = quant_fp8(torch.randn(3, experts.hidden), 128, pow2=True)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    w = torch.rand(3, 2)
    kw = dict(swiglu_limit=10.0, l1_gemm=_emulated_l1, l2_gemm=_emulated_l2, alignment=8)
    with pytest.raises(ValueError, match="ids"):
        mu.unfused_like_mega(x_q, x_sf, w, ids + 2, experts, **kw)
    with pytest.raises(ValueError, match="x_sf"):
        mu.unfused_like_mega(x_q, x_sf[:, :1], w, ids, experts, **kw)
    with pytest.raises(TypeError, match="x_q"):
        mu.unfused_like_mega(x_q.float(), x_sf, w, ids, experts, **kw)
    with pytest.raises(ValueError, match="swiglu_limit"):
        mu.unfused_like_mega(x_q, x_sf, w, ids, experts, **{**kw, "swiglu_limit": 0.0})
    y = mu.unfused_like_mega(x_q[:0], x_sf[:0], w[:0], ids[:0], experts, **kw)
    assert y.shape == (0, experts.hidden) and y.dtype == torch.bfloat16


def test_rows_found_in():
    pool = torch.randint(0, 256, (50, 64), dtype=torch.uint8)
    rows = torch.cat([pool[[3, 17, 49]], torch.randint(0, 256, (2, 64), dtype=torch.uint8)])
    rows[4] = pool[0]
    rows[3] = pool[5]
    rows[3, 7] ^= 1                                         # one bit off a pool row -> not found
    assert mu.rows_found_in(rows, pool).tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError):
        mu.rows_found_in(rows[:, :8], pool)


def test_approx_ptx_refuses_cpu():
    from dsv4lab.kernels.triton.mega_approx import approx_elementwise

    with pytest.raises(ValueError, match="CUDA"):
        approx_elementwise(torch.ones(4), "ex2")
    with pytest.raises(ValueError, match="op"):
        approx_elementwise(torch.ones(4), "tanh")


def test_fused_kernel_configs_parses_generated_source(tmp_path):
    values = [str(i) for i in range(len(mu.FUSED_TEMPLATE_ARGS))]
    values[17], values[20] = "10.0f", "true"
    (tmp_path / "k1").mkdir()
    (tmp_path / "k1" / "kernel.cu").write_text(
        "#include <deep_gemm/impls/sm90_fp8_mega_moe.cuh>\nstatic void __instantiate_kernel() {\n"
        "    auto ptr = reinterpret_cast<void*>(&sm90_fp8_mega_moe_impl<\n        "
        + ",\n        ".join(values) + "\n    >);\n}\n")
    (tmp_path / "k2.cu").write_text("unrelated")
    cfgs = mu.fused_kernel_configs([tmp_path, tmp_path / "missing"])
    assert len(cfgs) == 1
    assert cfgs[0]["kReuseAccumAsFinal"] == "true" and cfgs[0]["kActivationClamp"] == "10.0f"
    assert cfgs[0]["kFP8SwapAB"] == str(len(values) - 1)
