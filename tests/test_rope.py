"""RoPE / YaRN tables against their closed forms, and rotation properties."""
import math

import torch

from dsv4lab import rope
from dsv4lab.config import get_config


def closed_form_inv_freq(base, dim=64):
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def test_plain_table_equals_closed_form():
    got = rope.base_inv_freq(64, 10000.0)
    assert torch.allclose(got.double(), torch.tensor(closed_form_inv_freq(10000.0), dtype=torch.float64), rtol=1e-7)


def test_yarn_table_for_compressed_layers():
    cfg = get_config("flash")
    got = rope.layer_inv_freq(cfg, 2).double()  # a CSA layer
    base = closed_form_inv_freq(160000.0)
    low, high = 15, 25  # dsv4-layers.md 3.3 for base 160000
    assert rope.yarn_correction_range(64, 160000.0, cfg.rope_scaling) == (low, high)
    for i in range(32):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want = base[i] / 16 * ramp + base[i] * (1 - ramp)
        assert math.isclose(got[i].item(), want, rel_tol=1e-6), i
    assert torch.allclose(got[:16], torch.tensor(base[:16], dtype=torch.float64), rtol=1e-6)   # unchanged
    assert torch.allclose(got[25:], torch.tensor(base[25:], dtype=torch.float64) / 16, rtol=1e-6)  # / 16
    # window-only layers: plain base 10000
    assert torch.allclose(rope.layer_inv_freq(cfg, 0).double(), torch.tensor(closed_form_inv_freq(10000.0), dtype=torch.float64), rtol=1e-6)


def test_inverse_after_forward_is_identity_and_nope_untouched():
    x = torch.randn(50, 3, 128)
    pos = torch.randint(0, 100000, (50,))
    inv = rope.yarn_inv_freq(64, 160000.0, get_config("toy").rope_scaling)
    y = rope.apply_rope(x, pos, inv)
    assert torch.equal(y[..., :64], x[..., :64])
    back = rope.apply_rope(y, pos, inv, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)
    pair_norm = lambda t: t[..., 64:].reshape(50, 3, 32, 2).norm(dim=-1)
    assert torch.allclose(pair_norm(y), pair_norm(x), atol=1e-5)


def test_known_rotation_gptj_interleaved():
    x = torch.zeros(1, 4)
    x[0, 0] = 1.0  # pair 0 = (x0, x1) = (1, 0)
    inv = torch.tensor([1.0, 0.5])
    y = rope.apply_rope(x, torch.tensor([1]), inv)
    assert torch.allclose(y[0], torch.tensor([math.cos(1), math.sin(1), 0.0, 0.0]))
    assert torch.equal(rope.apply_rope(x, torch.tensor([0]), inv), x)


def test_bad_inputs():
    import pytest
    inv = rope.base_inv_freq(64, 10000.0)
    with pytest.raises(TypeError, match="positions"):
        rope.apply_rope(torch.randn(4, 64), torch.zeros(4), inv)
    with pytest.raises(ValueError, match="positions"):
        rope.apply_rope(torch.randn(4, 64), torch.zeros(5, dtype=torch.long), inv)
    with pytest.raises(ValueError, match="x"):
        rope.apply_rope(torch.randn(4, 32), torch.zeros(4, dtype=torch.long), inv)
