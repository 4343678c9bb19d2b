"""TileLang mHC kernels: they compile to sm_90a cubin (nvcc + tilelang present, no GPU needed) with the
intended instructions, and every launcher rejects bad input with a clear error before any compile or launch.

The kernels cannot run on a CPU: their numerics are checked on the H100 by bench/pr43905_mhc_direct.py.
"""
import shutil

import pytest
import torch

from dsv4lab.kernels.tilelang import _mhc_common as common
from dsv4lab.kernels.tilelang import hc_head as tl_head
from dsv4lab.kernels.tilelang import mhc_fused_post_pre as tl_fused
from dsv4lab.kernels.tilelang import mhc_post as tl_post
from dsv4lab.kernels.tilelang import mhc_pre as tl_pre

D_TOY = 256   # toy preset hidden size; every kernel is compiled for it (compile cost is shape-independent)
ARCH = "sm_90a"


def _have_tilelang() -> bool:
    try:
        import tilelang  # noqa: F401
    except Exception:
        return False
    return True


needs_compiler = pytest.mark.skipif(
    not (_have_tilelang() and shutil.which("nvcc")),
    reason="needs tilelang (pip install tilelang==0.1.15) and nvcc on PATH to compile for sm_90a")


# ---- compilation --------------------------------------------------------------------------------------------
@needs_compiler
def test_prenorm_gemm_uses_bf16_wgmma_with_tma() -> None:
    src = tl_pre.prenorm_gemm_kernel(4 * D_TOY, 24, ARCH).get_kernel_source()
    # 3 bf16 terms x 24 mixes = 72 columns, padded to one m64n80k16 wgmma with an fp32 accumulator
    assert "wgmma_ss<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32, 64, 80, 16" in src
    assert "tma_load" in src
    assert "__float22bfloat162_rn" in src  # the hi/mid/lo split rounds to nearest


@needs_compiler
def test_prenorm_gemm_128_token_tile() -> None:
    """The default's GEMM from T = 4096 on: 128-token TMA tiles, still m64n80k16 wgmmas (two per K step)."""
    src = tl_pre.prenorm_gemm_kernel(4 * D_TOY, 24, ARCH, block_tokens=128).get_kernel_source()
    assert "kFloat32, 64, 80, 16" in src and "tma_load" in src
    assert "((int)blockIdx.y) * 128)" in src and "((int)blockIdx.y) * 64)" not in src


@needs_compiler
def test_head_gemm_uses_n16_wgmma() -> None:
    src = tl_pre.prenorm_gemm_kernel(4 * D_TOY, 4, ARCH).get_kernel_source()
    assert "kFloat32, 64, 16, 16" in src


@needs_compiler
def test_fused_gemm_writes_new_residual_and_uses_wgmma() -> None:
    src = tl_fused.post_prenorm_gemm_kernel(D_TOY, ARCH).get_kernel_source()
    assert "kFloat32, 64, 80, 16" in src
    assert "new_residual[" in src or "new_residual +" in src
    assert src.count("tma_load(") >= 3   # f, residual and fn tiles


@needs_compiler
def test_epilogues_and_post_compile() -> None:
    pre = tl_pre.pre_epilogue_kernel(D_TOY, ARCH, "bfloat16", 1e-6, 1e-6, 2.0, 20).get_kernel_source()
    assert "expf" in pre and "rsqrtf" in pre
    assert "__expf" not in pre          # no fast-math: the mixes must match the fp32 reference to ~1e-6
    no_norm = tl_pre.pre_epilogue_kernel(D_TOY, ARCH, None, 1e-6, 1e-6, 2.0, 20).get_kernel_source()
    assert "norm_weight[" not in no_norm.split("__global__")[-1]
    head = tl_head.head_epilogue_kernel(D_TOY, ARCH, 1e-6, 1e-6).get_kernel_source()
    assert "expf" in head
    post = tl_post.post_kernel(D_TOY, ARCH).get_kernel_source()
    assert "uint4" in post              # 16-byte vector loads of the residual


