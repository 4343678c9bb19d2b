"""DecoderLayer: vLLM's fused wiring against the unfused one, the layer's parts, and bad input.

vLLM wiring == unfused wiring is asserted BITWISE: with the reference ops the fused post+pre is post followed by
pre on the rounded residual, and the pre's fused RMSNorm is RMSNorm of the rounded collapse -- the very ops
the unfused path runs. (A fused kernel that, like sglang's, takes the sum of squares from the fp32 collapse is
not bitwise; its tolerance is set by its own test, not here.)
"""
from __future__ import annotations

import pytest
import torch

from dsv4lab.config import get_config
from dsv4lab.kernels.reference.mhc import mhc_post, mhc_pre
from dsv4lab.kernels.reference.norms import rmsnorm
from dsv4lab.layers.decoder import DecoderLayer

CFG = get_config("toy")
T = 40          # > sliding_window (32) so the window clips; the compressed layers are exercised in test_model
N, D = CFG.hc_mult, CFG.hidden_size


@pytest.fixture(scope="module")
def layers() -> dict[int, DecoderLayer]:
    return {i: DecoderLayer(CFG, i, seed=7) for i in (0, 3)}   # 0: window + hash MoE; 3: CSA + bias MoE


def streams() -> torch.Tensor:
    return (torch.randn(T, N, D) * torch.linspace(0.5, 2.0, N)[:, None]).bfloat16()


def test_first_layer_vllm_equals_unfused_bitwise(layers) -> None:
    layer, r = layers[0], streams()
    pos, ids = torch.arange(T), torch.randint(0, CFG.vocab_size, (T,))
    with torch.no_grad():
        f, res, post, comb = layer(pos, r, input_ids=ids, wiring="vllm")
        fused = layer.hc_ffn.post(f, res, post, comb)
        unfused = layer(pos, r, input_ids=ids, wiring="unfused")
    assert fused.shape == (T, N, D) and fused.dtype == torch.bfloat16
    assert torch.equal(fused, unfused)
    assert not torch.equal(fused, r)   # the layer did something


def test_later_layer_vllm_equals_unfused_bitwise(layers) -> None:
    # A later layer receives (f_prev, residual, post, comb) and starts with the fused post+pre; the unfused
    # path applies the previous post explicitly first.
    layer, r = layers[3], streams()
    pos = torch.arange(T)
    f_prev = torch.randn(T, D).bfloat16()
    _, post, comb = mhc_pre(r, *_random_mix_params(), None)
    with torch.no_grad():
        f, res, post2, comb2 = layer(pos, f_prev, r, post, comb, wiring="vllm")
        fused = layer.hc_ffn.post(f, res, post2, comb2)
        unfused = layer(pos, mhc_post(f_prev, r, post, comb), wiring="unfused")
    assert torch.equal(fused, unfused)


def _random_mix_params():
    n = N
    return (torch.randn((2 + n) * n, n * D) * (0.5 / (n * D) ** 0.5), 0.5 + torch.rand(3),
            torch.randn((2 + n) * n) * 0.3)


def test_layer_is_composed_of_its_parts(layers) -> None:
    # Rebuild the layer from the reference ops and the layer's own submodules (DS-ref Block.forward order).
    layer, r = layers[0], streams()
    pos, ids = torch.arange(T), torch.randint(0, CFG.vocab_size, (T,))
    hc = dict(rms_eps=CFG.rms_norm_eps, hc_eps=CFG.hc_eps, post_mult=2.0, sinkhorn_iters=CFG.hc_sinkhorn_iters)
    with torch.no_grad():
        a = layer.hc_attn
        x, post, comb = mhc_pre(r, a.fn, a.scale, a.base, None, **hc)
        r1 = mhc_post(layer.attn(rmsnorm(x, layer.attn_norm.weight, CFG.rms_norm_eps), pos), r, post, comb)
        b = layer.hc_ffn
        x, post, comb = mhc_pre(r1, b.fn, b.scale, b.base, None, **hc)
        want = mhc_post(layer.ffn(rmsnorm(x, layer.ffn_norm.weight, CFG.rms_norm_eps), ids), r1, post, comb)
        got = layer(pos, r, input_ids=ids, wiring="unfused")
    assert torch.equal(got, want)


def test_layer_kinds() -> None:
    mtp_idx = CFG.num_hidden_layers
    layer = DecoderLayer(CFG, mtp_idx, seed=1)
    assert layer.attn.ratio == CFG.compress_ratio(mtp_idx) == 0    # MTP block: window only
    assert not layer.ffn.hash_layer                                  # and never hash-routed
    assert layer.hc_attn.fn.shape == (CFG.hc_mix_dim, N * D) and layer.hc_attn.fn.dtype == torch.float32
    assert layer.attn_norm.weight.dtype == torch.bfloat16


def test_bad_input(layers) -> None:
    layer, r = layers[0], streams()
    pos = torch.arange(T)
    with pytest.raises(ValueError, match="input_ids"):      # layer 0 is hash-routed
        layer(pos, r, wiring="unfused")
    with pytest.raises(ValueError, match="wiring"):
        layer(pos, r, wiring="fused")
    with pytest.raises(ValueError, match="residual"):
        layer(pos, r, r, wiring="unfused")
    with pytest.raises(ValueError, match="post"):
        layer(pos, r[:, 0], r, wiring="vllm")
    with pytest.raises(ValueError, match="residual"):
        layer(pos, r[:, :2], input_ids=torch.zeros(T, dtype=torch.int64))
