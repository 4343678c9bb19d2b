"""KV compressor reference (dsv4-layers.md 3.4) against a float64 per-block loop and its visibility rules."""
from __future__ import annotations

import pytest
import torch

from _attn_oracles import assert_within, bf16_ulp, compress_oracle, rope64, unit_rms, weight
from dsv4lab import get_config
from dsv4lab.kernels import registry
from dsv4lab.kernels.reference.compressor import compress
from dsv4lab.quant import fp8_roundtrip
from dsv4lab.rope import layer_inv_freq

CFG = get_config("toy")
D = CFG.hidden_size
INV = layer_inv_freq(CFG, 1)              # compressed layers: theta 160000 + YaRN
# fp32 accumulation noise on unit-RMS data (K = 256 products of O(1) terms: ~1e-6), far below a bf16 ulp of
# O(1) values; this absolute floor only matters for entries that happen to be near 0.
ABS_FLOOR = 1e-5


def make(ratio: int, T: int, hd: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = 2 if ratio == 4 else 1
    x = unit_rms((T, D), g)
    wkv, wgate = weight(c * hd, D, g), weight(c * hd, D, g)
    ape = 0.5 * torch.randn(ratio, c * hd, generator=g)                    # visible next to O(1) scores
    norm_w = (1 + 0.1 * torch.randn(hd, generator=g)).to(torch.bfloat16)
    return x, wkv, wgate, ape, norm_w


@pytest.mark.parametrize("ratio,T,hd", [(4, 4 * 9 + 3, 128), (128, 128 * 2 + 5, 128), (4, 20, 512)])
def test_pooling_matches_block_loop_fp64(ratio, T, hd):
    x, wkv, wgate, ape, nw = make(ratio, T, hd)
    y = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=hd)
    assert y.dtype == torch.bfloat16 and y.shape == (T // ratio, hd)
    ref = compress_oracle(x, wkv, wgate, ape, nw, ratio, INV, hd)
    # one rounding fp32 -> bf16 of a value carrying fp32 noise: at most one bf16 ulp away from the fp64 value
    assert_within(y, ref, bf16_ulp(ref) + ABS_FLOOR, "compressed entries")


@pytest.mark.parametrize("ratio", [4, 128])
def test_only_complete_blocks_produce_entries(ratio):
    x, wkv, wgate, ape, nw = make(ratio, 2 * ratio + 3)
    full = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=128)
    for T in (0, ratio - 1, ratio, 2 * ratio - 1, 2 * ratio, 2 * ratio + 3):
        y = compress(x[:T], wkv, wgate, ape, nw, ratio, INV, head_dim=128)
        assert y.shape == (T // ratio, 128)
        assert torch.equal(y, full[: T // ratio]), f"T={T}: entries depend on tokens after their block"


@pytest.mark.parametrize("ratio,T", [(4, 24), (128, 256)])
def test_entry_changes_exactly_with_its_tokens(ratio, T):
    """Entry i reads tokens [i*r, (i+1)*r) (ratio 4: also block i-1, first half); so it is complete, and
    visible, from token i*r + r - 1 on. Perturbing one token changes exactly those entries."""
    x, wkv, wgate, ape, nw = make(ratio, T)
    base = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=128)
    n = T // ratio
    probes = [0, ratio - 1, ratio, 2 * ratio - 1] + ([4 * 3 + 2, T - 1] if ratio == 4 else [T - 1])
    for s in probes:
        x2 = x.clone()
        x2[s] = unit_rms((D,), torch.Generator().manual_seed(1000 + s))    # a stream unlike make()'s
        changed = (compress(x2, wkv, wgate, ape, nw, ratio, INV, head_dim=128) != base).any(dim=1)
        blk = s // ratio
        expect = {blk, blk + 1} if ratio == 4 else {blk}
        expect = {i for i in expect if i < n}
        assert set(torch.nonzero(changed).flatten().tolist()) == expect, f"token {s}"


@pytest.mark.parametrize("ratio", [4, 128])
def test_ape_indexed_by_offset_in_block(ratio):
    """A large ape score at offset k (second half for ratio 4) makes every entry copy token i*r + k."""
    T, hd, k = 3 * ratio, 128, ratio - 2
    x, wkv, wgate, ape, nw = make(ratio, T)
    ape = torch.zeros_like(ape)
    ape[k, -hd:] = 60.0            # softmax weight of the others <= 8 * e^-50: far below a bf16 ulp
    y = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=128)
    A = x.double() @ wkv.double().T
    picked = A[torch.arange(T // ratio) * ratio + k, -hd:]
    norm = picked / torch.sqrt((picked ** 2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    ref = rope64(norm, torch.arange(T // ratio) * ratio, INV)
    assert_within(y, ref, bf16_ulp(ref) + ABS_FLOOR, "ape-selected entries")


def test_rope_rotates_only_the_last_64_dims_at_block_start():
    ratio, T = 4, 40
    x, wkv, wgate, ape, nw = make(ratio, T)
    rot = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=128)
    flat = compress(x, wkv, wgate, ape, nw, ratio, torch.zeros_like(INV), head_dim=128)   # angle 0
    nope = 128 - 2 * INV.numel()
    assert torch.equal(rot[:, :nope], flat[:, :nope])
    assert torch.equal(rot[0], flat[0])                                   # entry 0 sits at position 0
    assert bool((rot[1:, nope:] != flat[1:, nope:]).any(dim=1).all())
    # the rotation is the pair rotation at position i * ratio
    assert_within(rot, rope64(flat.double(), torch.arange(T // ratio) * ratio, INV),
                  2 * bf16_ulp(flat.double().abs().amax()), "rope of the entries")


def test_fp8_nope_is_a_64_block_round_trip_of_the_nope_part():
    ratio, T, hd = 4, 24, 512
    x, wkv, wgate, ape, nw = make(ratio, T, hd)
    plain = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=hd)
    q = compress(x, wkv, wgate, ape, nw, ratio, INV, head_dim=hd, fp8_nope=True)
    nope = hd - 64
    assert torch.equal(q[:, nope:], plain[:, nope:])                    # rope part stays bf16
    assert torch.equal(q[:, :nope], fp8_roundtrip(plain[:, :nope], 64))
    assert bool((q[:, :nope] != plain[:, :nope]).any())


def test_registered():
    assert registry.get("compressor", "reference") is compress


BAD = [
    ("ratio", lambda a: {"ratio": 3}, ValueError),
    ("ratio", lambda a: {"ratio": 0}, ValueError),
    ("x", lambda a: {"x": a["x"].to(torch.int32)}, TypeError),
    ("x", lambda a: {"x": a["x"][None]}, ValueError),
    ("wkv", lambda a: {"wkv": a["wkv"][:128]}, ValueError),
    ("wgate", lambda a: {"wgate": a["wgate"][:, :128]}, ValueError),
    ("ape", lambda a: {"ape": a["ape"][:2]}, ValueError),
    ("norm_weight", lambda a: {"norm_weight": a["norm_weight"][:64]}, ValueError),
    ("inv_freq", lambda a: {"inv_freq": torch.ones(128)}, ValueError),
    ("head_dim", lambda a: {"head_dim": -1}, ValueError),
]


@pytest.mark.parametrize("name,change,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_argument(name, change, exc):
    x, wkv, wgate, ape, nw = make(4, 16)
    args = dict(x=x, wkv=wkv, wgate=wgate, ape=ape, norm_weight=nw, ratio=4, inv_freq=INV, head_dim=128)
    args.update(change(args))
    hd = args.pop("head_dim")
    with pytest.raises(exc, match=name):
        compress(**args, head_dim=hd)
