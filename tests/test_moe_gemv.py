"""Decode GEMV path of the Hopper MoE (triton/moe_gemv.py) under the Triton interpreter: each stage against an fp64
oracle of the same fp8 recipe, end to end against the grouped path (emulated DeepGEMM GEMM), the reference MoE and
the fp64 oracle; routing with shared experts across tokens, experts with no token, bad ids; the input contract.

Tolerance, and why it is not bitwise by construction: both paths quantise x the same way (quant_fp8), requantise h
with the same Triton function (swiglu_fp8_rows) and reduce with the same combine kernel; only the fp32 summation order
inside the two GEMMs differs (here: numpy's per-128-block dot + sequential block adds vs torch's one K-long matmul;
on the GPU: an fp16 tensor-core dot vs DeepGEMM's fp8 tensor cores). Products e4m3 x e4m3 x pow2 scales are exact in
fp32, so a GEMM output differs from the exactly rounded one by at most

    |out - bf16(exact)| <= ulp_bf16(exact) + gamma * sum_i |p_i|,    gamma = n u / (1 - n u), u = 2^-24,

with n the additions on the longest path (<= K). A 1-ulp change of a gate/up value changes h by <= ~2^-8 relative and
flips its e4m3 code only when h sits that close to a rounding midpoint (probability ~2^-5 per changed value), and a
block scale only when amax crosses 448 * 2^e. The end-to-end bound used below, |y - y_grouped| <= 2^-6 max|y|, is a
few bf16 ulps at the top binade (one flipped h code moves an output by ~2^-3 |h_i| |w2| ~ 2^-7 of its size); a wrong
expert, row, scale or weight is O(max|y|). Observed under the interpreter: bitwise equal at every T tested.
"""
import math

import pytest
import torch

from dsv4lab.kernels.deep_gemm import grouped_moe as gm
from dsv4lab.kernels.reference.moe import moe_fp4
from dsv4lab.kernels.triton import moe_gemv as mg
from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant
from dsv4lab.lab.numerics import compare
from dsv4lab.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from test_grouped_moe import emulated_grouped_gemm, fp8_shared, oracle64, routing

D, I, E, K_TOP, L = 256, 256, 5, 2, 10.0
U = 2.0 ** -24
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU-interpreter tests; on the GPU bench/pr44367_megamoe.py checks this path")


def varied_mxfp4_experts(n_exp, d, inter, seed):
    """``mxfp4_experts`` with block scales that differ between w1 and w3 and between experts (w3 x 4, expert e x
    2^(e mod 3)): a scale read from the wrong block or expert changes the result by a power of two."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.arange(n_exp) % 3).float()[:, None, None]
    w1 = torch.randn(n_exp, inter, d, generator=g) / math.sqrt(d) * mag
    w3 = torch.randn(n_exp, inter, d, generator=g) / math.sqrt(d) * mag * 4
    w2 = torch.randn(n_exp, d, inter, generator=g) / math.sqrt(inter) / mag
    return (*quant_fp4(w1), *quant_fp4(w3), *quant_fp4(w2))


@pytest.fixture(scope="module")
def experts():
    w4 = varied_mxfp4_experts(E, D, I, seed=21)
    shared = fp8_shared(D, I, seed=22)
    return w4, shared, gm.prepare_experts(*w4, shared=shared)


def case(t: int):
    """Routing for T tokens: T=1 leaves 3 experts empty; T=3 has tokens sharing experts and experts 2, 4 empty;
    T=8 is random (16 slots over 5 experts: sharing is certain)."""
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(30 + t)).bfloat16()
    w, ids = routing(t, E, K_TOP, seed=40 + t)
    if t == 1:
        ids = torch.tensor([[3, 0]])
    elif t == 3:
        ids = torch.tensor([[0, 3], [3, 1], [1, 0]])
    return x, w, ids


def ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 at |v| (normal range): 2^(floor(log2 |v|) - 7)."""
    e = torch.floor(torch.log2(v.abs().double().clamp_min(2.0 ** -126)))
    return torch.exp2(e - 7)


