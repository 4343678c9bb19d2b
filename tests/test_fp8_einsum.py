"""Grouped low-rank wo_a projection: fp8 einsum 'bhr,hdr->bhd' (reference on CPU, DeepGEMM on an SM90 GPU)."""
import pytest
import torch

from dsv4lab.kernels import registry
from dsv4lab.kernels.reference import attn_out as ref
from dsv4lab.lab.numerics import calc_diff
from dsv4lab.rope import base_inv_freq

BF16_HALF_ULP_REL = 2.0 ** -8     # |bf16(x) - x| <= 2^-8 |x| (8 significant bits)
E4M3_HALF_ULP_REL = 2.0 ** -4     # |e4m3(x) - x| <= 2^-4 |x| for normals (4 significant bits)
DEEP_GEMM_OK, DEEP_GEMM_WHY = registry.availability("fp8_einsum_wo_a", "deep_gemm")


def toy_operands(t=16, h=4, d=128, groups=2, o_l=128, device="cpu"):
    """(o, positions, cos_sin_cache, wo_a [G*o_l, r] fp32) with unit-RMS o and wo_a ~ N(0, 1/r)."""
    r = h * d // groups
    o = torch.randn(t, h, d).to(torch.bfloat16)
    pos = torch.randint(0, 4096, (t,))
    cs = ref.rope_cos_sin_cache(base_inv_freq(64, 10000.0), 4096)
    wo_a = torch.randn(groups * o_l, r) * r ** -0.5
    return o.to(device), pos.to(device), cs.to(device), wo_a.to(device)


def explicit_dequant(q, scale, block_rows, block_cols):
    """Own dequantisation: repeat each scale over its block, multiply in fp64."""
    s = scale.double().repeat_interleave(block_cols, dim=-1)
    if block_rows > 1:
        s = s.repeat_interleave(block_rows, dim=-2)
    return q.double() * s


def test_quantize_wo_a_blocks_and_error():
    _, _, _, wo_a = toy_operands(groups=2, o_l=256)
    wq, ws = ref.quantize_wo_a(wo_a, 2)
    assert wq.shape == (2, 256, 256) and wq.dtype == torch.float8_e4m3fn
    assert ws.shape == (2, 2, 2) and ws.dtype == torch.float32
    mant, _ = torch.frexp(ws)
    assert bool((mant == 0.5).all())                                   # powers of two (SM90 reads the exponent only)
    deq = explicit_dequant(wq, ws, 128, 128)
    w = wo_a.double().view(2, 256, 256)
    # nearest rounding: relative 2^-4 for normals, plus half the subnormal step (2^-10 * scale) near zero
    bound = E4M3_HALF_ULP_REL * w.abs() + explicit_dequant(torch.ones_like(wq, dtype=torch.float32), ws, 128, 128) * 2.0 ** -10
    assert bool(((deq - w).abs() <= bound).all())
    wq3, ws3 = ref.quantize_wo_a(wo_a.view(2, 256, 256), 2)            # [G, o_l, r] input: same result
    assert torch.equal(wq3.view(torch.uint8), wq.view(torch.uint8)) and torch.equal(ws3, ws)


def test_reference_einsum_is_the_dequantised_product():
    o, pos, cs, wo_a = toy_operands()
    q, s = ref.inv_rope_fp8_quant(o, pos, cs)
    a, sa = q.view(16, 2, -1), s.view(16, 2, -1)                    # group g = heads [2g, 2g+2)
    wq, ws = ref.quantize_wo_a(wo_a, 2)
    z = ref.fp8_einsum_wo_a(a, sa, wq, ws)
    assert z.shape == (16, 2, 128) and z.dtype == torch.bfloat16 and z.is_contiguous()
    a64, w64 = explicit_dequant(a, sa, 1, 128), explicit_dequant(wq, ws, 128, 128)
    oracle = torch.stack([a64[:, g] @ w64[g].T for g in range(2)], dim=1)
    # bf16 output rounding + fp32 accumulation over r = 256 terms (gamma_r ~ r * 2^-24 of sum |a w|)
    accum = torch.stack([a64[:, g].abs() @ w64[g].abs().T for g in range(2)], dim=1) * 256 * 2.0 ** -24
    assert bool(((z.double() - oracle).abs() <= BF16_HALF_ULP_REL * oracle.abs() + 2 * accum).all())
    out = torch.full(z.shape, float("nan"), dtype=torch.bfloat16)                           # poisoned: every element must be written
    assert ref.fp8_einsum_wo_a(a, sa, wq, ws, out=out) is out and torch.equal(out, z)


