"""Checkpoint reading: a synthetic toy checkpoint in the published DSv4 format (F8_E4M3 + F8_E8M0 128x128 scales,
I8 packed e2m1 + F8_E8M0 1x32 scales, BF16, F32, I64; dsv4-layers.md 1.3 / 6) is read back bit for bit, dequantised
against hand-written decoders, validated (clear errors, nothing partially loaded) and inspected from headers only."""
import json
import os
import struct

import pytest
import torch

from dsv4lab import checkpoint as ck
from dsv4lab.config import get_config
from dsv4lab.quant import dequant_fp4, dequant_fp8, quant_fp8

CFG = get_config("toy")
LAYERS = [0, 1, 2, "mtp", "top"]          # window+hash, CSA+hash, HCA+bias, MTP block, top level
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]   # e2m1 magnitudes (OCP MX spec), sign in bit 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(tensors as written, sharded dir, single-file path)."""
    tensors = ck.synthetic_tensors(CFG, seed=1)
    root = tmp_path_factory.mktemp("ckpt")
    ck.write_checkpoint(root / "sharded", CFG, tensors, shards=2)
    ck.write_checkpoint(root / "single", CFG, tensors, shards=1)
    return tensors, str(root / "sharded"), str(root / "single" / "model.safetensors")


def _prefix(layer):
    return ck.layer_prefix(layer, CFG)


def _of_layer(tensors, layer):
    p = _prefix(layer)
    return {n[len(p):]: t for n, t in tensors.items() if ck.group_of(n) == (p.rstrip(".") or "top")}