@needs_compiler
def test_epilogue_designs_compile() -> None:
    """v2 (default) sums every split of a (token, mix) element in one thread: a loop over n_splits with no
    barrier inside; v1 (first H100 run) keeps its per-token block reduction (more barriers)."""
    v2 = tl_pre.pre_epilogue_kernel(D_TOY, ARCH, "bfloat16", 1e-6, 1e-6, 2.0, 20, "v2").get_kernel_source()
    v1 = tl_pre.pre_epilogue_kernel(D_TOY, ARCH, "bfloat16", 1e-6, 1e-6, 2.0, 20, "v1").get_kernel_source()
    assert v2.count("for (int s = 0; s < n_splits; ++s)") == 1
    assert v1.count("__syncthreads") > v2.count("__syncthreads")
    head = tl_head.head_epilogue_kernel(D_TOY, ARCH, 1e-6, 1e-6, "v2").get_kernel_source()
    assert "for (int s = 0; s < n_splits; ++s)" in head


def test_unknown_epilogue_design_rejected() -> None:
    pytest.importorskip("tilelang")
    with pytest.raises(ValueError, match="design"):
        tl_pre.pre_epilogue_func(D_TOY, None, 1e-6, 1e-6, 2.0, 20, "v9")
    with pytest.raises(ValueError, match="design"):
        tl_head.head_epilogue_func(D_TOY, 1e-6, 1e-6, "v3")