def test_fp8_o_proj_error_against_the_fp64_oracle():
    """fp8 activations cost ~2^-4 relative per element; the bf16 (DS-ref) path costs ~2^-8. Same wo_a values in all
    three (the dequantised fp8 weight is exact in bf16), so only the activation format differs."""
    o, pos, cs, wo_a = toy_operands(t=32)
    wq, ws = ref.quantize_wo_a(wo_a, 2)
    w_deq = explicit_dequant(wq, ws, 128, 128)                        # [G, o_l, r]
    wo_b = (torch.randn(256, 256) * 256 ** -0.5).to(torch.bfloat16)
    oracle = ref.o_proj_oracle(o, pos, cs, w_deq, wo_b)
    fp8 = ref.o_proj_fp8(o, pos, cs, wq, ws, wo_b)
    x_bf16 = ref.inv_rope(o, pos, cs).to(torch.bfloat16).view(32, 2, -1)
    bf16 = ref.wo_a_einsum_bf16(x_bf16, w_deq.to(torch.bfloat16)).flatten(1) @ wo_b.T

    def rel_rms(x):
        return ((x.double() - oracle).pow(2).mean() / oracle.pow(2).mean()).sqrt().item()

    # independent per-element errors |e_i| <= 2^-4 |y_i| give E|sum w_i e_i|^2 <= 2^-8 E|z|^2: rel_rms <= 2^-4
    assert rel_rms(fp8) <= E4M3_HALF_ULP_REL
    assert rel_rms(bf16) <= 3 * BF16_HALF_ULP_REL                     # three bf16 roundings (x, z, out)
    assert rel_rms(fp8) > 4 * rel_rms(bf16)                           # the fp8 path is the lossier one


def test_zero_tokens_give_an_empty_z():
    wq, ws = ref.quantize_wo_a(toy_operands()[3], 2)
    a = torch.empty(0, 2, 256, dtype=torch.float8_e4m3fn)
    z = ref.fp8_einsum_wo_a(a, torch.empty(0, 2, 2), wq, ws)
    assert z.shape == (0, 2, 128) and z.dtype == torch.bfloat16


def test_bad_operands_raise():
    o, pos, cs, wo_a = toy_operands()
    q, s = ref.inv_rope_fp8_quant(o, pos, cs)
    a, sa = q.view(16, 2, -1), s.view(16, 2, -1)
    wq, ws = ref.quantize_wo_a(wo_a, 2)
    with pytest.raises(TypeError, match="a: expected dtype"):
        ref.fp8_einsum_wo_a(a.float(), sa, wq, ws)
    with pytest.raises(ValueError, match="w: expected"):
        ref.fp8_einsum_wo_a(q.view(16, 4, -1), s.view(16, 4, -1), wq, ws)
    with pytest.raises(ValueError, match="w_scale: expected shape"):
        ref.fp8_einsum_wo_a(a, sa, wq, ws[:, :, :1])
    with pytest.raises(TypeError, match="a_scale"):
        ref.fp8_einsum_wo_a(a, sa.double(), wq, ws)
    with pytest.raises(TypeError, match="out"):
        ref.fp8_einsum_wo_a(a, sa, wq, ws, out=torch.empty(16, 2, 128))
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        ref.fp8_einsum_wo_a(a, sa, wq, ws, out=torch.empty(2, 16, 128, dtype=torch.bfloat16).transpose(0, 1))
    with pytest.raises(ValueError, match="groups"):
        ref.quantize_wo_a(wo_a, 3)


@pytest.mark.skipif(DEEP_GEMM_OK, reason="checks the CPU behaviour")
def test_deep_gemm_backend_reports_unavailable_on_this_machine():
    assert DEEP_GEMM_WHY
    with pytest.raises(registry.BackendUnavailable, match="fp8_einsum_wo_a/deep_gemm"):
        registry.get("fp8_einsum_wo_a", "deep_gemm")
    from dsv4lab.kernels.deep_gemm import fp8_einsum as dg

    o, pos, cs, wo_a = toy_operands()
    q, s = ref.inv_rope_fp8_quant(o, pos, cs)
    wq, ws = ref.quantize_wo_a(wo_a, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors"):   # refused before deep_gemm is imported
        dg.fp8_einsum_wo_a(q.view(16, 2, -1), s.view(16, 2, -1), wq, ws)


@pytest.mark.gpu
@pytest.mark.skipif(not DEEP_GEMM_OK, reason=f"deep_gemm backend unavailable: {DEEP_GEMM_WHY}")
@pytest.mark.parametrize("t,h,groups,o_l", [(64, 64, 8, 1024), (5, 128, 16, 1024)])   # Flash, Pro geometry
def test_deep_gemm_matches_the_reference_on_the_same_fp8_operands(t, h, groups, o_l):
    from dsv4lab.kernels.deep_gemm import fp8_einsum as dg
    from dsv4lab.kernels.triton.inv_rope_fp8_quant import inv_rope_fp8_quant

    o, pos, cs, wo_a = toy_operands(t=t, h=h, d=512, groups=groups, o_l=o_l, device="cuda")
    q, s = inv_rope_fp8_quant(o, pos, cs)
    a, sa = q.view(t, groups, -1), s.view(t, groups, -1)
    wq, ws = ref.quantize_wo_a(wo_a, groups)
    z_ref = ref.fp8_einsum_wo_a(a, sa, wq, ws).double()
    z = dg.fp8_einsum_wo_a(a, sa, wq, ws).double()
    # same operands: only the accumulation (tensor-core fp8 MMA, fp32 promotion per 128-K block) and the bf16
    # rounding differ -> at most ~1 bf16 ulp apart, plus an absolute slack for sums that cancel to near 0
    slack = 2 * BF16_HALF_ULP_REL * z_ref.abs() + 2.0 ** -12 * z_ref.pow(2).mean().sqrt()
    assert bool(((z - z_ref).abs() <= slack).all())
    assert calc_diff(z, z_ref) < 1e-5
