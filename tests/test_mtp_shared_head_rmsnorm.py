"""Triton mtp_shared_head_rmsnorm (vLLM #43746) against an fp64 oracle, the references, and its input contract.

Tolerances as in test_mtp_input_rmsnorm.py: few fp32 ulps for fp32, 1 output ulp (one rounding) or 3 output ulps
(two roundings) in bf16/fp16, because interpreter casts truncate.
"""
import inspect

import pytest
import torch

from dsv4lab.kernels.reference import mtp as ref
from dsv4lab.kernels.reference.norms import rmsnorm
from dsv4lab.kernels.triton import mtp_norm
from dsv4lab.kernels.triton.mtp_norm import mtp_shared_head_rmsnorm

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x|: 2^(exponent - mantissa bits), floored at 2^-24 (see the input-norm test)."""
    _, exp = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1 - MANTISSA_BITS[dtype]).clamp_min(2.0 ** -24)


def make_inputs(T, D, dtype, device, seed=0):
    """hc_head output rows with per-token scales over two decades; norm weight ~ 1 + N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g) * torch.exp(torch.empty(T, 1).uniform_(-2.3, 2.3, generator=g))
    w = 1 + 0.2 * torch.randn(D, generator=g)
    return h.to(dtype).to(device), w.to(dtype).to(device)


def oracle64(h, w, eps):
    x = h.double()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.double()


def test_fp32_matches_fp64_oracle(device):
    h, w = make_inputs(9, 80, torch.float32, device)
    want = oracle64(h, w, 1e-6)
    for two_rounding in (False, True):
        out = mtp_shared_head_rmsnorm(h, w, 1e-6, two_rounding=two_rounding)
        # budget per element in fp32 ulps: reduction order ~log2(D)/2 + rsqrt <= 2 + two products
        assert ((out.double() - want).abs() <= 8 * ulp(want, torch.float32)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(device, dtype):
    h, w = make_inputs(7, 192, dtype, device, seed=1)
    out = mtp_shared_head_rmsnorm(h, w)
    want = rmsnorm(h, w, 1e-6)
    big = torch.maximum(out.double().abs(), want.double().abs())
    assert out.dtype == dtype and ((out.double() - want.double()).abs() <= ulp(big, dtype)).all()
    out2 = mtp_shared_head_rmsnorm(h, w, two_rounding=True)
    want2 = ref.mtp_shared_head_rmsnorm(h, w, 1e-6, two_rounding=True)
    big = torch.maximum(out2.double().abs(), want2.double().abs())
    assert ((out2.double() - want2.double()).abs() <= 3 * ulp(big, dtype)).all()


def test_same_signature_as_reference():
    assert inspect.signature(mtp_shared_head_rmsnorm).parameters.keys() == \
        inspect.signature(ref.mtp_shared_head_rmsnorm).parameters.keys()


def test_chunked_path_and_zero_tokens(device, monkeypatch):
    h, w = make_inputs(4, 70, torch.float32, device, seed=2)
    monkeypatch.setattr(mtp_norm, "MAX_BLOCK", 16)
    monkeypatch.setattr(mtp_norm, "CHUNK_BLOCK", 16)
    out = mtp_shared_head_rmsnorm(h, w)
    want = oracle64(h, w, 1e-6)
    assert ((out.double() - want).abs() <= 8 * ulp(want, torch.float32)).all()
    empty = mtp_shared_head_rmsnorm(h[:0], w)
    assert empty.shape == (0, 70) and empty.dtype == torch.float32


def test_every_output_element_is_written(device, monkeypatch):
    h, w = make_inputs(3, 50, torch.bfloat16, device, seed=3)
    real_empty = torch.empty
    monkeypatch.setattr(mtp_norm.torch, "empty", lambda *s, **k: real_empty(*s, **k).fill_(float("nan")))
    out = mtp_shared_head_rmsnorm(h, w)
    monkeypatch.undo()
    assert torch.isfinite(out).all()


BAD_INPUTS = [  # (description, (h, w) -> args, exception, message text)
    ("h 3-D", lambda h, w: (h[None], w), ValueError, "h"),
    ("h fp64", lambda h, w: (h.double(), w), TypeError, "h"),
    ("h non-contiguous", lambda h, w: (h.t().contiguous().t(), w), ValueError, "h: expected a contiguous"),
    ("weight wrong length", lambda h, w: (h, w[1:]), ValueError, "weight"),
    ("weight int", lambda h, w: (h, w.int()), TypeError, "weight"),
    ("weight on another device", lambda h, w: (h, torch.empty_like(w, device="meta")), ValueError, "device"),
    ("eps negative", lambda h, w: (h, w, -1e-6), ValueError, "eps"),
]


@pytest.mark.parametrize("desc,mutate,exc,text", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_before_launch(device, monkeypatch, desc, mutate, exc, text):
    h, w = make_inputs(4, 16, torch.bfloat16, device)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"kernel launched for bad input: {desc}")

    monkeypatch.setattr(mtp_norm, "_shared_head_rmsnorm_kernel", NoLaunch())
    with pytest.raises(exc, match=text):
        mtp_shared_head_rmsnorm(*mutate(h, w))


def test_num_warps_override_keeps_values(device):
    torch.manual_seed(10)
    h = torch.randn(4, 96, device=device)
    w = 1 + 0.1 * torch.randn(96, device=device)
    plain = mtp_shared_head_rmsnorm(h, w)
    with mtp_norm.forced_launch(num_warps=2, stream_hints=True):
        assert torch.equal(plain, mtp_shared_head_rmsnorm(h, w))
