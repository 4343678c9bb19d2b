"""Issue #6 latency pieces of the TileLang mhc_pre (dsv4lab/kernels/tilelang/_mhc_overlap.py):

(1) the algorithm on a CPU: the "v3" epilogue's lane-parallel Sinkhorn (sums in index order, + eps, one division
    per entry) and the small_t projection's per-slice fp32 FMA partials, emulated step by step in fp32, meet the
    fp64 oracle's bars;
(2) the launchers with the opt-in designs (small_t, overlap_epilogue in two_pass / l2_chunked) on emulated kernels;
(3) with nvcc + tilelang: both kernels compile for sm_90a with the intended structure.
The kernels themselves run on the H100 (bench/pr43905_mhc_direct.py, design variants small_t / *_v3).
"""
import pytest
import torch
from test_mhc_onepass import _check_against_oracle, _close, _inputs, _oracle_pre64, _sinkhorn64
from test_tilelang_mhc_compile import needs_compiler

from dsv4lab.kernels.reference import mhc as ref
from dsv4lab.kernels.tilelang import _mhc_common as common

D = 1024
ARCH = "sm_90a"
SMALL_K = 128   # _mhc_overlap.SMALL_K (not imported: the module is TileLang-free to import, but keep this explicit)


# ---- (1) the algorithm ------------------------------------------------------------------------------------------
def lane_sinkhorn32(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """The v3 kernel's order in fp32: row softmax (max, exp, sum in k order, divide, + eps), then alternating
    column / row passes, each entry divided by ((((c0 + c1) + c2) + c3) + eps)."""
    c = logits.float()
    e = torch.exp(c - c.amax(-1, keepdim=True))
    s = ((e[..., 0] + e[..., 1]) + e[..., 2]) + e[..., 3]
    c = e / s.unsqueeze(-1) + eps
    for p in range(2 * iters - 1):
        if p % 2 == 0:
            s = ((((c[..., 0, :] + c[..., 1, :]) + c[..., 2, :]) + c[..., 3, :]) + eps).unsqueeze(-2)
        else:
            s = ((((c[..., 0] + c[..., 1]) + c[..., 2]) + c[..., 3]) + eps).unsqueeze(-1)
        c = c / s
    return c


@pytest.mark.parametrize("spread", [1.0, 8.0])   # realistic logits, and saturated ones (near one-hot rows)
def test_lane_sinkhorn_meets_the_mix_bar(spread: float) -> None:
    g = torch.Generator().manual_seed(11)
    logits = spread * torch.randn(64, 4, 4, generator=g)
    want = _sinkhorn64(logits.double())
    got = lane_sinkhorn32(logits)
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    # and it is not the identity of the input: columns sum to 1 within the eps terms
    assert float((got.double().sum(-2) - 1).abs().max()) < 1e-4


def test_small_t_partials_and_v3_order_meet_the_bars() -> None:
    """fp32 partials over 128-element K slices (x bf16 x fn fp32 products are exact in fp32), summed over the
    slices in 8 interleaved lanes then in lane order (the v3 reduction), then the reference math with the lane
    Sinkhorn: fp32 outputs within 1e-5 of the fp64 oracle, bf16 within 2x the eager reference's error."""
    c = _inputs(3, seed=5)
    r, fn, s, b, w = c["residual"], c["fn"], c["scale"], c["base"], c["norm_weight"]
    x = r.flatten(1).float()
    nd = x.shape[1]
    parts = torch.stack([torch.cat([x[:, k:k + SMALL_K] @ fn[:, k:k + SMALL_K].T,
                                    x[:, k:k + SMALL_K].pow(2).sum(-1, keepdim=True)], -1)
                         for k in range(0, nd, SMALL_K)])               # [S, T, 25]
    # thread (warp w, lane): running sum u over splits 32 r + 8 u + w, then the 4 sums in u order; then w order
    lanes = []
    for w0 in range(8):
        acc = parts[w0::32].sum(0)
        for u in range(1, 4):
            acc = acc + parts[8 * u + w0::32].sum(0)
        lanes.append(acc)
    mixes = lanes[0]
    for w0 in range(1, 8):
        mixes = mixes + lanes[w0]
    rho = torch.rsqrt(mixes[:, 24:] / nd + 1e-6)
    m = mixes[:, :24] * rho
    pre = 1.0 / (1.0 + torch.exp(-(m[:, :4] * s[0] + b[:4]))) + 1e-6
    post = 2.0 / (1.0 + torch.exp(-(m[:, 4:8] * s[1] + b[4:8])))
    comb = lane_sinkhorn32((m[:, 8:] * s[2] + b[8:]).view(-1, 4, 4))
    y = (((pre[:, 0:1] * r[:, 0].float() + pre[:, 1:2] * r[:, 1].float()) + pre[:, 2:3] * r[:, 2].float())
         + pre[:, 3:4] * r[:, 3].float()).bfloat16().float()
    out = (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) / D + 1e-6) * w.float()).bfloat16()
    _check_against_oracle((out, post, comb), ref.mhc_pre(r, fn, s, b, w), _oracle_pre64(r, fn, s, b, w),
                          ("layer_input", "post", "comb"))


# ---- (2) the launchers --------------------------------------------------------------------------------------------
def test_design_selection_small_t(monkeypatch) -> None:
    monkeypatch.setitem(common.TUNING, "design", "small_t")
    monkeypatch.setitem(common.TUNING, "small_t_max_tokens", 32)
    assert common.design_for(1, 4096) == "small_t" and common.design_for(32, 7168) == "small_t"
    assert common.design_for(33, 4096) == "two_pass"


