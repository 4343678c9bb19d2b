"""fp8 e4m3 / fp4 e2m1 / UE8M0 formats against brute-force references built in this file."""
import math

import pytest
import torch

from dsv4lab import quant

# Every finite positive e4m3 value, from the bit patterns (independent of quant.py's arithmetic).
_ALL_E4M3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0x7f is NaN
E4M3_POS = _ALL_E4M3[_ALL_E4M3 >= 0]
E2M1_POS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def nearest_even(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Brute force: nearest grid point by |difference|, ties to the grid point with even index (mantissa lsb 0)."""
    a = values.abs().double()[:, None]
    g = grid.double()[None, :]
    d = (a - g).abs()
    dmin = d.min(dim=1, keepdim=True).values
    cand = d == dmin
    even = (torch.arange(grid.numel()) % 2 == 0)[None, :]
    pick = torch.where(cand & even, 2, torch.where(cand, 1, 0)).argmax(dim=1)
    return grid[pick] * values.sign()


def test_ue8m0_bytes_roundtrip():
    b = torch.arange(0, 255, dtype=torch.uint8)
    f = quant.ue8m0_to_float(b)
    assert torch.equal(f.double(), torch.pow(2.0, b.double() - 127))
    assert torch.equal(quant.float_to_ue8m0(f[1:]), b[1:])
    assert torch.isnan(quant.ue8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()
    if quant.HAS_E8M0_DTYPE:
        assert torch.equal(quant.ue8m0_to_float(b.view(torch.float8_e8m0fnu)), f)
    with pytest.raises(ValueError, match="scale"):
        quant.float_to_ue8m0(torch.tensor([3.0]))


def test_pow2_scale_is_ceil_log2_exact():
    amax = torch.tensor([448.0, 448.0 * 2, 449.0, 1.0, 447.99, 1e-9])
    s = quant.pow2_scale(amax, 448.0, 1e-4)
    expected = [2.0 ** math.ceil(math.log2(max(a, 1e-4) / 448.0)) for a in amax.tolist()]
    assert s.tolist() == expected
    # clamp of the exponent to the UE8M0 byte range [1, 254]
    assert quant.pow2_scale(torch.tensor([1e-40]), 448.0, 0.0).item() == 2.0 ** -126


@pytest.mark.parametrize("block", [128, (1, 64), (128, 128)])
def test_fp8_exact_roundtrip_of_representable_values(block):
    g = torch.Generator().manual_seed(1)
    shape = (256, 256)
    codes = E4M3_POS[torch.randint(0, E4M3_POS.numel(), shape, generator=g)]
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x = codes * sign
    x[:, ::64] = 448.0  # every block (rows x >=64 cols) holds an exact 448 -> amax 448 -> scale 1
    x = x * 2.0 ** -5       # ... then scale 2^-5
    q, s = quant.quant_fp8(x, block)
    assert torch.all(s == 2.0 ** -5)
    assert torch.equal(quant.dequant_fp8(q, s, block), x)


def test_fp8_rounds_to_nearest_even_like_brute_force():
    g = torch.Generator().manual_seed(2)
    v = torch.rand(4096, generator=g, dtype=torch.float64) * 447.0
    mids = (E4M3_POS[1:] + E4M3_POS[:-1]) / 2  # exact ties
    v = torch.cat([v, mids.double(), -mids.double()]).float()
    x = torch.cat([v, torch.full((128 - v.numel() % 128,), 448.0)])  # pad; block amax 448 -> scale 1
    q, s = quant.quant_fp8(x, block=x.numel())
    assert s.item() == 1.0
    assert torch.equal(q.float()[: v.numel()], nearest_even(v, E4M3_POS).float())


def test_fp8_dequant_error_within_half_ulp_times_scale():
    x = torch.randn(64, 512, dtype=torch.float32) * 3
    q, s = quant.quant_fp8(x, 128)
    deq = quant.dequant_fp8(q, s, 128)
    scale = s.repeat_interleave(128, dim=-1)
    a = (x / scale).abs()
    # e4m3: normal spacing 2^(floor(log2 a) - 3); subnormal spacing 2^-9 below 2^-6.
    ulp = torch.where(a >= 2.0 ** -6, torch.exp2(torch.floor(torch.log2(a.clamp(min=2.0 ** -6))) - 3), torch.tensor(2.0 ** -9))
    assert torch.all((x - deq).abs() <= 0.5 * ulp * scale * (1 + 1e-6))


def test_fp8_rounding_is_unbiased():
    n = 200_000
    g = torch.Generator().manual_seed(3)
    # values in [1, 2): e4m3 spacing 1/8; uniform positions within a spacing cell
    x = 1 + torch.rand(n, generator=g) * 0.875
    x = torch.cat([x, torch.tensor([448.0] * 128)])[: (n // 128 + 1) * 128]
    q, s = quant.quant_fp8(x, block=x.numel())
    xq = q.float() * s
    moved = xq[:n] - x[:n]
    frac_down = (moved < 0).double().mean().item()
    assert abs(frac_down - 0.5) < 10 / math.sqrt(n)


def test_fp8_amax_floor_on_zero_block_and_fp32_scale_variant():
    x = torch.zeros(2, 128)
    x[1] = torch.linspace(-3, 3, 128)
    q, s = quant.quant_fp8(x, 128)
    assert s[0].item() == 2.0 ** math.ceil(math.log2(1e-4 / 448))
    assert torch.all(q[0].float() == 0)
    q2, s2 = quant.quant_fp8(x, 128, pow2=False)
    assert torch.allclose(s2[1], torch.tensor(3.0 / 448))
    assert q2[1].float().abs().max().item() == 448.0


def test_fp4_pack_low_nibble_first_and_roundtrip_codes():
    codes = torch.tensor([1, 2, 15, 0, 8, 7], dtype=torch.uint8)
    packed = quant.pack_fp4(codes)
    assert packed.tolist() == [0x21, 0x0F, 0x78]
    assert torch.equal(quant.unpack_fp4(packed), codes)
    assert torch.equal(quant.unpack_fp4(packed.view(torch.int8)), codes)


def test_fp4_rounds_to_nearest_even_and_exact_roundtrip():
    mids = (E2M1_POS[1:] + E2M1_POS[:-1]) / 2
    vals = torch.cat([E2M1_POS, mids, torch.rand(1000) * 6])
    vals = torch.cat([vals, -vals])
    enc = quant.e2m1_decode(quant.e2m1_encode(vals))
    assert torch.equal(enc, nearest_even(vals, E2M1_POS).float())
    # block quant: a block with amax 6 * 2^3 gets scale 2^3 and representable values come back exactly
    x = E2M1_POS[torch.randint(0, 8, (4, 64))] * 8.0
    x[:, ::32] = 48.0
    p, s = quant.quant_fp4(x, 32)
    assert torch.all(quant.ue8m0_to_float(s) == 8.0)
    assert torch.equal(quant.dequant_fp4(p, s, 32), x)


def test_fp4_dequant_error_within_half_ulp_times_scale():
    x = torch.randn(32, 256)
    p, s = quant.quant_fp4(x, 32)
    deq = quant.dequant_fp4(p, s, 32)
    scale = quant.ue8m0_to_float(s).repeat_interleave(32, dim=-1)
    a = (x / scale).abs()
    ulp = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    assert torch.all((x - deq).abs() <= 0.5 * ulp * scale * (1 + 1e-6))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="x"):
        quant.quant_fp8(torch.randn(3, 100), 128)
    with pytest.raises(TypeError, match="x"):
        quant.quant_fp8(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="q"):
        quant.dequant_fp8(torch.randn(4, 128), torch.ones(4, 1))
    q, s = quant.quant_fp8(torch.randn(4, 256))
    with pytest.raises(ValueError, match="scale"):
        quant.dequant_fp8(q, s[:, :1])
    with pytest.raises(TypeError, match="packed"):
        quant.unpack_fp4(torch.ones(4, dtype=torch.float32))
