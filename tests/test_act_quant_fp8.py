"""Triton activation quantisation (triton/act_quant_fp8.py) vs dsv4lab.quant.quant_fp8 (the torch composition, itself
checked against hand-computed cases in test_quant.py): bit-identical codes and scales for finite inputs across
binades (per-block magnitudes 2^-20 .. 2^20, blocks under the 1e-4 floor, amax exactly 448 * 2^e), NaN blocks as
quant_fp8 treats them; the input contract."""
import pytest
import torch

from dsv4lab.kernels.triton.act_quant_fp8 import act_quant_fp8
from dsv4lab.quant import quant_fp8

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter tests")


def varied(t, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    mag = torch.exp2(torch.randint(-20, 21, (t, d // 128), generator=g).float())
    x = x * mag.repeat_interleave(128, dim=1)
    x[0, :128] *= 1e-7                                             # amax below the floor: scale from 1e-4
    x[-1, 128:256] = x[-1, 128:256] / x[-1, 128:256].abs().max() * 56.0   # amax / 448 exactly 2^-3
    return x.to(dtype)


def as_bytes(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,d", [(1, 640), (5, 256)])
def test_bitwise_equal_to_quant_fp8(dtype, t, d):
    x = varied(t, d, dtype, seed=t * 7 + d)
    q, s = act_quant_fp8(x)
    q_ref, s_ref = quant_fp8(x, 128, pow2=True)
    assert q.shape == (t, d) and s.shape == (t, d // 128) and s.dtype == torch.float32
    assert torch.equal(as_bytes(q), as_bytes(q_ref)) and torch.equal(s, s_ref)
    # a strided row view (contiguous last axis) reads the right rows
    wide = torch.cat((x, x), dim=1)[:, d:]
    q2, s2 = act_quant_fp8(wide)
    assert torch.equal(as_bytes(q2), as_bytes(q_ref)) and torch.equal(s2, s_ref)


def test_nan_block_keeps_nan_and_contract():
    x = varied(2, 256, torch.float32, seed=3)
    x[1, 5] = float("nan")
    q, s = act_quant_fp8(x)
    q_ref, s_ref = quant_fp8(x, 128, pow2=True)
    assert torch.equal(s, s_ref) and float(s[1, 0]) == 1.0              # quant_fp8's NaN-block scale
    nan = torch.isnan(q.float())
    assert torch.equal(nan, torch.isnan(q_ref.float())) and int(nan.sum()) == 1 and bool(nan[1, 5])
    assert torch.equal(as_bytes(q)[~nan], as_bytes(q_ref)[~nan])
    q0, s0 = act_quant_fp8(x[:0])
    assert q0.shape == (0, 256) and s0.shape == (0, 2)
    with pytest.raises(ValueError, match="multiple of 128"):
        act_quant_fp8(torch.randn(2, 200))
    with pytest.raises(TypeError, match="x"):
        act_quant_fp8(torch.randn(2, 256).to(torch.float64))
    with pytest.raises(ValueError, match="last axis"):
        act_quant_fp8(torch.randn(256, 2).T)