@pytest.fixture
def emulated(monkeypatch):
    pytest.importorskip("tilelang")
    from _mhc_emulation import install

    install(monkeypatch.setattr)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("design, overlap, tokens", [("small_t", False, 1), ("small_t", False, 9),
                                                     ("two_pass", True, 5), ("l2_chunked", True, 70)])
def test_launchers_with_the_new_designs(monkeypatch, design: str, overlap: bool, tokens: int) -> None:
    """small_t (T = 9: two token tiles of 8) and the v3 epilogue under two_pass / l2_chunked (70 tokens = two
    64-token chunks) launch with the kernels' declared signatures and return the reference's results."""
    from dsv4lab.kernels.tilelang import mhc_fused_post_pre, mhc_pre

    monkeypatch.setitem(common.TUNING, "design", design)
    monkeypatch.setitem(common.TUNING, "overlap_epilogue", overlap)
    monkeypatch.setitem(common.TUNING, "l2_chunk_mb", 64 * 8 * D / 2 ** 20)
    calls = []
    real = mhc_pre.pre_epilogue_kernel
    monkeypatch.setattr(mhc_pre, "pre_epilogue_kernel", lambda *a: calls.append(a[-1]) or real(*a))
    c = _inputs(tokens, seed=7)
    r, fn, s, b, w = c["residual"], c["fn"], c["scale"], c["base"], c["norm_weight"]
    for got, want in zip(mhc_pre.mhc_pre(r, fn, s, b, w), ref.mhc_pre(r, fn, s, b, w)):
        _close(got, want)
    got = mhc_fused_post_pre.mhc_fused_post_pre(c["f"], r, c["post"], c["comb"], fn, s, b, w)
    for g, want in zip(got[1:], ref.mhc_pre(got[0], fn, s, b, w)):
        _close(g, want)
    assert calls and set(calls) == {"v3"}   # every pre epilogue launched was the overlap one


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "pr43905_mhc_direct.py"
    spec = importlib.util.spec_from_file_location("_bench_pr43905", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_labels_keep_their_meaning() -> None:
    """The bench's DEFAULT_VARIANT is what the launchers run; "two_pass" still reproduces the default before the
    42be99d H100 run (v1/v2 epilogue, 64-token GEMM tile at every T), so its records stay comparable across runs."""
    from dsv4lab.kernels.tilelang import mhc_pre

    bench = _bench()
    assert bench.default_design() == bench.DEFAULT_VARIANT == list(bench.VARIANTS)[0]
    with bench.tuning(**bench.VARIANTS["two_pass"]):
        assert bench.default_design() == "two_pass"
        assert mhc_pre.pre_epilogue_design(1) in ("v1", "v2") and mhc_pre.pre_epilogue_design(32) in ("v1", "v2")
        assert common.gemm_block_tokens(16384, 24) == 64
    with bench.tuning(**bench.VARIANTS["two_pass_v3"]):
        assert common.gemm_block_tokens(16384, 24) == 64 and mhc_pre.pre_epilogue_design(8) == "v3"
    assert bench.default_design() == bench.DEFAULT_VARIANT   # tuning() restored the TUNING
    # the default's launches equal two_pass_v3's below 4096 tokens and two_pass_v3_bt128's from there on
    for t, twin in ((1024, "two_pass_v3"), (4096, "two_pass_v3_bt128")):
        keys = []
        for name in (bench.DEFAULT_VARIANT, twin, "two_pass"):
            with bench.tuning(**bench.VARIANTS[name]):
                keys.append(bench.launch_key(4096, t))
        assert keys[0] == keys[1] != keys[2]
    assert bench.parse_designs("two_pass_v3_auto,two_pass,tile_kernels") == (["two_pass_v3_auto", "two_pass"], True)
    assert bench.parse_designs(None) == (list(bench.VARIANTS), True)
    with pytest.raises(ValueError, match="designs"):
        bench.parse_designs("two_pass,bogus")


# ---- (3) compilation for sm_90a -----------------------------------------------------------------------------------
@needs_compiler
@pytest.mark.parametrize("norm", ["bfloat16", None])
def test_overlap_epilogue_compiles_with_lane_sinkhorn(norm) -> None:
    """One CTA of 256 threads per token; Sinkhorn through warp shuffles with one division per pass (no
    reciprocal-multiply), accurate expf; 16-byte residual loads; exactly 3 block barriers."""
    from dsv4lab.kernels.tilelang import _mhc_overlap as overlap

    src = common.compile_kernel(overlap.overlap_epilogue_func(D, norm, 1e-6, 1e-6, 2.0, 20), ARCH).get_kernel_source()
    body = src[src.index("__launch_bounds__"):]
    assert "__launch_bounds__(256" in body
    assert body.count("__shfl_sync") >= 16 and "__shfl_xor_sync" in body
    assert "for (int p = 0; p < 39; ++p)" in body
    assert "expf" in body and "__expf" not in body
    assert body.count("__syncthreads()") == 3
    assert "*(uint4*)(residual +" in body
    assert ("norm_weight" in body.split("__syncthreads()")[-1]) == (norm is not None)


@needs_compiler
def test_small_proj_compiles_with_padded_fn_tile() -> None:
    from dsv4lab.kernels.tilelang import _mhc_overlap as overlap

    src = overlap.small_proj_kernel(4 * D, 24, ARCH).get_kernel_source()
    body = src[src.index("__launch_bounds__"):]
    assert "__launch_bounds__(256" in body
    assert "* 129)" in body            # fn rows padded to 129 words: conflict-free column reads
    assert "for (int k = 0; k < 128; ++k)" in body
    with pytest.raises(ValueError, match="nd"):
        overlap.small_proj_func(4 * D + 64, 24)