def slot_groups(ids, ex):
    t = ids.shape[0]
    return torch.cat((ids.long(), torch.arange(ex.n_routed, ex.n_groups).expand(t, ex.n_shared_groups)), dim=1)


@pytest.mark.parametrize("t", [1, 3, 8])
def test_gemv_matches_grouped_path_reference_and_oracle(experts, t):
    w4, shared, ex = experts
    x, w, ids = case(t)
    yg = gm.experts_forward(x, w, ids, ex, swiglu_limit=L, layout="gemv")
    yc = gm.experts_forward(x, w, ids, ex, swiglu_limit=L, alignment=4, grouped_gemm=emulated_grouped_gemm)
    assert yg.dtype == torch.bfloat16 and yg.shape == (t, D) and torch.isfinite(yg.float()).all()
    diff = (yg.float() - yc.float()).abs()
    assert float(diff.max()) <= 2.0 ** -6 * float(yc.float().abs().max())          # module docstring
    assert float((diff == 0).float().mean()) >= 0.99                                # ulp-level, rare
    # the same quality as the grouped path against the fp64 oracle / fp32 reference (fp8 x and h dominate)
    ref = moe_fp4(x, w, ids, *w4, swiglu_limit=L, shared=shared)
    y64 = oracle64(x, w, ids, [dequant_fp4(w4[i], w4[i + 1]) for i in (0, 2, 4)], shared, L)
    c = compare(y64, ref, yg)
    assert c.rel_rms < 0.08 and c.eager_rel_rms < 0.01
    assert compare(y64, yc, yg).err_ratio <= 1.1