def _same_bits(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


def _rewrite_header(file, edit):
    """Re-serialise a shard's JSON header after ``edit(header_dict)``; the data section is kept byte for byte."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _copy_ckpt(tmp_path, tensors, shards=2, **changes):
    t = dict(tensors)
    for k, v in changes.items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    ck.write_checkpoint(tmp_path, CFG, t, shards=shards)
    return str(tmp_path)


# ---- format ---------------------------------------------------------------------------------------------
def test_written_headers_use_the_published_dtype_tags(written):
    tensors, sharded, single = written
    h = ck.Checkpoint.open(single).header(single).entries
    expect = {  # name: (tag, shape) from dsv4-layers.md 1.3 at toy sizes (D 256, I 128, E 8, q_l 128, V 1024)
        "layers.0.attn.wo_a.weight": ("F8_E4M3", (256, 256)), "layers.0.attn.wo_a.scale": ("F8_E8M0", (2, 2)),
        "layers.0.attn.wq_a.weight": ("F8_E4M3", (128, 256)), "layers.0.attn.wq_a.scale": ("F8_E8M0", (1, 2)),
        "layers.0.ffn.experts.7.w1.weight": ("I8", (128, 128)), "layers.0.ffn.experts.7.w1.scale": ("F8_E8M0", (128, 8)),
        "layers.0.ffn.experts.0.w2.weight": ("I8", (256, 64)), "layers.0.ffn.experts.0.w2.scale": ("F8_E8M0", (256, 4)),
        "layers.0.ffn.gate.weight": ("BF16", (8, 256)), "layers.0.ffn.gate.tid2eid": ("I64", (1024, 2)),
        "layers.2.ffn.gate.bias": ("F32", (8,)), "layers.0.hc_attn_fn": ("F32", (24, 1024)),
        "layers.1.attn.compressor.ape": ("F32", (4, 256)), "layers.2.attn.compressor.ape": ("F32", (128, 128)),
        "layers.0.attn.attn_sink": ("F32", (4,)), "mtp.0.e_proj.weight": ("F8_E4M3", (256, 256)),
        "hc_head_scale": ("F32", (1,)), "embed.weight": ("BF16", (1024, 256)),
    }
    for name, (tag, shape) in expect.items():
        assert (h[name].dtype, h[name].shape) == (tag, shape), name
    # our header parser agrees with safetensors' own reader on every tensor of both variants
    from safetensors import safe_open
    for file in [single] + ck.Checkpoint.open(sharded).shards:
        ours = ck.read_header(file).entries
        with safe_open(file, framework="pt") as f:
            assert set(f.keys()) == set(ours)
            for name in f.keys():
                sl = f.get_slice(name)
                assert (sl.get_dtype(), tuple(sl.get_shape())) == (ours[name].dtype, ours[name].shape), name
    assert "layers.1.ffn.gate.bias" not in tensors and "layers.2.ffn.gate.tid2eid" not in tensors  # 2 hash layers


def test_flash_expected_table_matches_observed_shard_headers():
    # Observed Flash headers (dsv4-layers.md 1.3): wo_a F8_E4M3 [8192, 4096] + F8_E8M0 [64, 32]; wq_a [1024, 4096] +
    # [8, 32]; experts.0.w1 I8 [2048, 2048] + [2048, 128]; gate.weight BF16 [256, 4096]; tid2eid I64 [129280, 6]
    t = ck.expected_tensors(get_config("flash"), "layers.0.")
    got = {n: (ck.PREFERRED_TAG[t[n].dtype], tuple(t[n].shape)) for n in
           ("attn.wo_a.weight", "attn.wo_a.scale", "attn.wq_a.scale", "ffn.experts.0.w1.weight",
            "ffn.experts.0.w1.scale", "ffn.gate.weight", "ffn.gate.tid2eid")}
    assert got == {"attn.wo_a.weight": ("F8_E4M3", (8192, 4096)), "attn.wo_a.scale": ("F8_E8M0", (64, 32)),
                   "attn.wq_a.scale": ("F8_E8M0", (8, 32)), "ffn.experts.0.w1.weight": ("I8", (2048, 2048)),
                   "ffn.experts.0.w1.scale": ("F8_E8M0", (2048, 128)), "ffn.gate.weight": ("BF16", (256, 4096)),
                   "ffn.gate.tid2eid": ("I64", (129280, 6))}
    assert sum(n.startswith("ffn.experts.") for n in t) == 256 * 6 and "ffn.experts.255.w2.scale" in t


def test_flash_table_reproduces_the_published_weight_listing():
    # A public weight report of DeepSeek-V4-Flash (46 shards) lists 69,187 tensors, 158,069,433,298 elements and
    # 148.65 GiB, plus per-name rows; the expected table must reproduce all three totals and the rows below.
    cfg = get_config("flash")
    groups = [""] + [f"layers.{i}." for i in range(cfg.num_hidden_layers)] + ["mtp.0."]
    tables = {g: ck.expected_tensors(cfg, g) for g in groups}
    assert sum(len(t) for t in tables.values()) == 69187
    assert sum(x.numel for t in tables.values() for x in t.values()) == 158_069_433_298
    assert round(sum(x.nbytes for t in tables.values() for x in t.values()) / 2 ** 30, 2) == 148.65
    rows = {  # (group, name): (shape, tag) copied from the listing
        ("layers.2.", "attn.compressor.ape"): ((4, 1024), "F32"), ("layers.3.", "attn.compressor.ape"): ((128, 512), "F32"),
        ("layers.2.", "attn.indexer.wq_b.scale"): ((64, 8), "F8_E8M0"), ("layers.2.", "attn.indexer.compressor.ape"): ((4, 256), "F32"),
        ("layers.3.", "attn.compressor.norm.weight"): ((512,), "BF16"), ("layers.0.", "attn.wq_b.scale"): ((256, 8), "F8_E8M0"),
        ("layers.5.", "ffn.experts.255.w2.weight"): ((4096, 1024), "I8"), ("layers.5.", "ffn.experts.0.w2.scale"): ((4096, 64), "F8_E8M0"),
        ("layers.3.", "ffn.gate.bias"): ((256,), "F32"), ("layers.0.", "attn.attn_sink"): ((64,), "F32"),
        ("layers.1.", "ffn.shared_experts.w2.scale"): ((32, 16), "F8_E8M0"), ("mtp.0.", "e_proj.scale"): ((32, 32), "F8_E8M0"),
        ("mtp.0.", "hc_head_fn"): ((4, 16384), "F32"), ("", "hc_head_scale"): ((1,), "F32"), ("", "embed.weight"): ((129280, 4096), "BF16"),
    }
    for (g, name), (shape, tag) in rows.items():
        t = tables[g][name]
        assert (tuple(t.shape), ck.PREFERRED_TAG[t.dtype]) == (shape, tag), g + name
    assert "ffn.gate.tid2eid" in tables["layers.2."] and "ffn.gate.bias" in tables["layers.3."]   # 3 hash layers
    assert not any("compressor" in n for n in tables["layers.1."]) and not any("indexer" in n for n in tables["mtp.0."])


def test_without_config_json(written, tmp_path, capsys):
    # inspect works without a config (no checks); loading needs one (or cfg=)
    single = written[2]
    os.makedirs(tmp_path / "bare")
    bare = str(tmp_path / "bare" / "model.safetensors")
    with open(single, "rb") as src, open(bare, "wb") as dst:
        dst.write(src.read())
    assert ck.main_inspect(bare, layer="top") == 0
    assert "config: none" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no config.json"):
        ck.load_layer(bare, 0)
    assert torch.equal(ck.load_layer(bare, 0, cfg=CFG)["ffn.gate.weight"], written[0]["layers.0.ffn.gate.weight"])


def test_layer_selectors():
    assert [ck.layer_prefix(x, CFG) for x in (3, "3", "layers.3", "mtp", "mtp.0", CFG.num_hidden_layers, "top")] == \
        ["layers.3.", "layers.3.", "layers.3.", "mtp.0.", "mtp.0.", "mtp.0.", ""]
    for bad in ("foo", -1, CFG.num_hidden_layers + 1, 1.5):
        with pytest.raises(ValueError, match="layer"):
            ck.layer_prefix(bad, CFG)


# ---- loading --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sharded", "single"])
@pytest.mark.parametrize("layer", LAYERS)
def test_raw_load_is_bitwise_what_was_written(written, variant, layer):
    tensors, sharded, single = written
    raw = ck.load_layer(sharded if variant == "sharded" else single, layer, dequantize=False)
    want = _of_layer(tensors, layer)
    assert set(raw) == set(want)
    for name, t in raw.items():
        assert _same_bits(t, want[name]), name


def _decode_fp8_by_hand(q, scale_bytes):
    """e4m3 value (torch's own cast, exact) times 2^(byte-127), each scale covering a 128x128 block."""
    s = torch.tensor([[2.0 ** (int(b) - 127) for b in row] for row in scale_bytes.view(torch.uint8).tolist()],
                     dtype=torch.float64)
    return q.double() * s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]


def _decode_fp4_by_hand(packed, scale_bytes):
    """Low nibble = element 2i, high = 2i+1; bit 3 sign, bits 0-2 index into E2M1; one scale per 32 elements."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack((b & 15, b >> 4), -1).flatten(-2)
    mag = torch.tensor(E2M1, dtype=torch.float64)[codes & 7]
    vals = torch.where((codes & 8) != 0, -mag, mag)
    s = 2.0 ** (scale_bytes.view(torch.uint8).double() - 127)
    return vals * s.repeat_interleave(32, -1)


@pytest.mark.parametrize("layer", [1, "mtp"])
def test_dequantised_load_matches_dequant_of_what_was_written(written, layer):
    tensors, sharded, _ = written
    deq = ck.load_layer(sharded, layer)
    want = _of_layer(tensors, layer)
    assert set(deq) == {n for n in want if not n.endswith(".scale")}
    n_fp8 = n_fp4 = 0
    for name, t in deq.items():
        w = want[name]
        if w.dtype == torch.float8_e4m3fn:
            s = want[name[:-len(".weight")] + ".scale"]
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, dequant_fp8(w, s.view(torch.uint8), (128, 128), torch.bfloat16)), name
            assert torch.equal(t.double(), _decode_fp8_by_hand(w, s)), name      # bf16 holds e4m3 * 2^k exactly
            n_fp8 += 1
        elif w.dtype == torch.int8:
            s = want[name[:-len(".weight")] + ".scale"]
            assert torch.equal(t, dequant_fp4(w.view(torch.uint8), s.view(torch.uint8), 32, torch.bfloat16)), name
            assert torch.equal(t.double(), _decode_fp4_by_hand(w, s)), name
            n_fp4 += 1
        else:
            assert _same_bits(t, w), name
    assert n_fp8 == (10 if layer == "mtp" else 9)  # 5 attn + 3 shared + (indexer wq_b | e_proj, h_proj) and n_fp4 == 3 * CFG.n_routed_experts
    # the weights are realistic (not all zero): RMS of a dequantised linear ~ 1/sqrt(in)
    rms = deq["attn.wq_a.weight"].float().pow(2).mean().sqrt().item()
    assert 0.5 / 16 < rms < 2 / 16


def test_fp32_dtype_and_expert_subset(written):
    tensors, sharded, _ = written
    deq = ck.load_layer(sharded, 2, dtype=torch.float32, experts=[1, 6])
    assert {n.split(".")[2] for n in deq if n.startswith("ffn.experts.")} == {"1", "6"}
    s = tensors["layers.2.ffn.experts.6.w2.scale"]
    assert torch.equal(deq["ffn.experts.6.w2.weight"].double(), _decode_fp4_by_hand(tensors["layers.2.ffn.experts.6.w2.weight"], s))
    assert deq["attn.wo_b.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="experts"):
        ck.load_layer(sharded, 2, experts=[8])


def test_u8_scales_and_packed_bytes_are_accepted(written, tmp_path):
    # converters may store UE8M0 scales / packed e2m1 as plain U8; the bytes mean the same
    tensors, _, _ = written
    p = "layers.2."
    t = {n: (v.view(torch.uint8) if n.startswith(p) and (n.endswith(".scale") or v.dtype == torch.int8) else v)
         for n, v in tensors.items()}
    path = _copy_ckpt(tmp_path, t, shards=1)
    raw = ck.load_layer(path, 2, dequantize=False)
    assert raw["attn.wq_b.scale"].dtype == torch.uint8 and raw["ffn.experts.0.w1.weight"].dtype == torch.uint8
    ref = ck.load_layer(written[1], 2)
    got = ck.load_layer(path, 2)
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)


def test_raw_byte_reader_agrees_with_safe_open(written):
    # the fallback used when torch has no float8_e8m0fnu reads the same bytes
    tensors, _, single = written
    h = ck.read_header(single)
    for name in ("layers.1.attn.wo_a.scale", "layers.1.ffn.experts.3.w2.scale"):
        assert torch.equal(ck._read_bytes(h.entries[name]), tensors[name].view(torch.uint8))


def test_e8m0_fallback_when_safe_open_cannot_build_the_dtype(written, monkeypatch):
    # older torch/safetensors cannot return F8_E8M0 tensors: the loader then reads the bytes itself (uint8)
    import safetensors

    real = safetensors.safe_open

    class NoE8M0:
        def __init__(self, file, framework):
            self.f = real(file, framework=framework)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            if self.f.get_slice(name).get_dtype() == "F8_E8M0":
                raise TypeError("data type F8_E8M0 not supported")
            return self.f.get_tensor(name)

    normal_raw, normal = ck.load_layer(written[1], 1, dequantize=False), ck.load_layer(written[1], 1)
    monkeypatch.setattr(safetensors, "safe_open", NoE8M0)
    raw, deq = ck.load_layer(written[1], 1, dequantize=False), ck.load_layer(written[1], 1)
    assert raw["attn.wo_a.scale"].dtype == torch.uint8 and raw["ffn.experts.2.w1.scale"].dtype == torch.uint8
    assert all(_same_bits(raw[n], normal_raw[n]) or torch.equal(raw[n], normal_raw[n].view(torch.uint8)) for n in raw)
    assert set(deq) == set(normal) and all(torch.equal(deq[n], normal[n]) for n in deq)


def test_fp8_partial_edge_blocks():
    # out/in not multiples of 128: the scale covers ceil() blocks; compare with the zero-padded quantisation
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 300, generator=g) / 300 ** 0.5
    xp = torch.nn.functional.pad(x, (0, 84, 0, 56))
    q, s = quant_fp8(xp, (128, 128))
    full = dequant_fp8(q, s, (128, 128), torch.float32)
    got = ck.dequantize_fp8_weight(q[:200, :300].contiguous(), s, torch.float32)
    assert torch.equal(got, full[:200, :300])
    with pytest.raises(ValueError, match="scale"):
        ck.dequantize_fp8_weight(q[:200, :300].contiguous(), s[:1], torch.float32)


# ---- errors: every problem named, nothing returned ----------------------------------------------------
def test_missing_tensor_is_named(written, tmp_path):
    path = _copy_ckpt(tmp_path, written[0], **{"layers.1.attn.wkv.scale": None})
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wkv\.scale' is missing"):
        ck.load_layer(path, 1)
    assert len(ck.load_layer(path, 2)) > 0          # other layers are unaffected


def test_shape_that_does_not_match_the_config(written, tmp_path):
    bad = written[0]["layers.2.attn.wq_a.weight"][:, :128].contiguous()
    path = _copy_ckpt(tmp_path, written[0], **{"layers.2.attn.wq_a.weight": bad})
    with pytest.raises(ValueError, match=r"layers\.2\.attn\.wq_a\.weight' in .*shape \[128, 128\], the config expects \[128, 256\]"):
        ck.load_layer(path, 2)


@pytest.mark.parametrize("tag, message", [("Q4_K", "unknown dtype tag 'Q4_K'"),
                                          ("I8", r"dtype I8, expected F8_E4M3")])
def test_bad_dtype_tag_is_named_with_its_file(written, tmp_path, tag, message):
    path = _copy_ckpt(tmp_path, written[0])
    name = "layers.1.attn.wo_b.weight"
    file = json.load(open(os.path.join(path, ck.INDEX_FILE)))["weight_map"][name]
    _rewrite_header(os.path.join(path, file), lambda h: h[name].update(dtype=tag))
    with pytest.raises(ValueError, match=rf"{name}' in .*{file}: {message}"):
        ck.load_layer(path, 1)


def test_truncated_shard_fails_load_but_not_inspect(written, tmp_path, monkeypatch, capsys):
    path = _copy_ckpt(tmp_path, written[0])
    shard = os.path.join(path, "model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:                       # keep the header, drop the whole data section
        (n,) = struct.unpack("<Q", f.read(8))
        f.truncate(8 + n)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is truncated"):
        ck.load_layer(path, 1)
    import safetensors

    def no_reads(*a, **k):
        raise AssertionError("inspect must not open tensor data")
    monkeypatch.setattr(safetensors, "safe_open", no_reads)
    assert ck.main_inspect(path, layer="1", expand_experts=True) == 1        # 1 = problems found (truncation)
    out = capsys.readouterr().out
    assert "model-00002-of-00002.safetensors is truncated" in out
    for name in _of_layer(written[0], 1):
        assert f"  {name} " in out, name


def test_unexpected_tensor_strict_and_lenient(written, tmp_path):
    path = _copy_ckpt(tmp_path, written[0], **{"layers.0.attn.extra_bias": torch.ones(4)})
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.extra_bias' in .* is not expected"):
        ck.load_layer(path, 0)
    assert "attn.extra_bias" not in ck.load_layer(path, 0, strict=False)


def test_index_pointing_at_the_wrong_shard(written, tmp_path):
    path = _copy_ckpt(tmp_path, written[0])
    index = os.path.join(path, ck.INDEX_FILE)
    js = json.load(open(index))
    name = "layers.3.attn.wq_b.weight"
    js["weight_map"][name] = "model-00002-of-00002.safetensors" if js["weight_map"][name].startswith("model-00001") \
        else "model-00001-of-00002.safetensors"
    json.dump(js, open(index, "w"))
    with pytest.raises(ValueError, match=rf"{name}': the index maps it to .*whose header does not list it"):
        ck.load_layer(path, 3)


def test_many_problems_are_reported_together(written, tmp_path):
    path = _copy_ckpt(tmp_path, written[0], **{"layers.3.attn.wkv.weight": None, "layers.3.ffn.gate.bias": None})
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as e:
        ck.load_layer(path, 3)
    assert "attn.wkv.weight" in str(e.value) and "ffn.gate.bias" in str(e.value)


# ---- inspect ----------------------------------------------------------------------------------------------
def test_inspect_all_layers_and_cli(written, capsys):
    from dsv4lab.cli import main

    _, sharded, _ = written
    assert main(["inspect", sharded]) == 0
    out = capsys.readouterr().out
    for group in ("== top", "== layers.0", "== layers.3", "== mtp.0"):
        assert group in out
    assert "ffn.experts.{0..7}.w1.weight  x8" in out and out.count("check: ok") == 6
    text, problems = ck.format_inspect(sharded, "2")
    assert problems == 0 and "== layers.2" in text and "== layers.1" not in text
    total = sum(t.numel() * t.element_size() for t in _of_layer(written[0], 2).values())
    assert f"layers.2  (ratio 128: HCA, bias routing): {len(_of_layer(written[0], 2))} tensors" in text
    assert total == sum(e.nbytes for e in ck.inspect_rows(ck.Checkpoint.open(sharded), 2)["layers.2"])


def test_inspect_reports_config_mismatches(written, tmp_path, capsys):
    path = _copy_ckpt(tmp_path, written[0], **{"layers.1.attn.attn_sink": None,
                                               "layers.1.attn.stray": torch.zeros(2)})
    assert ck.main_inspect(path, layer="layers.1") == 1
    out = capsys.readouterr().out
    assert "missing layers.1.attn.attn_sink [4] F32" in out and "unexpected layers.1.attn.stray" in out


# ---- into the layer modules ------------------------------------------------------------------------------
layers = pytest.importorskip("dsv4lab.layers")


def _module_state(m):
    return {k: v.clone() for k, v in list(m.named_parameters()) + list(m.named_buffers())}


@pytest.mark.parametrize("layer", [1, 2])
def test_load_into_decoder_layer(written, layer):
    tensors, sharded, _ = written
    mod = layers.DecoderLayer(CFG, layer, seed=5)
    ck.load_into(mod, sharded)
    deq, raw = ck.load_layer(sharded, layer), _of_layer(tensors, layer)
    assert torch.equal(mod.attn.wq_b.weight, deq["attn.wq_b.weight"])
    assert torch.equal(mod.attn.compressor.ape, deq["attn.compressor.ape"])
    assert torch.equal(mod.hc_ffn.fn, deq["hc_ffn_fn"]) and torch.equal(mod.hc_attn.scale, deq["hc_attn_scale"])
    assert torch.equal(mod.ffn.shared_experts.w2, deq["ffn.shared_experts.w2.weight"])
    for e in range(CFG.n_routed_experts):
        assert torch.equal(mod.ffn.experts.w3[e], raw[f"ffn.experts.{e}.w3.weight"].view(torch.uint8))
        assert torch.equal(mod.ffn.experts.w3_scale[e], raw[f"ffn.experts.{e}.w3.scale"].view(torch.uint8))
    if CFG.is_hash_layer(layer):
        assert torch.equal(mod.ffn.gate.tid2eid, deq["ffn.gate.tid2eid"])
    else:
        assert torch.equal(mod.ffn.gate.bias, deq["ffn.gate.bias"])
    # every module tensor came from the checkpoint: a second module with another seed loads to the same state
    other = ck.load_into(layers.DecoderLayer(CFG, layer, seed=6), sharded)
    a, b = _module_state(mod), _module_state(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_into_mtp_and_model_top(written):
    tensors, _, single = written
    mtp = ck.load_into(layers.MTP(CFG), single)
    deq = ck.load_layer(single, "mtp")
    assert torch.equal(mtp.e_proj.weight, deq["e_proj.weight"]) and torch.equal(mtp.hc_head.base, deq["hc_head_base"])
    assert torch.equal(mtp.block.attn.wo_a.weight, deq["attn.wo_a.weight"])
    model = layers.Model(CFG, num_layers=2, mtp=False)    # a 2-layer model still takes layer 1 and the top level
    ck.load_into(model, single, "top")
    assert torch.equal(model.head.weight, tensors["head.weight"]) and torch.equal(model.hc_head.fn, tensors["hc_head_fn"])
    ck.load_into(model, single, 1)
    assert torch.equal(model.layers[1].attn.wq_a.weight, ck.load_layer(single, 1)["attn.wq_a.weight"])


def test_loaded_layer_runs(written):
    # the loaded weights drive a forward pass (window + hash layer, T = 8, unfused wiring): finite, unit-ish RMS
    lw = ck.layer_inputs_from(written[1], 0)
    mod = lw.module()
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(8, CFG.hc_mult, CFG.hidden_size, generator=g).to(torch.bfloat16)
    out = mod(torch.arange(8), residual, wiring="unfused", input_ids=torch.randint(0, CFG.vocab_size, (8,), generator=g))
    assert out.shape == residual.shape and torch.isfinite(out.float()).all()
    assert not torch.equal(out, residual)


def test_load_into_is_all_or_nothing(written, tmp_path):
    tensors, sharded, _ = written
    path = _copy_ckpt(tmp_path, tensors, **{"layers.1.ffn.experts.5.w2.scale": None})
    mod = layers.DecoderLayer(CFG, 1)
    before = _module_state(mod)
    with pytest.raises(ValueError, match=r"experts\.5\.w2\.scale' is missing"):
        ck.load_into(mod, path)
    with pytest.raises(ValueError, match=r"the module has no parameter/buffer 'attn\.indexer\.wq_b\.weight'"):
        ck.load_into(layers.DecoderLayer(CFG, 2), sharded, 1)        # CSA weights into an HCA module
    mod2 = layers.DecoderLayer(CFG, 2)
    before2 = _module_state(mod2)
    with pytest.raises(ValueError, match="wq_b"):
        ck.load_into(mod2, sharded, 1)
    for m, snap in ((mod, before), (mod2, before2)):
        after = _module_state(m)
        assert all(torch.equal(after[k], snap[k]) for k in snap)


def test_load_into_refuses_lossy_casts(written, tmp_path):
    # an F32 norm weight that bf16 cannot hold exactly is an error, a bf16-representable one loads
    tensors = written[0]
    lossy = tensors["layers.0.attn_norm.weight"].float() + 1e-4
    path = _copy_ckpt(tmp_path / "a", tensors, **{"layers.0.attn_norm.weight": lossy})
    with pytest.raises(ValueError, match="attn_norm.weight.*do not fit"):
        ck.load_into(layers.DecoderLayer(CFG, 0), path)
    exact = tensors["layers.0.attn_norm.weight"].float()
    path = _copy_ckpt(tmp_path / "b", tensors, **{"layers.0.attn_norm.weight": exact})
    mod = ck.load_into(layers.DecoderLayer(CFG, 0), path)
    assert torch.equal(mod.attn_norm.weight, tensors["layers.0.attn_norm.weight"])


# ---- notebook hook ----------------------------------------------------------------------------------------
def test_op_inputs_carry_the_checkpoint_weights(written):
    _, sharded, _ = written
    lw = ck.layer_inputs_from(sharded, 2)
    args, kwargs = lw.op_inputs("mhc_fused_post_pre", 16, sublayer="ffn")
    assert torch.equal(args[4], lw.tensors["hc_ffn_fn"]) and torch.equal(args[7], lw.tensors["ffn_norm.weight"])
    assert torch.equal(args[5], lw.tensors["hc_ffn_scale"]) and torch.equal(args[6], lw.tensors["hc_ffn_base"])
    args, kwargs = lw.op_inputs("moe_routing", 16)
    assert torch.equal(kwargs["bias"], lw.tensors["ffn.gate.bias"])
    args, _ = lw.op_inputs("router_gemm", 16)
    assert torch.equal(args[1], lw.tensors["ffn.gate.weight"]) and args[0].shape == (16, CFG.hidden_size)
    hashed = ck.layer_inputs_from(sharded, 0)
    _, kwargs = hashed.op_inputs("moe_routing", 16)
    assert "bias" not in kwargs and torch.equal(kwargs["tid2eid"], hashed.tensors["ffn.gate.tid2eid"])
    top = ck.layer_inputs_from(sharded, "top")
    args, _ = top.op_inputs("hc_head", 4)
    assert torch.equal(args[1], top.tensors["hc_head_fn"])
    with pytest.raises(ValueError, match="hc_head_fn"):
        lw.op_inputs("hc_head", 4)
    with pytest.raises(ValueError, match="op"):
        lw.op_inputs("sparse_attention", 4)