# ---- launch heuristics (pure Python) ------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 3, 64, 65, 1000, 4096, 16384])
@pytest.mark.parametrize("n_chunks", [256, 448])   # Flash nD/64, Pro nD/64
@pytest.mark.parametrize("tile", [64, 128])
def test_split_k_divides_and_is_bounded(tokens: int, n_chunks: int, tile: int) -> None:
    s = common.split_k(tokens, n_chunks, sms=132, max_splits=tl_pre.MAX_SPLITS, block_tokens=tile)
    assert 1 <= s <= tl_pre.MAX_SPLITS and n_chunks % s == 0
    assert n_chunks // s >= common.TUNING["gemm_min_chunks"]
    tiles = -(-tokens // tile)
    if tiles >= 132:
        assert s == 1   # enough token tiles to fill the GPU: no split-K partials to reduce
    else:   # fewer tiles: split-K brings the block count up to about one per SM (never beyond it)
        assert tiles * s <= 132 * common.TUNING["blocks_per_sm"]


def test_default_tuning_is_the_h100_winner() -> None:
    """The launcher default since the 42be99d H100 run: two_pass, the v3 epilogue at every split count, the 24-mix
    GEMM with 128-token tiles from gemm_bt128_min_tokens (4096) on and 64 below; hc_head's 4-mix GEMM stays 64."""
    assert common.TUNING["design"] == "two_pass" and common.TUNING["overlap_epilogue"] is True
    assert {tl_pre.pre_epilogue_design(s) for s in (1, 4, 32)} == {"v3"}
    threshold = common.TUNING["gemm_bt128_min_tokens"]
    assert threshold == 4096
    for t in (1, 16, 256, 1024, threshold - 1):
        assert common.gemm_block_tokens(t, 24) == 64
    for t in (threshold, 16384):
        assert common.gemm_block_tokens(t, 24) == 128
        assert common.gemm_block_tokens(t, 4) == 64


def test_gemm_block_tokens_forced_and_rejected(monkeypatch) -> None:
    monkeypatch.setitem(common.TUNING, "gemm_block_tokens", 128)
    assert common.gemm_block_tokens(1, 24) == 128 and common.gemm_block_tokens(1, 4) == 128
    assert common.chunk_tokens(4096) % 128 == 0
    monkeypatch.setitem(common.TUNING, "gemm_block_tokens", 96)
    with pytest.raises(ValueError, match="gemm_block_tokens"):
        common.gemm_block_tokens(1, 24)


@pytest.mark.parametrize("tokens", [1, 7, 1024, 16384, 10**6])
def test_tokens_per_block_bounded(tokens: int) -> None:
    tpb = common.tokens_per_block(tokens, sms=132)
    assert 1 <= tpb <= common.TUNING["tokens_per_block_max"] <= tl_pre.MAX_TOKENS_PER_BLOCK


# ---- input contracts (CPU tensors; nothing may compile or launch) -------------------------------------------
@pytest.fixture
def no_compile(monkeypatch):
    """Any attempt to compile (and hence launch) during a contract test fails it."""
    def boom(*a, **k):
        raise AssertionError("a kernel was compiled before the input check failed")
    monkeypatch.setattr(common, "compile_kernel", boom)


def _pre_args(t: int = 3, d: int = D_TOY):
    n = 4
    residual = torch.randn(t, n, d).to(torch.bfloat16)
    fn = torch.randn(24, n * d) / (n * d) ** 0.5
    return residual, fn, torch.ones(3), torch.zeros(24), torch.ones(d, dtype=torch.bfloat16)


def _post_args(t: int = 3, d: int = D_TOY):
    return (torch.randn(t, d).to(torch.bfloat16), torch.randn(t, 4, d).to(torch.bfloat16),
            torch.rand(t, 4) * 2, torch.softmax(torch.randn(t, 4, 4), -1))


@pytest.mark.usefixtures("no_compile")
def test_cpu_tensors_rejected_before_launch() -> None:
    residual, fn, scale, base, w = _pre_args()
    with pytest.raises(ValueError, match="residual: expected a CUDA tensor"):
        tl_pre.mhc_pre(residual, fn, scale, base, w)
    with pytest.raises(ValueError, match="CUDA tensor"):
        tl_post.mhc_post(*_post_args())
    with pytest.raises(ValueError, match="CUDA tensor"):
        tl_fused.mhc_fused_post_pre(*_post_args(), fn, scale, base, w)
    with pytest.raises(ValueError, match="residual: expected a CUDA tensor"):
        tl_head.hc_head(residual, torch.randn(4, 4 * D_TOY), torch.ones(1), torch.zeros(4))


@pytest.mark.usefixtures("no_compile")
@pytest.mark.parametrize("case, exc, match", [
    ("residual_fp32", TypeError, "residual: expected dtype"),
    ("three_streams", ValueError, "residual: expected hc_mult = 4"),
    ("d_not_multiple", ValueError, "residual: expected D a positive multiple of 256"),
    ("fn_shape", ValueError, r"fn: expected shape \(24, 1024\)"),
    ("fn_bf16", TypeError, "fn: expected dtype"),
    ("scale_shape", ValueError, "scale: expected shape"),
    ("base_shape", ValueError, "base: expected shape"),
    ("norm_weight_shape", ValueError, "norm_weight: expected shape"),
    ("norm_weight_int", TypeError, "norm_weight: expected dtype"),
    ("rms_eps", ValueError, "rms_eps: expected a positive float"),
    ("iters", ValueError, "sinkhorn_iters: expected a positive int"),
    ("noncontiguous", ValueError, "residual: expected a contiguous tensor"),
    ("misaligned", ValueError, "fn: expected a 16-byte aligned data pointer"),
])
def test_mhc_pre_contract(case: str, exc: type, match: str) -> None:
    residual, fn, scale, base, w = _pre_args()
    kw = {}
    if case == "residual_fp32":
        residual = residual.float()
    elif case == "three_streams":
        residual = residual[:, :3].contiguous()
    elif case == "d_not_multiple":
        residual = torch.randn(3, 4, 200).to(torch.bfloat16)
    elif case == "fn_shape":
        fn = fn[:, :-64].contiguous()
    elif case == "fn_bf16":
        fn = fn.to(torch.bfloat16)
    elif case == "scale_shape":
        scale = torch.ones(2)
    elif case == "base_shape":
        base = torch.zeros(16)
    elif case == "norm_weight_shape":
        w = torch.ones(D_TOY + 1, dtype=torch.bfloat16)
    elif case == "norm_weight_int":
        w = torch.ones(D_TOY, dtype=torch.int32)
    elif case == "rms_eps":
        kw["rms_eps"] = 0.0
    elif case == "iters":
        kw["sinkhorn_iters"] = 0
    elif case == "noncontiguous":
        residual = torch.randn(4, 3, D_TOY).to(torch.bfloat16).transpose(0, 1)
    elif case == "misaligned":
        fn = torch.randn(24 * 4 * D_TOY + 1)[1:].view(24, 4 * D_TOY)   # 4-byte offset
    with pytest.raises(exc, match=match):
        tl_pre.mhc_pre(residual, fn, scale, base, w, **kw)


@pytest.mark.usefixtures("no_compile")
@pytest.mark.parametrize("case, exc, match", [
    ("f_fp32", TypeError, "f: expected dtype"),
    ("f_tokens", ValueError, r"f: expected shape \(3, 256\)"),
    ("post_shape", ValueError, r"post: expected shape \(3, 4\)"),
    ("comb_dtype", TypeError, "comb: expected dtype"),
    ("comb_shape", ValueError, r"comb: expected shape \(3, 4, 4\)"),
    ("devices", ValueError, "different devices"),
])
def test_mhc_post_and_fused_contract(case: str, exc: type, match: str) -> None:
    f, residual, post, comb = _post_args()
    if case == "f_fp32":
        f = f.float()
    elif case == "f_tokens":
        f = f[:2]
    elif case == "post_shape":
        post = post[:, :3]
    elif case == "comb_dtype":
        comb = comb.double()
    elif case == "comb_shape":
        comb = comb[:, :, :3]
    elif case == "devices":
        post = post.to("meta")
    with pytest.raises(exc, match=match):
        tl_post.mhc_post(f, residual, post, comb)
    _, fn, scale, base, w = _pre_args()
    with pytest.raises(exc, match=match):
        tl_fused.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)


