"""Triton fused_mtp_input_rmsnorm (vLLM #43746) against an fp64 oracle, the references, and its input contract.

Under the Triton interpreter (no GPU) fp32 -> bf16 casts truncate instead of rounding to nearest, so bf16
results are compared with a derived 1-ulp (one rounding) or 3-ulp (two roundings) tolerance; fp32 results
must match the fp64 oracle to a few fp32 ulps. Masked rows must be exactly zero everywhere.
"""
import inspect

import pytest
import torch

from dsv4lab.kernels.reference import mtp as ref
from dsv4lab.kernels.reference.norms import rmsnorm, rmsnorm_two_round
from dsv4lab.kernels.triton import mtp_norm
from dsv4lab.kernels.triton.mtp_norm import fused_mtp_input_rmsnorm

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x| (x in fp32/fp64): 2^(exponent - mantissa bits), floored at fp16's
    subnormal spacing so that exact zeros get a tiny, not a zero, tolerance only where both sides are zero."""
    _, exp = torch.frexp(x.double().abs())  # |x| = m * 2^exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1 - MANTISSA_BITS[dtype]).clamp_min(2.0 ** -24)


def make_inputs(T, n, D, dtype, device, prev_3d=False, seed=0):
    """Unit-RMS embeddings, residual streams with per-stream scales over two decades, norm weights ~ 1 + N(0, 0.2^2)
    (RMSNorm weights are initialised at 1), positions with zeros at index 0 and every 5th token."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(T, D, generator=g)
    scale = torch.exp(torch.empty(T, n, 1).uniform_(-2.3, 2.3, generator=g))
    prev = torch.randn(T, n, D, generator=g) * scale
    positions = torch.randint(1, 4096, (T,), generator=g)
    positions[::5] = 0
    enorm_w = 1 + 0.2 * torch.randn(D, generator=g)
    hnorm_w = 1 + 0.2 * torch.randn(D, generator=g)
    prev = prev if prev_3d else prev.reshape(T, n * D)
    return [t.to(device) for t in (embed.to(dtype), positions, prev.to(dtype), enorm_w.to(dtype), hnorm_w.to(dtype))]


def oracle64(embed, positions, prev, enorm_w, hnorm_w, eps):
    """The math in fp64, written independently of the package: mask, then x * rsqrt(mean(x^2) + eps) * w."""
    T, D = embed.shape
    x = torch.where((positions == 0)[:, None], torch.zeros((), dtype=torch.float64), embed.double())
    e = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * enorm_w.double()
    p = prev.double().reshape(T, -1, D)
    h = p * torch.rsqrt(p.square().mean(-1, keepdim=True) + eps) * hnorm_w.double()
    return e, h