def test_stages_against_fp64_oracle_of_the_same_recipe(experts):
    """Stage 1: h rows == swiglu_quant(bf16(exact x_q W13^T)) (the grouped path's own kernel) up to rare one-code
    flips; stage 2: every output within ulp + gamma sum|p| of the exactly rounded GEMM of the kernel's own h."""
    _, _, ex = experts
    t = 8
    x, w, ids = case(t)
    x_q, x_sf = quant_fp8(x, 128)
    x32 = dequant_fp8(x_q, x_sf, 128).double()
    scratch = mg.gate_up_swiglu(x_q, x_sf, ids, ex.w13, ex.w13_sf, ex.n_routed, L)
    out = mg.down_proj(scratch, ids, ex.w2, ex.w2_sf, ex.n_routed)
    groups = slot_groups(ids, ex)
    rows = scratch.rows.long()
    # rows: one per (unit, token), token t at offset t; slots with the same expert share the unit (row // max_t),
    # slots with different experts never do
    assert rows.min() >= 0 and rows.unique().numel() == rows.numel()
    unit = rows // scratch.max_t
    assert torch.equal(rows % scratch.max_t, torch.arange(t)[:, None].expand_as(rows))
    for a in range(groups.numel()):
        for b in range(groups.numel()):
            assert (unit.flatten()[a] == unit.flatten()[b]) == (groups.flatten()[a] == groups.flatten()[b])
    w13 = [dequant_fp8(ex.w13[g], ex.w13_sf[g], (128, 128)).double() for g in range(ex.n_groups)]
    w2 = [dequant_fp8(ex.w2[g], ex.w2_sf[g], (128, 128)).double() for g in range(ex.n_groups)]
    gate_up = torch.stack([x32[ti] @ w13[int(groups[ti, j])].T for ti in range(t) for j in range(groups.shape[1])])
    h_ref, sf_ref = swiglu_quant(gate_up.float().bfloat16(), L)
    flat_rows = rows.flatten()
    h_got, sf_got = scratch.h_q[flat_rows], scratch.h_sf[flat_rows]
    assert float((sf_got == sf_ref).float().mean()) >= 0.99
    same_code = h_got.view(torch.uint8) == h_ref.view(torch.uint8)
    assert float(same_code.float().mean()) >= 0.99
    h_deq = dequant_fp8(h_got, sf_got, 128)
    assert torch.allclose(h_deq, dequant_fp8(h_ref, sf_ref, 128), rtol=2.0 ** -3, atol=float(sf_got.max()) * 2.0 ** -9)
    # stage 2 on the kernel's own h: exact GEMM in fp64, rigorous bound (n = 128 + I/128 additions per output)
    gamma = (128 + I // 128) * U / (1 - (128 + I // 128) * U)
    for n, (ti, j) in enumerate((a, b) for a in range(t) for b in range(groups.shape[1])):
        wg = w2[int(groups[ti, j])]
        exact = h_deq[n].double() @ wg.T
        bound = ulp_bf16(exact) + gamma * (h_deq[n].double().abs() @ wg.abs().T)
        got = out[flat_rows[n]].double()
        assert bool(((got - exact.float().bfloat16().double()).abs() <= bound).all()), (ti, j)
    # combine: the weighted fp32 slot-order sum of those rows
    y = mg.moe_gemv(x_q, x_sf, w, ids, ex.w13, ex.w13_sf, ex.w2, ex.w2_sf, n_routed=ex.n_routed, swiglu_limit=L)
    y_loop = torch.zeros(t, D)
    for ti in range(t):
        for j in range(groups.shape[1]):
            y_loop[ti] = y_loop[ti] + (w[ti, j] if j < K_TOP else torch.tensor(1.0)) * out[rows[ti, j]].float()
    assert torch.equal(y, y_loop.bfloat16())


def test_policy_switch_bad_ids_and_repeated_expert(experts):
    _, _, ex = experts
    x, w, ids = case(3)
    # on by default up to T = 8 (the H100 records), off with gemv_max_tokens = 0
    assert [gm.layout_for(n) for n in (0, 1, 8, 9)] == ["masked", "gemv", "gemv", "masked"]
    assert gm.layout_for(1, dict(gm.LAYOUT_POLICY, gemv_max_tokens=0)) == "masked"
    policy = dict(gm.LAYOUT_POLICY, gemv_max_tokens=8)
    assert [gm.layout_for(n, policy) for n in (0, 1, 8, 9)] == ["masked", "gemv", "gemv", "masked"]
    y_pol = gm.experts_forward(x, w, ids, ex, swiglu_limit=L, policy=policy)
    assert torch.equal(y_pol, gm.experts_forward(x, w, ids, ex, swiglu_limit=L, layout="gemv"))
    x_q, x_sf = quant_fp8(x, 128)
    args = (ex.w13, ex.w13_sf, ex.w2, ex.w2_sf)
    good = mg.moe_gemv(x_q, x_sf, w, ids, *args, n_routed=E, swiglu_limit=L)
    # an id outside [0, E): ValueError when validated; dropped (no contribution) when not
    bad = ids.clone()
    bad[1, 0] = E
    with pytest.raises(ValueError, match="ids"):
        mg.moe_gemv(x_q, x_sf, w, bad, *args, n_routed=E, swiglu_limit=L)
    w_drop = w.clone()
    w_drop[1, 0] = 0.0
    dropped = mg.moe_gemv(x_q, x_sf, w, bad, *args, n_routed=E, swiglu_limit=L, validate_ids=False)
    assert torch.equal(dropped, mg.moe_gemv(x_q, x_sf, w_drop, ids, *args, n_routed=E, swiglu_limit=L))
    # a token repeating an expert (outside the router's contract) still gets w0 * e(x) + w1 * e(x)
    rep = ids.clone()
    rep[0, 1] = rep[0, 0]
    y_rep = mg.moe_gemv(x_q, x_sf, w, rep, *args, n_routed=E, swiglu_limit=L)
    w_sum = w.clone()
    w_sum[0] = torch.tensor([w[0, 0] + w[0, 1], 0.0])
    y_sum = mg.moe_gemv(x_q, x_sf, w_sum, rep, *args, n_routed=E, swiglu_limit=L)
    assert torch.allclose(y_rep.float(), y_sum.float(), rtol=2.0 ** -7, atol=0) and torch.equal(y_rep[1:], good[1:])


def test_empty_and_input_contract(experts):
    _, _, ex = experts
    x, w, ids = case(3)
    x_q, x_sf = quant_fp8(x, 128)
    args = (ex.w13, ex.w13_sf, ex.w2, ex.w2_sf)
    kw = dict(n_routed=E, swiglu_limit=L)
    empty = mg.moe_gemv(x_q[:0], x_sf[:0], w[:0], ids[:0], *args, **kw)
    assert empty.shape == (0, D)
    bad_cases = [
        (TypeError, "x_q", (x_q.float(), x_sf, w, ids, *args), kw),
        (ValueError, "tokens", (quant_fp8(torch.randn(65, D), 128)[0], torch.ones(65, 2), torch.ones(65, 2),
                                torch.zeros(65, 2, dtype=torch.int64), *args), kw),
        (ValueError, "x_sf", (x_q, x_sf[:, :1].contiguous(), w, ids, *args), kw),
        (TypeError, "ids", (x_q, x_sf, w, ids.float(), *args), kw),
        (ValueError, "weights", (x_q, x_sf, w[:, :1].contiguous(), ids, *args), kw),
        (TypeError, "weights", (x_q, x_sf, w.double(), ids, *args), kw),
        (ValueError, "w13", (x_q, x_sf, w, ids, ex.w13[:, :128].contiguous(), *args[1:]), kw),
        (ValueError, "w2_sf", (x_q, x_sf, w, ids, *args[:3], ex.w2_sf[:, :1].contiguous()), kw),
        (ValueError, "contiguous", (x_q, x_sf, w, ids.t().contiguous().t(), *args), kw),
        (ValueError, "n_routed", (x_q, x_sf, w, ids, *args), dict(kw, n_routed=ex.n_groups + 1)),
        (ValueError, "swiglu_limit", (x_q, x_sf, w, ids, *args), dict(kw, swiglu_limit=0.0)),
    ]
    for err, match, a, k in bad_cases:
        with pytest.raises(err, match=match):
            mg.moe_gemv(*a, **k)
    assert math.isclose(mg.max_t_for(1), 16) and mg.max_t_for(17) == 32


@pytest.mark.parametrize("t", [1, 3])
def test_fused_x_quant_is_bitwise_the_quantised_path(experts, t):
    """GemvConfig(fuse_x_quant=True): the gate/up kernel quantises x itself with the same 1x128 pow2 e4m3 recipe,
    so with the same GEMM order the output equals quant_fp8 + moe_gemv bit for bit; x includes a block whose amax
    sits below the 1e-4 floor (scale from the floor) and one with amax exactly 448 * 2^-3 (a power-of-two ratio)."""
    _, _, ex = experts
    x, w, ids = case(t)
    x = x.clone()
    x[0, :128] = (x[0, :128].float() * 1e-6).bfloat16()
    x[-1, 128:256] = (x[-1, 128:256].float() / x[-1, 128:256].float().abs().max() * 56.0).bfloat16()
    args = (w, ids, ex.w13, ex.w13_sf, ex.w2, ex.w2_sf)
    kw = dict(n_routed=ex.n_routed, swiglu_limit=L)
    x_q, x_sf = quant_fp8(x, 128)
    plain = mg.moe_gemv(x_q, x_sf, *args, **kw)
    fused = mg.moe_gemv_x(x, *args, **kw)
    assert fused.dtype == x.dtype and torch.equal(fused, plain)
    assert torch.equal(mg.moe_gemv_x(x, *args, **kw, config=mg.GemvConfig()), plain)    # unfused route
    policy = dict(gm.LAYOUT_POLICY, gemv_max_tokens=8, gemv_config=mg.GemvConfig(fuse_x_quant=True))
    assert torch.equal(gm.experts_forward(x, w, ids, ex, swiglu_limit=L, policy=policy), plain)


@pytest.mark.parametrize("t", [1, 8])
def test_split_k_and_launch_configs_match_the_default(experts, t):
    """split_k=2 changes only the fp32 association of the gate/up sums (two partials added in split order): the
    result stays within the module's end-to-end bound of the unsplit kernel and agrees almost everywhere; block
    size / warps / stages change no arithmetic (each output column's sum is the same sequence), so bitwise."""
    _, _, ex = experts
    x, w, ids = case(t)
    x_q, x_sf = quant_fp8(x, 128)
    args = (x_q, x_sf, w, ids, ex.w13, ex.w13_sf, ex.w2, ex.w2_sf)
    kw = dict(n_routed=ex.n_routed, swiglu_limit=L)
    base = mg.moe_gemv(*args, **kw)
    split = mg.moe_gemv(*args, **kw, config=mg.GemvConfig(split_k=2))
    diff = (split.float() - base.float()).abs()
    assert float(diff.max()) <= 2.0 ** -6 * float(base.float().abs().max())
    assert float((diff == 0).float().mean()) >= 0.99
    cfg = mg.GemvConfig(gate_warps=8, gate_stages=2, down_block_n=32, down_warps=2, down_stages=3)
    assert torch.equal(mg.moe_gemv(*args, **kw, config=cfg), base)
    fused_split = mg.moe_gemv_x(x, w, ids, *args[4:], **kw, config=mg.GemvConfig(split_k=2, fuse_x_quant=True))
    assert torch.equal(fused_split, split)


def test_config_contract(experts):
    _, _, ex = experts
    x, w, ids = case(1)
    x_q, x_sf = quant_fp8(x, 128)
    args = (x_q, x_sf, w, ids, ex.w13, ex.w13_sf, ex.w2, ex.w2_sf)
    kw = dict(n_routed=ex.n_routed, swiglu_limit=L)
    for cfg, field in ((mg.GemvConfig(split_k=3), "split_k"), (mg.GemvConfig(split_k=0), "split_k"),
                       (mg.GemvConfig(down_block_n=48), "down_block_n"), (mg.GemvConfig(gate_warps=3), "gate_warps"),
                       (mg.GemvConfig(down_stages=0), "down_stages")):
        with pytest.raises(ValueError, match=f"config.{field}"):
            mg.moe_gemv(*args, **kw, config=cfg)
    with pytest.raises(TypeError, match="config"):
        mg.moe_gemv(*args, **kw, config={"split_k": 2})
    with pytest.raises(TypeError, match="x"):
        mg.moe_gemv_x(x_q, *args[2:], **kw)                      # moe_gemv_x takes the unquantised x
    assert mg.moe_gemv_x(x[:0], w[:0], ids[:0], *args[4:], **kw).shape == (0, D)


def test_policy_x_quant_triton_gives_the_same_bits(experts):
    """LAYOUT_POLICY['x_quant'] = 'triton' (act_quant_fp8, one launch) instead of quant_fp8: same x codes and scales,
    so the same output bits on the gemv and the contiguous (emulated GEMM) paths; the default is 'triton'."""
    _, _, ex = experts
    x, w, ids = case(3)
    assert gm.LAYOUT_POLICY["x_quant"] == "triton"
    tri = dict(gm.LAYOUT_POLICY, x_quant="triton")
    tor = dict(gm.LAYOUT_POLICY, x_quant="torch")
    for kw in (dict(layout="gemv"), dict(alignment=4, grouped_gemm=emulated_grouped_gemm)):
        base = gm.experts_forward(x, w, ids, ex, swiglu_limit=L, policy=tor, **kw)
        assert torch.equal(gm.experts_forward(x, w, ids, ex, swiglu_limit=L, policy=tri, **kw), base)