@pytest.mark.usefixtures("no_compile")
def test_fused_checks_the_pre_half_too() -> None:
    f, residual, post, comb = _post_args()
    _, fn, scale, base, w = _pre_args()
    with pytest.raises(ValueError, match="post_mult: expected a positive float"):
        tl_fused.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w, post_mult=-2.0)
    with pytest.raises(ValueError, match="fn: expected shape"):
        tl_fused.mhc_fused_post_pre(f, residual, post, comb, fn[:4].contiguous(), scale, base, w)


@pytest.mark.usefixtures("no_compile")
@pytest.mark.parametrize("case, exc, match", [
    ("fn_rows", ValueError, r"fn: expected shape \(4, 1024\)"),
    ("scale_shape", ValueError, r"scale: expected shape \(1,\)"),
    ("hc_eps", ValueError, "hc_eps: expected a positive float"),
])
def test_hc_head_contract(case: str, exc: type, match: str) -> None:
    residual = torch.randn(3, 4, D_TOY).to(torch.bfloat16)
    fn, scale, base, kw = torch.randn(4, 4 * D_TOY), torch.ones(1), torch.zeros(4), {}
    if case == "fn_rows":
        fn = torch.randn(24, 4 * D_TOY)
    elif case == "scale_shape":
        scale = torch.ones(3)
    elif case == "hc_eps":
        kw["hc_eps"] = -1e-6
    with pytest.raises(exc, match=match):
        tl_head.hc_head(residual, fn, scale, base, **kw)