def test_fp32_matches_fp64_oracle_to_a_few_ulps(device):
    T, n, D, eps = 7, 4, 96, 1e-6
    args = make_inputs(T, n, D, torch.float32, device)
    e64, h64 = oracle64(*args, eps)
    for two_rounding in (False, True):  # in fp32 both orders are the same two products
        e, h = fused_mtp_input_rmsnorm(*args, eps, two_rounding=two_rounding)
        # relative error budget per element, in fp32 ulps (2^-24 relative each): sum of squares over D terms in a
        # tree/pairwise order ~log2(D)/2, rsqrt <= 2 (GPU rsqrt.approx), two products 1 each -> 8 is "a few"
        for out, want in ((e, e64), (h, h64)):
            tol = 8 * ulp(want, torch.float32)
            assert ((out.double() - want).abs() <= tol).all(), (out.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_one_ulp_of_reference(device, dtype):
    T, n, D, eps = 6, 4, 128, 1e-6
    args = make_inputs(T, n, D, dtype, device, seed=1)
    embed, positions, prev, enorm_w, hnorm_w = args
    e, h = fused_mtp_input_rmsnorm(*args, eps)
    assert e.dtype == dtype and h.dtype == dtype and h.shape == (T, n, D)
    # independent single-rounding reference: explicit mask + norms.rmsnorm
    e_ref = rmsnorm(torch.where((positions == 0)[:, None], torch.zeros((), dtype=dtype, device=device), embed),
                    enorm_w, eps)
    h_ref = rmsnorm(prev.reshape(T, n, D), hnorm_w, eps)
    # the fp32 values before the final cast agree to a few fp32 ulps, so the casts differ by at most one ulp
    # of the output dtype (round-to-nearest near a tie on GPU; truncation vs rounding under the interpreter)
    for out, want in ((e, e_ref), (h, h_ref)):
        big = torch.maximum(out.double().abs(), want.double().abs())
        assert ((out.double() - want.double()).abs() <= ulp(big, dtype)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_error_at_most_twice_eager_error(device, dtype):
    """House bar: err(fused, oracle) <= 2 * err(eager two-rounding, oracle) in relative RMS."""
    T, n, D, eps = 8, 4, 256, 1e-6
    args = make_inputs(T, n, D, dtype, device, seed=2)
    e64, h64 = oracle64(*args, eps)
    e, h = fused_mtp_input_rmsnorm(*args, eps)
    e_eager, h_eager = ref.mtp_input_before_eager(*args, eps)

    def rel_rms(a, b):
        return ((a.double() - b).square().mean() / b.square().mean()).sqrt().item()

    for fused, eager, want in ((e, e_eager, e64), (h, h_eager, h64)):
        assert rel_rms(fused, want) <= 2 * rel_rms(eager, want) + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_rounding_tracks_the_eager_sequence(device, dtype):
    """two_rounding=True computes round(round(x*r) * w): within 3 output ulps of vLLM's eager op sequence
    (bitwise on a GPU up to rare rsqrt/reduction-order ties; under the interpreter both casts truncate:
    |w| * ulp(normalised) < 2 ulp(out) from the first cast, + 1 ulp from the second)."""
    T, n, D, eps = 6, 4, 64, 1e-6
    args = make_inputs(T, n, D, dtype, device, seed=3)
    e, h = fused_mtp_input_rmsnorm(*args, eps, two_rounding=True)
    e_eager, h_eager = ref.mtp_input_before_eager(*args, eps)
    n_ulps = 3 if dtype != torch.float32 else 8  # fp32: the reduction-order budget of the fp32 oracle test
    for out, want in ((e, e_eager), (h, h_eager)):
        big = torch.maximum(out.double().abs(), want.double().abs())
        assert ((out.double() - want.double()).abs() <= n_ulps * ulp(big, dtype)).all()
    # the two rounding modes are different computations: in bf16 some elements must differ
    if dtype == torch.bfloat16:
        e1, h1 = fused_mtp_input_rmsnorm(*args, eps)
        assert not torch.equal(h1, h)


def test_masked_rows_exactly_zero_even_for_nonfinite_embeddings(device):
    T, n, D = 10, 2, 48
    embed, positions, prev, enorm_w, hnorm_w = make_inputs(T, n, D, torch.bfloat16, device, seed=4)
    masked = positions == 0
    assert masked.any() and (~masked).any()
    embed[masked] = float("inf")  # the mask replaces the input, so even inf/nan rows give zeros
    embed[masked.nonzero()[-1, 0], 0] = float("nan")
    for two_rounding in (False, True):
        e, h = fused_mtp_input_rmsnorm(embed, positions, prev, enorm_w, hnorm_w, 1e-6, two_rounding=two_rounding)
        assert (e[masked] == 0).all()
        assert torch.isfinite(e[~masked]).all() and (e[~masked] != 0).any(dim=-1).all()
        assert torch.isfinite(h).all()


def test_every_output_element_is_written(device, monkeypatch):
    """Poison the output allocations with NaN: any unwritten element would survive as NaN."""
    T, n, D = 5, 3, 40
    args = make_inputs(T, n, D, torch.float32, device, seed=5)
    real_empty = torch.empty

    def poisoned_empty(*size, **kw):
        return real_empty(*size, **kw).fill_(float("nan"))

    monkeypatch.setattr(mtp_norm.torch, "empty", poisoned_empty)
    e, h = fused_mtp_input_rmsnorm(*args)
    monkeypatch.undo()
    assert torch.isfinite(e).all() and torch.isfinite(h).all()


def test_2d_and_3d_prev_layouts_agree_and_hc_mult_is_inferred(device):
    T, D = 4, 32
    for n in (1, 4):
        a2 = make_inputs(T, n, D, torch.float16, device, prev_3d=False, seed=6)
        a3 = make_inputs(T, n, D, torch.float16, device, prev_3d=True, seed=6)
        e2, h2 = fused_mtp_input_rmsnorm(*a2)
        e3, h3 = fused_mtp_input_rmsnorm(*a3)
        assert h2.shape == (T, n, D) and torch.equal(h2, h3) and torch.equal(e2, e3)


def test_chunked_long_row_path_matches_single_block(device, monkeypatch):
    """Rows longer than MAX_BLOCK loop over chunks; force it with a small block and a D that is not a multiple."""
    T, n, D = 3, 2, 100
    args = make_inputs(T, n, D, torch.float32, device, seed=7)
    e1, h1 = fused_mtp_input_rmsnorm(*args)
    monkeypatch.setattr(mtp_norm, "MAX_BLOCK", 32)
    monkeypatch.setattr(mtp_norm, "CHUNK_BLOCK", 32)
    assert mtp_norm.launch_config(D)[:2] == (32, 4)
    e2, h2 = fused_mtp_input_rmsnorm(*args)
    e64, h64 = oracle64(*args, 1e-6)
    for out, want in ((e1, e64), (h1, h64), (e2, e64), (h2, h64)):
        assert ((out.double() - want).abs() <= 8 * ulp(want, torch.float32)).all()
    assert (e2[args[1] == 0] == 0).all()


def test_mixed_weight_dtype_and_int32_positions(device):
    """fp32 norm weights with bf16 activations: one rounding uses float(w), like norms.rmsnorm."""
    T, n, D = 5, 2, 64
    embed, positions, prev, enorm_w, hnorm_w = make_inputs(T, n, D, torch.bfloat16, device, seed=8)
    w32 = (1 + 0.2 * torch.randn(D)).to(device)
    e, h = fused_mtp_input_rmsnorm(embed, positions.int(), prev, w32, w32)
    e_ref = rmsnorm(torch.where((positions == 0)[:, None], torch.zeros((), dtype=embed.dtype, device=device),
                                embed), w32, 1e-6)
    h_ref = rmsnorm(prev.view(T, n, D), w32, 1e-6)
    for out, want in ((e, e_ref), (h, h_ref)):
        big = torch.maximum(out.double().abs(), want.double().abs())
        assert ((out.double() - want.double()).abs() <= ulp(big, torch.bfloat16)).all()
    # two roundings cast w to bf16 first (like rmsnorm_two_round); under the interpreter that cast truncates
    # too, adding |normalised| * ulp(w) < 2 ulp(out) to the 3-ulp budget of the two-rounding test
    e2, _ = fused_mtp_input_rmsnorm(embed, positions.int(), prev, w32, w32, two_rounding=True)
    want2 = rmsnorm_two_round(torch.where((positions == 0)[:, None], 0, embed), w32, 1e-6)
    big = torch.maximum(e2.double().abs(), want2.double().abs())
    assert ((e2.double() - want2.double()).abs() <= 5 * ulp(big, torch.bfloat16)).all()


def test_zero_tokens_returns_empty_outputs(device):
    embed, positions, prev, enorm_w, hnorm_w = make_inputs(0, 4, 16, torch.bfloat16, device)
    e, h = fused_mtp_input_rmsnorm(embed, positions, prev, enorm_w, hnorm_w)
    assert e.shape == (0, 16) and h.shape == (0, 4, 16) and e.dtype == h.dtype == torch.bfloat16


def test_same_signature_and_values_as_reference(device):
    assert inspect.signature(fused_mtp_input_rmsnorm).parameters.keys() == \
        inspect.signature(ref.mtp_input_rmsnorm).parameters.keys()
    args = make_inputs(4, 4, 64, torch.float32, device, seed=9)
    for two_rounding in (False, True):
        got = fused_mtp_input_rmsnorm(*args, two_rounding=two_rounding)
        want = ref.mtp_input_rmsnorm(*args, two_rounding=two_rounding)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert ((g.double() - w.double()).abs() <= 8 * ulp(w, torch.float32)).all()


def _with(i, value_of):
    return lambda a: a[:i] + [value_of(a[i])] + a[i + 1:]


BAD_INPUTS = [  # (description, mutate(args) -> args, expected exception, text the message must contain)
    ("embed 1-D", _with(0, lambda x: x[0]), ValueError, "embed"),
    ("embed fp64", _with(0, lambda x: x.double()), TypeError, "embed"),
    ("embed int", _with(0, lambda x: x.int()), TypeError, "embed"),
    ("embed not a tensor", _with(0, lambda x: x.tolist()), TypeError, "embed"),
    ("positions float", _with(1, lambda x: x.float()), TypeError, "positions"),
    ("positions wrong length", _with(1, lambda x: x[:-1]), ValueError, "positions"),
    ("prev not a multiple of D", _with(2, lambda x: x[:, :-1].contiguous()), ValueError, "prev"),
    ("prev 3-D wrong D", _with(2, lambda x: x.reshape(x.shape[0], -1, 8)), ValueError, "prev"),
    ("prev wrong T", _with(2, lambda x: x[:-1]), ValueError, "prev"),
    ("prev other dtype", _with(2, lambda x: x.float()), TypeError, "prev"),
    ("prev 4-D", _with(2, lambda x: x.reshape(x.shape[0], 1, -1, 16)), ValueError, "prev"),
    ("enorm_weight wrong length", _with(3, lambda x: x[:-1]), ValueError, "enorm_weight"),
    ("hnorm_weight int", _with(4, lambda x: x.int()), TypeError, "hnorm_weight"),
    ("embed non-contiguous", _with(0, lambda x: x.t().contiguous().t()), ValueError, "embed: expected a contiguous"),
    ("prev non-contiguous", _with(2, lambda x: x.t().contiguous().t()), ValueError, "prev: expected a contiguous"),
    ("eps zero", lambda a: a + [0.0], ValueError, "eps"),
    ("eps string", lambda a: a + ["1e-6"], TypeError, "eps"),
    ("weight on another device", _with(3, lambda x: torch.empty_like(x, device="meta")), ValueError, "device"),
]


@pytest.mark.parametrize("desc,mutate,exc,text", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_before_launch(device, monkeypatch, desc, mutate, exc, text):
    T, n, D = 4, 2, 16
    args = make_inputs(T, n, D, torch.bfloat16, device)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"kernel launched for bad input: {desc}")

    monkeypatch.setattr(mtp_norm, "_mtp_input_rmsnorm_kernel", NoLaunch())
    with pytest.raises(exc, match=text):
        fused_mtp_input_rmsnorm(*mutate(args))


def test_launch_policy_and_num_warps_override(device):
    """Small T gets more warps per row (latency-bound), large T the bandwidth setting; a forced num_warps
    changes only the launch, never the values; a bad num_warps is refused before any launch."""
    small, large = mtp_norm.launch_config(4096, 1), mtp_norm.launch_config(4096, 4096)
    assert small[:2] == large[:2] == (4096, 1)
    assert small[2] == 16 and large[2] == 8 and mtp_norm.launch_config(4096)[2] == 8
    args = make_inputs(3, 2, 64, torch.float32, device, seed=9)
    e1, h1 = fused_mtp_input_rmsnorm(*args)
    with mtp_norm.forced_launch(num_warps=4, stream_hints=True):
        e2, h2 = fused_mtp_input_rmsnorm(*args)
        assert mtp_norm._FORCED == {"num_warps": 4, "stream_hints": True}
    assert mtp_norm._FORCED == {"num_warps": None, "stream_hints": None}
    assert torch.equal(e1, e2) and torch.equal(h1, h2)
    for bad in (3, 0, 64, True, 4.0):
        with pytest.raises(ValueError, match="num_warps"):
            with mtp_norm.forced_launch(num_warps=bad):
                pass
    with pytest.raises(TypeError, match="stream_hints"):
        with mtp_norm.forced_launch(stream_hints=1):
            pass
