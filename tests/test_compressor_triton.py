"""Triton compressor (dsv4-layers.md 3.4) and indexer Q quant (3.5) under the interpreter.

The compressor kernel rounds to the bf16 / e4m3 grids with RNE (software rounding under the interpreter), so it is
held to the float64 oracle within the reference's own bound, and to the fp32 reference bitwise where both compute
the same fp32 operations in the same order -- checked here as: at most 1 bf16 ulp apart, and the fp8 nope part
equal to the reference fp8 round trip of the kernel's own bf16 output (the quantiser is then exact).
"""
from __future__ import annotations

import pytest
import torch

from _attn_oracles import bf16_ulp, compress_oracle, unit_rms, weight
from dsv4lab.kernels import registry
from dsv4lab.kernels.reference.compressor import compress as reference_compress
from dsv4lab.kernels.reference.indexer_q import fp8_mqa_logits, indexer_q_rope_quant, quant_indexer_k
from dsv4lab.kernels.triton.compressor import compress, compress_from_projections
from dsv4lab.kernels.triton.indexer_q import indexer_q_rope_quant as triton_indexer_q
from dsv4lab.quant import fp8_roundtrip
from dsv4lab.rope import base_inv_freq

INV = base_inv_freq(64, 160000.0)


def weights(ratio, hd, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = 2 if ratio == 4 else 1
    return (weight(c * hd, D, g), weight(c * hd, D, g), 0.1 * torch.randn(ratio, c * hd, generator=g),
            (1 + 0.05 * torch.randn(hd, generator=g)).to(torch.bfloat16))


@pytest.mark.parametrize("ratio,hd,T,block_c", [(4, 128, 66, None), (4, 128, 40, 128), (128, 128, 300, None),
                                                (128, 128, 256, 128), (4, 512, 20, 512)])
def test_matches_reference_and_oracle(ratio, hd, T, block_c):
    """Both the fused single-program path (block_c = hd) and the pooled-workspace path (block_c < hd)."""
    wkv, wg, ape, nw = weights(ratio, hd)
    x = unit_rms((T, 64), torch.Generator().manual_seed(1))
    used = x[: (T // ratio) * ratio].float()
    A, S = used @ wkv.float().T, used @ wg.float().T
    got = compress_from_projections(A, S, ape, nw, ratio, INV, head_dim=hd, block_c=block_c)
    ref = reference_compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd)
    assert got.dtype == torch.bfloat16 and got.shape == (T // ratio, hd)
    assert bool(((got.double() - ref.double()).abs() <= bf16_ulp(ref)).all())
    o64 = compress_oracle(x, wkv, wg, ape, nw, ratio, INV, hd)
    # one bf16 rounding (half an ulp) + fp32 noise of the pooled sums and the norm (<< 2^-12 relative)
    assert bool(((got.double() - o64).abs() <= bf16_ulp(o64) * 0.5 + 2.0 ** -12 * o64.abs() + 1e-6).all())


@pytest.mark.parametrize("ratio", [4, 128])
def test_fp8_nope(ratio):
    hd, T = 128, 260
    wkv, wg, ape, nw = weights(ratio, hd, seed=3)
    x = unit_rms((T, 64), torch.Generator().manual_seed(4))
    plain = compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd)
    q = compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd, fp8_nope=True)
    nope = hd - 64
    assert torch.equal(q[:, nope:], plain[:, nope:])                                # rope part stays bf16
    assert torch.equal(q[:, :nope], fp8_roundtrip(plain[:, :nope], 64))             # exact fp8 round trip
    ref = reference_compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd, fp8_nope=True)
    assert (q != ref).float().mean() < 0.02          # only where a 1-ulp bf16 difference crosses an fp8 midpoint


def test_short_inputs_and_errors():
    wkv, wg, ape, nw = weights(4, 128)
    x = unit_rms((3, 64), torch.Generator().manual_seed(0))
    assert compress(x, wkv, wg, ape, nw, 4, INV, head_dim=128).shape == (0, 128)
    with pytest.raises(ValueError, match="ratio"):
        compress(x, wkv, wg, ape, nw, 8, INV, head_dim=128)
    with pytest.raises(ValueError, match="head_dim"):
        compress_from_projections(torch.zeros(8, 192), torch.zeros(8, 192), ape[:, :192], nw[:96], 4, INV,
                                  head_dim=96)
    with pytest.raises(TypeError, match="A"):
        compress_from_projections(torch.zeros(8, 256, dtype=torch.float64), torch.zeros(8, 256), ape, nw, 4, INV,
                                  head_dim=128)