@pytest.mark.usefixtures("no_compile")
def test_hc_head_into_checks_out() -> None:
    residual = torch.randn(3, 4, D_TOY).to(torch.bfloat16)
    args = (residual, torch.randn(4, 4 * D_TOY), torch.ones(1), torch.zeros(4))
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 256\)"):
        tl_head.hc_head_into(*args, torch.empty(2, D_TOY, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out: expected dtype"):
        tl_head.hc_head_into(*args, torch.empty(3, D_TOY))
    with pytest.raises(ValueError, match="residual: expected a CUDA tensor"):
        tl_head.hc_head_into(*args, torch.empty(3, D_TOY, dtype=torch.bfloat16))


# ---- launcher plumbing on a CPU, with each kernel replaced by a torch emulation of its job ---------------------
# The emulators are called exactly as the compiled kernels would be (positional arguments). ``Emulated`` first
# checks every argument against the prim_func's declared buffers: count, dtype, static dims, and one consistent
# value per dynamic dim (num_tokens, n_splits) -- so a launcher passing a wrong view, order or split count fails.
@pytest.fixture
def emulated(monkeypatch):
    """Launchers run on CPU tensors with emulated kernels (prim_funcs are still built: needs tilelang)."""
    pytest.importorskip("tilelang")
    from _mhc_emulation import install

    install(monkeypatch.setattr)


def _close(got, want, rel_bf16: float = 2 ** -6, rel_f32: float = 1e-5) -> None:
    """bf16 outputs elementwise within ``rel_bf16`` of the larger magnitude: the emulated split-K sums run in
    another order than x @ fn.T, so the pre weights differ in their last fp32 bits; that can flip the bf16
    rounding of the collapse (<= 2^-7 relative) and the RMSNorm output rounds once more (<= 2^-8); where the
    collapse cancels to near 0 the pre-weight difference itself (~1e-6 of |R|) shows, hence an absolute floor
    of ``rel_f32`` x the largest entry. fp32 mixes within ``rel_f32`` of the largest entry."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if not got.numel():
        return
    g, w = got.double(), want.double()
    if got.dtype == torch.bfloat16:
        floor = rel_f32 * float(w.abs().max())
        excess = (g - w).abs() - rel_bf16 * torch.maximum(g.abs(), w.abs()) - floor
        assert float(excess.max()) <= 0, f"worst excess {float(excess.max()):.3g} at {int(excess.argmax())}"
    else:
        err = float((g - w).abs().max())
        assert err <= rel_f32 * float(w.abs().max()), f"max abs err {err:.3g}"


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("tokens", [0, 1, 5, 70])
@pytest.mark.parametrize("with_norm", [True, False])
def test_launchers_match_reference_with_emulated_kernels(tokens: int, with_norm: bool) -> None:
    from dsv4lab.kernels.reference import mhc as ref

    residual, fn, scale, base, w = _pre_args(tokens)
    w = w if with_norm else None
    f, _, post, comb = _post_args(tokens)
    for got, want in zip(tl_pre.mhc_pre(residual, fn, scale, base, w), ref.mhc_pre(residual, fn, scale, base, w)):
        _close(got, want)
    assert torch.equal(tl_post.mhc_post(f, residual, post, comb), ref.mhc_post(f, residual, post, comb))
    got = tl_fused.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)
    for g, want in zip(got, ref.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)):
        _close(g, want)
    head_fn, head_scale, head_base = torch.randn(4, 4 * D_TOY) / (4 * D_TOY) ** 0.5, torch.ones(1), torch.zeros(4)
    _close(tl_head.hc_head(residual, head_fn, head_scale, head_base),
           ref.hc_head(residual, head_fn, head_scale, head_base))
    out = torch.full((tokens, D_TOY), float("nan"), dtype=torch.bfloat16)
    tl_head.hc_head_into(residual, head_fn, head_scale, head_base, out)
    _close(out, ref.hc_head(residual, head_fn, head_scale, head_base))


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("tokens", [5, 4096])
def test_default_path_tiles_and_epilogue(monkeypatch, tokens: int) -> None:
    """The default path end to end on emulated kernels: mhc_pre and the fused op build their 24-mix GEMM with the
    tile of ``gemm_block_tokens`` (128 at T = 4096, 64 at T = 5) and launch only the v3 epilogue; hc_head's GEMM
    keeps 64 and its own epilogue; results match the reference."""
    from dsv4lab.kernels.reference import mhc as ref

    builds, epilogues = [], []
    gemm, epi = tl_pre.prenorm_gemm_kernel, tl_pre.pre_epilogue_kernel
    monkeypatch.setattr(tl_pre, "prenorm_gemm_kernel", lambda nd, n_mix, arch, block_tokens=64, **kw: (
        builds.append((n_mix, block_tokens)) or gemm(nd, n_mix, arch, block_tokens=block_tokens, **kw)))
    monkeypatch.setattr(tl_pre, "pre_epilogue_kernel", lambda *a: epilogues.append(a[-1]) or epi(*a))
    residual, fn, scale, base, w = _pre_args(tokens)
    f, _, post, comb = _post_args(tokens)
    for got, want in zip(tl_pre.mhc_pre(residual, fn, scale, base, w), ref.mhc_pre(residual, fn, scale, base, w)):
        _close(got, want)
    got = tl_fused.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)
    for g, want in zip(got, ref.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)):
        _close(g, want)
    head_fn = torch.randn(4, 4 * D_TOY) / (4 * D_TOY) ** 0.5
    _close(tl_head.hc_head(residual, head_fn, torch.ones(1), torch.zeros(4)),
           ref.hc_head(residual, head_fn, torch.ones(1), torch.zeros(4)))
    tile = 128 if tokens >= 4096 else 64
    assert builds == [(24, tile), (24, tile), (4, 64)]
    assert epilogues == ["v3", "v3"]


@pytest.mark.usefixtures("emulated")
def test_launchers_pro_width_single_token() -> None:
    """D = 7168 (Pro): 448 K-chunks, so the split count must divide 448 (not a power of two)."""
    from dsv4lab.kernels.reference import mhc as ref

    residual, fn, scale, base, w = _pre_args(1, d=7168)
    for got, want in zip(tl_pre.mhc_pre(residual, fn, scale, base, w), ref.mhc_pre(residual, fn, scale, base, w)):
        _close(got, want)


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize("fused", ["post_then_pre", "v1"])
@pytest.mark.parametrize("epilogue", ["v2", "v1"])
def test_fused_and_epilogue_designs_match_reference(monkeypatch, fused: str, epilogue: str) -> None:
    """Both fused designs and both epilogue designs launch with valid arguments; the default fused design's new
    residual IS mhc_post's (bitwise), the contract the v1 kernel only met to a bf16 ulp."""
    from dsv4lab.kernels.reference import mhc as ref

    monkeypatch.setitem(common.TUNING, "fused", fused)
    monkeypatch.setitem(common.TUNING, "epilogue", epilogue)
    monkeypatch.setitem(common.TUNING, "overlap_epilogue", False)   # the v1 / v2 epilogues (default: v3)
    residual, fn, scale, base, w = _pre_args(37)
    f, _, post, comb = _post_args(37)
    got = tl_fused.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)
    for g, want in zip(got, ref.mhc_fused_post_pre(f, residual, post, comb, fn, scale, base, w)):
        _close(g, want)
    if fused == "post_then_pre":
        assert torch.equal(got[0], tl_post.mhc_post(f, residual, post, comb))


@pytest.mark.parametrize("splits,want", [(1, "v2"), (4, "v2"), (5, "v1"), (32, "v1")])
def test_auto_epilogue_design_keeps_v1_for_many_splits(monkeypatch, splits: int, want: str) -> None:
    """v2 loops over the splits one dependent load at a time: "auto" uses it only where splits are few."""
    monkeypatch.setitem(common.TUNING, "epilogue", "auto")
    monkeypatch.setitem(common.TUNING, "v2_max_splits", 4)
    assert tl_pre.epilogue_design(splits) == want
    monkeypatch.setitem(common.TUNING, "epilogue", "v2")
    assert tl_pre.epilogue_design(splits) == "v2"