def test_first_entry_has_no_previous_block():
    """Ratio 4, entry 0: the previous-block candidates are absent, so changing A/S of the first half of tokens
    0..3 (which would feed entry 1 only) leaves entry 0 unchanged."""
    wkv, wg, ape, nw = weights(4, 128)
    A = torch.randn(8, 256)
    S = torch.randn(8, 256)
    base = compress_from_projections(A, S, ape, nw, 4, INV, head_dim=128)
    A2, S2 = A.clone(), S.clone()
    A2[:4, :128] += 5.0
    S2[:4, :128] -= 3.0
    moved = compress_from_projections(A2, S2, ape, nw, 4, INV, head_dim=128)
    assert torch.equal(base[0], moved[0]) and not torch.equal(base[1], moved[1])


def test_indexer_q_bitwise_and_logits():
    g = torch.Generator().manual_seed(5)
    T, nI, dI = 24, 8, 128
    q = torch.randn(T, nI, dI, generator=g).to(torch.bfloat16)
    pos = torch.arange(T) * 17
    w = torch.randn(T, nI, generator=g).to(torch.bfloat16).float()
    q8, w_out = triton_indexer_q(q, pos, INV, w)
    r8, rw = indexer_q_rope_quant(q, pos, INV, w)
    assert torch.equal(q8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(w_out, rw)
    # the fp8 logits track bf16 logits of the same rotated q within the fp8 quantisation error
    k = torch.randn(10, dI, generator=g).to(torch.bfloat16)
    k8, ks = quant_indexer_k(k)
    ke = torch.full((T,), 7)
    lg = fp8_mqa_logits(q8, k8, ks, w_out, torch.zeros(T, dtype=torch.long), ke)
    from dsv4lab.rope import apply_rope
    qr = apply_rope(q, pos, INV).double()
    exact = (torch.einsum("thd,nd->thn", qr, k.double()).relu() * w.double()[..., None]).sum(1) * (dI * nI) ** -0.5
    assert bool(torch.isinf(lg[:, 7:]).all())
    scale = (torch.einsum("thd,nd->thn", qr.abs(), k.double().abs()) * w.double().abs()[..., None]).sum(1) * (dI * nI) ** -0.5
    assert bool(((lg[:, :7].double() - exact[:, :7]).abs() <= 2 * 2.0 ** -4 * scale[:, :7]).all())  # 2 e4m3 roundings


def test_registry():
    assert registry.get("compressor", "triton") is compress
    assert registry.get("indexer_q_rope_quant", "triton") is triton_indexer_q
    ok, why = registry.availability("indexer_topk", "deep_gemm")
    assert ok == torch.cuda.is_available() or not ok


# ---- launch configurations and tiling edges -----------------------------------------------------------------
from dsv4lab.kernels.triton import compressor as triton_compressor  # noqa: E402
from dsv4lab.kernels.triton import indexer_q as triton_indexer_q_mod  # noqa: E402


def _projections(ratio, hd, T, seed=0):
    wkv, wg, ape, nw = weights(ratio, hd, seed=seed)
    x = unit_rms((T, 64), torch.Generator().manual_seed(seed + 1))
    used = x[: (T // ratio) * ratio].float()
    return x, (wkv, wg, ape, nw), used @ wkv.float().T, used @ wg.float().T


@pytest.mark.parametrize("ratio,T,config", [
    (4, 22, dict(block_c=None, rows=4)),          # two candidate tiles: entry 0's first tile is all absent
    (4, 23, dict(block_c=32, rows=2, num_warps=2)),   # 4 channel slices, 4 tiles; T not a multiple of r
    (128, 257, dict(block_c=128, rows=32)),       # whole row, 4 tiles; one token past the last block
    (128, 256, dict(block_c=16, rows=128)),       # 8 slices finished by the last arriving program, one tile
])
def test_every_tiling_matches_reference(ratio, T, config):
    hd = 128
    x, (wkv, wg, ape, nw), A, S = _projections(ratio, hd, T)
    ref = reference_compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd, fp8_nope=True)
    got = compress_from_projections(A, S, ape, nw, ratio, INV, head_dim=hd, fp8_nope=True, config=config)
    plain = compress_from_projections(A, S, ape, nw, ratio, INV, head_dim=hd, config=config)
    assert got.shape == (T // ratio, hd)
    assert bool(((plain.double() - reference_compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd).double()).abs()
                 <= bf16_ulp(ref)).all())
    nope = hd - 64
    assert torch.equal(got[:, :nope], fp8_roundtrip(plain[:, :nope], 64)) and torch.equal(got[:, nope:], plain[:, nope:])
    assert (got != ref).float().mean() < 0.02          # only where a 1-ulp bf16 difference crosses an fp8 midpoint


@pytest.mark.parametrize("ratio", [4, 128])
def test_bench_configs_resolve_and_agree(ratio):
    """Every swept config is valid; on a tiny shape each gives the same entries up to 1 bf16 ulp."""
    hd, T = 64, 2 * ratio + 1
    x, (wkv, wg, ape, nw), A, S = _projections(ratio, hd, T, seed=7)
    ref = reference_compress(x, wkv, wg, ape, nw, ratio, INV[:16], head_dim=hd)
    for cfg in triton_compressor.CONFIGS[ratio]:
        cfg = {**cfg, "block_c": None if cfg["block_c"] is None else min(cfg["block_c"], hd)}
        got = compress_from_projections(A, S, ape, nw, ratio, INV[:16], head_dim=hd, config=cfg)
        assert bool(((got.double() - ref.double()).abs() <= bf16_ulp(ref)).all()), cfg


def test_split_path_leaves_counters_zeroed_and_repeats():
    """The last-arriving program resets the per-entry counters, so a second launch on the cached buffer agrees."""
    hd, T = 128, 512
    _, (wkv, wg, ape, nw), A, S = _projections(128, hd, T, seed=3)
    cfg = dict(block_c=32, rows=64)
    first = compress_from_projections(A, S, ape, nw, 128, INV, head_dim=hd, config=cfg)
    counters = triton_compressor._arrival_counters(T // 128, A.device)
    assert int(counters.abs().sum()) == 0
    assert torch.equal(compress_from_projections(A, S, ape, nw, 128, INV, head_dim=hd, config=cfg), first)


def test_entry_rope_table_follows_inv_freq_changes():
    inv = INV.clone()
    cos, sin = triton_compressor.entry_cos_sin(inv, 4, 5, torch.device("cpu"))
    from dsv4lab.rope import rope_cos_sin
    c_ref, s_ref = rope_cos_sin(torch.arange(5) * 4, inv)
    assert torch.equal(cos[:5], c_ref) and torch.equal(sin[:5], s_ref)
    inv.mul_(0.5)                                             # in place: the cached table must not be reused
    cos2, _ = triton_compressor.entry_cos_sin(inv, 4, 5, torch.device("cpu"))
    assert torch.equal(cos2[:5], rope_cos_sin(torch.arange(5) * 4, inv)[0])
    big, _ = triton_compressor.entry_cos_sin(inv, 4, 300, torch.device("cpu"))   # grows; rows keep their values
    assert big.shape[0] >= 300 and torch.equal(big[:5], cos2[:5])


def test_config_errors_name_the_parameter():
    _, (_, _, ape, nw), A, S = _projections(4, 128, 16)
    for bad, name in [(dict(block_c=96), "block_c"), (dict(rows=3), "rows"), (dict(rows=16), "rows"),
                      (dict(num_warps=3), "num_warps"), (dict(blocks=2), "config")]:
        with pytest.raises(ValueError, match=name):
            compress_from_projections(A, S, ape, nw, 4, INV, head_dim=128, config=bad)
    with pytest.raises(ValueError, match="block_rows"):
        triton_indexer_q_mod.resolve_config(dict(block_rows=24))


@pytest.mark.parametrize("T,nI,config", [(5, 3, dict(block_rows=4)),    # rows straddle tokens; 15 rows, last tile partial
                                         (3, 8, dict(block_rows=64, num_warps=8)),   # one partial tile
                                         (7, 2, dict(block_rows=1, num_warps=1))])
def test_indexer_q_tilings_bitwise(T, nI, config):
    g = torch.Generator().manual_seed(T * nI)
    q = torch.randn(T, nI, 128, generator=g).to(torch.bfloat16)
    pos = torch.tensor([0, 1, 4095, 4096, 65535, 17, 3][:T])           # block-edge and large positions
    w = torch.randn(T, nI, generator=g)
    from dsv4lab.rope import rope_cos_sin
    cos, sin = rope_cos_sin(pos, INV)
    q8, w_out = triton_indexer_q_mod.launch(q, cos, sin, w, config)
    r8, rw = indexer_q_rope_quant(q, pos, INV, w)
    assert torch.equal(q8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(w_out, rw)


def test_indexer_q_swept_configs_bitwise_and_empty():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(6, 4, 128, generator=g).to(torch.bfloat16)
    pos = torch.arange(6) * 1000
    w = torch.randn(6, 4, generator=g).to(torch.bfloat16)
    r8, rw = indexer_q_rope_quant(q, pos, INV, w)
    from dsv4lab.rope import rope_cos_sin
    cos, sin = rope_cos_sin(pos, INV)
    for cfg in triton_indexer_q_mod.CONFIGS:
        q8, w_out = triton_indexer_q_mod.launch(q, cos, sin, w, cfg)
        assert torch.equal(q8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(w_out, rw), cfg
    e8, ew = triton_indexer_q(q[:0], pos[:0], INV, w[:0])
    assert e8.shape == (0, 4, 128) and ew.shape == (0, 4)


# ---- design "tiles" (opt-in): whole rows, several entries per program, candidate groups merged by the last one ----
@pytest.mark.parametrize("ratio,T,config", [
    (4, 42, dict(entries=4)),               # 10 entries: the last program's 2 padding entries are masked
    (4, 23, dict(entries=2, groups=2)),     # entry 0's first group (the previous block) is all absent
    (4, 16, dict(groups=8, num_warps=2)),   # one candidate per program
    (128, 300, dict(groups=8)),             # 16 rows per program; tokens past the last block unused
    (128, 384, dict(entries=2, groups=4)),  # 3 entries: a merge over a half-padded entry block
    (128, 256, dict(groups=16, num_warps=1)),              # merged in 2 steps of 8 groups (online over steps)
    (4, 37, dict(entries=8, groups=2, num_warps=1)),       # 1 group per merge step: entry 0's first step is absent
])
def test_tiles_design_matches_reference(ratio, T, config):
    hd = 128
    config = dict(design="tiles", **config)
    x, (wkv, wg, ape, nw), A, S = _projections(ratio, hd, T, seed=T)
    ref = reference_compress(x, wkv, wg, ape, nw, ratio, INV, head_dim=hd)
    plain = compress_from_projections(A, S, ape, nw, ratio, INV, head_dim=hd, config=config)
    assert plain.shape == (T // ratio, hd)
    assert bool(((plain.double() - ref.double()).abs() <= bf16_ulp(ref)).all())
    o64 = compress_oracle(x, wkv, wg, ape, nw, ratio, INV, hd)
    # one bf16 rounding (half an ulp) + fp32 noise of the pooled sums, the group merge and the norm
    assert bool(((plain.double() - o64).abs() <= bf16_ulp(o64) * 0.5 + 2.0 ** -12 * o64.abs() + 1e-6).all())
    got = compress_from_projections(A, S, ape, nw, ratio, INV, head_dim=hd, fp8_nope=True, config=config)
    nope = hd - 64
    assert torch.equal(got[:, :nope], fp8_roundtrip(plain[:, :nope], 64))
    assert torch.equal(got[:, nope:], plain[:, nope:])


@pytest.mark.parametrize("shape", sorted(triton_compressor.TILES_CONFIGS))
def test_tiles_bench_configs_agree(shape):
    """Every swept "tiles" config resolves and, on a tiny shape, gives the default design's entries within 1 ulp."""
    ratio, hd, T = shape[0], 64, 2 * shape[0] + 1
    x, (wkv, wg, ape, nw), A, S = _projections(ratio, hd, T, seed=9)
    ref = reference_compress(x, wkv, wg, ape, nw, ratio, INV[:16], head_dim=hd)
    for cfg in triton_compressor.TILES_CONFIGS[shape]:
        assert triton_compressor.resolve_config(ratio, T // ratio, shape[1], cfg)["design"] == "tiles"
        got = compress_from_projections(A, S, ape, nw, ratio, INV[:16], head_dim=hd, config=cfg)
        assert bool(((got.double() - ref.double()).abs() <= bf16_ulp(ref)).all()), cfg


def test_tiles_groups_leave_counters_zeroed_and_repeat():
    hd, T = 64, 512
    _, (wkv, wg, ape, nw), A, S = _projections(128, hd, T, seed=5)
    cfg = dict(design="tiles", groups=16, entries=2)
    first = compress_from_projections(A, S, ape, nw, 128, INV[:16], head_dim=hd, config=cfg)
    assert int(triton_compressor._arrival_counters(T // 128, A.device).abs().sum()) == 0
    assert torch.equal(compress_from_projections(A, S, ape, nw, 128, INV[:16], head_dim=hd, config=cfg), first)


def test_tiles_config_errors_name_the_parameter():
    _, (_, _, ape, nw), A, S = _projections(4, 128, 16)
    for bad, name in [(dict(block_c=128), "config"), (dict(groups=3), "groups"), (dict(groups=16), "groups"),
                      (dict(entries=0), "entries"), (dict(entries=True), "entries"), (dict(num_warps=3), "num_warps")]:
        with pytest.raises(ValueError, match=name):
            compress_from_projections(A, S, ape, nw, 4, INV, head_dim=128, config=dict(design="tiles", **bad))
