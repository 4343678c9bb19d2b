"""DSv4 attention reference (dsv4-layers.md 3.1-3.8) and the DSv4Attention module.

Toy preset: layer 0 = window only, 1 = CSA (ratio 4 + indexer), 2 = HCA (ratio 128); W = 32, K_I = 32.
"""
from __future__ import annotations

import math

import pytest
import torch

from _attn_oracles import assert_within, bf16_ulp, rope64, unit_rms
from dsv4lab import get_config
from dsv4lab.kernels import registry
from dsv4lab.kernels.reference.attention import (
    AttentionParams, attention_output, attention_prefill, attention_prefill_parts, init_attention_params,
    kv_path, param_specs, quantize_weights_fp8, query_path, sparse_attention_with_sink, window_indices)
from dsv4lab.layers.attention import DSv4Attention
from dsv4lab.quant import fp8_roundtrip
from dsv4lab.rope import apply_rope, layer_inv_freq

CFG = get_config("toy")
D, H, HD, W = CFG.hidden_size, CFG.num_attention_heads, CFG.head_dim, CFG.sliding_window
ROPE = CFG.qk_rope_head_dim
NOPE = HD - ROPE
KINDS = {0: "window", 1: "csa", 2: "hca"}
ABS_FLOOR = 1e-5      # fp32 accumulation noise on O(1) data (sums of <= 512 terms), below any bf16 ulp of O(1)
PARAMS = {layer: init_attention_params(CFG, layer, seed=7) for layer in KINDS}


def pair_mag(v: torch.Tensor) -> torch.Tensor:
    """|v| with each rope pair's entries replaced by |e| + |o| (a rotation mixes the two)."""
    m = v.double().abs().clone()
    ps = m[..., NOPE::2] + m[..., NOPE + 1::2]
    m[..., NOPE::2], m[..., NOPE + 1::2] = ps, ps
    return m


def inputs(T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return unit_rms((T, D), torch.Generator().manual_seed(seed)), torch.arange(T)


# ---- sparse core ----------------------------------------------------------------------------------
def test_sink_known_answer_by_hand():
    """One head, d = 4, scale 1: logits q.k1 = 1 and q.k2 = -0.5, sink 0.25 (all exact in bf16)."""
    q = torch.tensor([[[1.0, 0, 0, 0]]] * 3).to(torch.bfloat16)             # [T=3, H=1, 4]
    kv = torch.tensor([[1.0, 1.0, 0, 0], [-0.5, 0, 2.0, 0]]).to(torch.bfloat16)
    idx = torch.tensor([[0, 1, -1, -1], [-1, -1, -1, -1], [1, -1, 0, 1]])   # row 2: k2 listed twice
    sink = torch.tensor([0.25])
    o = sparse_attention_with_sink(q, kv, idx, sink, 1.0)
    e1, e2, es = math.exp(1.0), math.exp(-0.5), math.exp(0.25)
    p1, p2 = e1 / (e1 + e2 + es), e2 / (e1 + e2 + es)
    row0 = torch.tensor([p1 * 1 + p2 * -0.5, p1 * 1, p2 * 2, 0.0], dtype=torch.float64)
    d1, d2 = e1 / (e1 + 2 * e2 + es), e2 / (e1 + 2 * e2 + es)
    row2 = torch.tensor([d1 - 2 * d2 * 0.5, d1, 2 * d2 * 2, 0.0], dtype=torch.float64)
    assert o.dtype == torch.bfloat16 and o.shape == (3, 1, 4)
    assert_within(o[0, 0], row0, bf16_ulp(row0), "two candidates + sink")
    assert torch.equal(o[1], torch.zeros(1, 4, dtype=torch.bfloat16))      # no candidate: the sink takes all
    assert_within(o[2, 0], row2, bf16_ulp(row2), "duplicate candidate counted twice")


def test_sink_limits():
    g = torch.Generator().manual_seed(1)
    q = unit_rms((6, 2, 8), g)
    kv = unit_rms((5, 8), g)
    idx = torch.tensor([[0, 1, 2, 3, 4]] * 5 + [[-1] * 5])
    o = sparse_attention_with_sink(q, kv, idx, torch.full((2,), float("-inf")), 0.5)
    p = torch.softmax(torch.einsum("thd,nd->thn", q.double(), kv.double()) * 0.5, -1)
    ref = torch.einsum("thn,nd->thd", p, kv.double())
    assert_within(o[:5], ref[:5], bf16_ulp(ref[:5]) + ABS_FLOOR, "sink -inf = plain softmax")
    assert torch.equal(o[5], torch.zeros_like(o[5]))                     # nothing at all: 0, not NaN
    big = sparse_attention_with_sink(q, kv, idx, torch.full((2,), 40.0), 0.5)
    assert float(big.float().abs().max()) < 1e-12                        # mass e^-40-ish left to the keys


def test_sparse_matches_dense_count_matrix_fp64():
    """Gather form vs a dense form where p is weighted by how often each kv row is listed."""
    g = torch.Generator().manual_seed(2)
    T, N, M = 40, 70, 24
    q, kv = unit_rms((T, H, HD), g), unit_rms((N, HD), g)
    idx = torch.randint(-1, N, (T, M), generator=g)
    idx[::7] = -1                                                          # some empty rows
    sink = torch.randn(H, generator=g)
    o = sparse_attention_with_sink(q, kv, idx, sink, HD ** -0.5)
    count = torch.zeros(T, N, dtype=torch.float64)
    for t in range(T):
        for u in idx[t].tolist():
            if u >= 0:
                count[t, u] += 1
    logits = torch.einsum("thd,nd->thn", q.double(), kv.double()) * HD ** -0.5
    e = count[:, None, :] * torch.exp(logits)
    ref = torch.einsum("thn,nd->thd", e, kv.double()) / (e.sum(-1, keepdim=True) + torch.exp(sink.double())[None, :, None])
    assert_within(o, ref, bf16_ulp(ref) + ABS_FLOOR, "sparse vs dense")


# ---- output projection ----------------------------------------------------------------------------
def output_oracle(o64: torch.Tensor, pos, inv, wo_a, wo_b, G):
    """Per-group loop in float64; returns (out, z, |o_rot|-propagated magnitude of z)."""
    T, Hh, d = o64.shape
    orot = rope64(o64, pos, inv, inverse=True)
    hpg, ol = Hh // G, wo_a.shape[0] // G
    zs, mags = [], []
    for g in range(G):
        og = orot[:, g * hpg:(g + 1) * hpg].reshape(T, -1)
        wa = wo_a[g * ol:(g + 1) * ol].double()
        zs.append(og @ wa.T)
        mags.append(og.abs() @ wa.abs().T)
    z, zmag = torch.cat(zs, 1), torch.cat(mags, 1)
    return z @ wo_b.double().T, z, zmag


def out_bound(z, zmag_o_err, wo_b, out):
    """Error of out = bf16(bf16(z) @ wo_b.T): z's own error, its bf16 rounding (2^-8 |z|), the output rounding."""
    return (zmag_o_err + 2.0 ** -8 * z.abs()) @ wo_b.double().abs().T + bf16_ulp(out) + ABS_FLOOR


def test_attention_output_matches_group_loop():
    g = torch.Generator().manual_seed(3)
    T, p = 40, PARAMS[2]
    o = unit_rms((T, H, HD), g)
    pos = torch.arange(T) * 37                                            # arbitrary positions
    inv = layer_inv_freq(CFG, 2)
    out = attention_output(o, pos, inv, p.wo_a, p.wo_b, CFG.o_groups)
    assert out.dtype == torch.bfloat16 and out.shape == (T, D)
    ref, z, _ = output_oracle(o.double(), pos, inv, p.wo_a, p.wo_b, CFG.o_groups)
    assert_within(out, ref, out_bound(z, 0.0, p.wo_b, ref), "grouped output")
    assert float((out.double() - ref).norm() / ref.norm()) < 2.0 ** -7   # typical error ~2^-9 relative


def test_inverse_rope_undoes_the_query_rotation_on_the_last_dims():
    g = torch.Generator().manual_seed(4)
    T, p, inv = 30, PARAMS[0], layer_inv_freq(CFG, 0)
    o = unit_rms((T, H, HD), g).float()
    pos = torch.arange(T) + 1000
    rotated = rope64(o, pos, inv).float()                                 # the query's forward rotation
    a = attention_output(rotated, pos, inv, p.wo_a, p.wo_b, CFG.o_groups)
    b = attention_output(o, pos, torch.zeros_like(inv), p.wo_a, p.wo_b, CFG.o_groups)   # no rotation at all
    ref, z, _ = output_oracle(o.double(), pos, torch.zeros_like(inv), p.wo_a, p.wo_b, CFG.o_groups)
    bound = out_bound(z, 0.0, p.wo_b, ref)
    assert_within(a, ref, bound, "inverse rope of rotated o")
    assert_within(b, ref, bound, "unrotated o")
    # rotating the nope dims instead would break it: perturb a nope channel, the output must change
    o2 = o.clone()
    o2[:, :, 0] += 1.0
    assert not torch.equal(attention_output(o2, pos, inv, p.wo_a, p.wo_b, CFG.o_groups), b)


# ---- q / kv paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1])
def test_rope_only_on_the_last_64_dims_of_q_and_kv(layer):
    T, p = 20, PARAMS[layer]
    x, pos = inputs(T, 5)
    inv = layer_inv_freq(CFG, layer)
    zero = torch.zeros_like(inv)
    _, q = query_path(x, pos, p, CFG, inv)
    _, q0 = query_path(x, pos, p, CFG, zero)
    kv, kv0 = kv_path(x, pos, p, CFG, inv), kv_path(x, pos, p, CFG, zero)
    assert torch.equal(q[..., :NOPE], q0[..., :NOPE]) and torch.equal(kv[:, :NOPE], kv0[:, :NOPE])
    assert torch.equal(q[0], q0[0]) and torch.equal(kv[0], kv0[0])        # position 0: angle 0
    assert bool((q[1:, :, NOPE:] != q0[1:, :, NOPE:]).any(-1).all())
    assert bool((kv[1:, NOPE:] != kv0[1:, NOPE:]).any(-1).all())
    # q0 / kv0 are bf16 roundings (<= 2^-8 relative) of what the reference rotates, plus its own rounding
    ref_q, ref_kv = rope64(q0, pos, inv), rope64(kv0, pos, inv)
    assert_within(q, ref_q, 2.0 ** -8 * pair_mag(q0) + bf16_ulp(ref_q) + ABS_FLOOR, "q rotation")
    assert_within(kv, ref_kv, 2.0 ** -8 * pair_mag(kv0) + bf16_ulp(ref_kv) + ABS_FLOOR, "kv rotation")


def test_q_heads_have_unit_rms_and_kv_nope_is_fp8():
    T, p, inv = 16, PARAMS[2], layer_inv_freq(CFG, 2)
    x, pos = inputs(T, 6)
    _, q = query_path(x, pos, p, CFG, inv)
    rms = q.double().pow(2).mean(-1).sqrt()                               # rotation keeps the norm
    assert_within(rms, torch.ones_like(rms), 2.0 ** -7, "per-head q rms")
    kv = kv_path(x, pos, p, CFG, inv)
    plain = kv_path(x, pos, p, CFG, inv, fp8_kv=False)
    assert torch.equal(kv[:, NOPE:], plain[:, NOPE:])
    assert torch.equal(kv[:, :NOPE], fp8_roundtrip(plain[:, :NOPE], 64))
    assert not torch.equal(kv, plain)


# ---- the prefill vs a dense float64 formulation ----------------------------------------------------
def dense_mask(T: int, layer: int, sel: torch.Tensor | None) -> torch.Tensor:
    """[T, T + T//r] bool from the rules: window (t-W, t]; HCA entries j < (t+1)//128; CSA: the indexer's sel."""
    r = CFG.compress_ratio(layer)
    n = T // r if r else 0
    t = torch.arange(T)[:, None]
    mask = torch.zeros(T, T + n, dtype=torch.bool)
    s = torch.arange(T)[None, :]
    mask[:, :T] = (s <= t) & (s > t - W)
    if r == 128:
        mask[:, T:] = torch.arange(n)[None, :] < (t + 1) // r
    if r == 4:
        for row in range(T):
            chosen = sel[row][sel[row] >= 0]
            mask[row, T + chosen] = True
    return mask


@pytest.mark.parametrize("layer", [0, 1, 2], ids=lambda l: KINDS[l])
def test_prefill_matches_dense_masked_softmax_fp64(layer):
    T = 260
    x, pos = inputs(T, 10 + layer)
    p, inv = PARAMS[layer], layer_inv_freq(CFG, layer)
    parts = attention_prefill_parts(x, pos, p, CFG, layer)
    assert parts.out.dtype == torch.bfloat16 and parts.out.shape == (T, D)
    assert torch.equal(attention_prefill(x, pos, p, CFG, layer), parts.out)
    mask = dense_mask(T, layer, parts.sel)
    if layer == 1:      # CSA: while (t+1)//4 <= K_I the indexer keeps every causal entry, later exactly K_I
        causal = torch.arange(T // 4)[None, :] < (torch.arange(T)[:, None] + 1) // 4
        assert torch.equal(mask[:131, T:], causal[:131])
        assert bool((mask[131:, T:].sum(1) == CFG.index_topk).all())
    keys = parts.kv.double() if parts.entries is None else torch.cat([parts.kv, parts.entries]).double()
    logits = torch.einsum("thd,nd->thn", parts.q.double(), keys) * HD ** -0.5
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    sink = p.attn_sink.double()[None, :, None]
    m = torch.maximum(logits.amax(-1, keepdim=True), sink)
    e = torch.exp(logits - m)
    o64 = torch.einsum("thn,nd->thd", e, keys) / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
    assert_within(parts.o, o64, bf16_ulp(o64) + ABS_FLOOR, "attention core")

    ref, z, _ = output_oracle(o64, pos, inv, p.wo_a, p.wo_b, CFG.o_groups)
    # o is stored bf16 (<= 2^-8 relative per element; the inverse rotation mixes a pair: use |o_e| + |o_o|)
    omag = pair_mag(o64)
    _, _, zmag = output_oracle(omag, pos, torch.zeros_like(inv), p.wo_a.abs(), p.wo_b, CFG.o_groups)
    assert_within(parts.out, ref, out_bound(z, 2.0 ** -8 * zmag, p.wo_b, ref), "attention output")
    assert float((parts.out.double() - ref).norm() / ref.norm()) < 2.0 ** -7


# ---- causality and visibility ---------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, 2], ids=lambda l: KINDS[l])
@pytest.mark.parametrize("t0", [126, 131])
def test_causal_outputs_ignore_later_tokens(layer, t0):
    T = 200
    x, pos = inputs(T, 20)
    out = attention_prefill(x, pos, PARAMS[layer], CFG, layer)
    x2 = x.clone()
    x2[t0 + 1:] = unit_rms((T - t0 - 1, D), torch.Generator().manual_seed(21))
    out2 = attention_prefill(x2, pos, PARAMS[layer], CFG, layer)
    assert torch.equal(out2[: t0 + 1], out[: t0 + 1])
    assert not torch.equal(out2[t0 + 1:], out[t0 + 1:])


@pytest.mark.parametrize("layer,T,s,expect", [
    (0, 100, 20, set(range(20, 20 + W))),                         # window only: rows s .. s+W-1
    (2, 200, 10, set(range(10, 10 + W)) | set(range(127, 200))),  # + HCA entry 0 from t = 127 on
    (2, 300, 130, set(range(130, 130 + W)) | set(range(255, 300))),  # entry 1 (block 128..255) from t = 255
    (1, 130, 5, set(range(5, 130))),   # CSA: window to 36, entries 1, 2 from t = 7 on (all kept while t < 131)
], ids=["window", "hca-entry0", "hca-entry1", "csa"])
def test_token_reaches_exactly_window_rows_and_rows_after_its_block(layer, T, s, expect):
    x, pos = inputs(T, 30)
    out = attention_prefill(x, pos, PARAMS[layer], CFG, layer)
    x2 = x.clone()
    x2[s] = unit_rms((D,), torch.Generator().manual_seed(31))
    changed = (attention_prefill(x2, pos, PARAMS[layer], CFG, layer) != out).any(dim=1)
    assert set(torch.nonzero(changed).flatten().tolist()) == expect


def test_window_indices_rows():
    idx = window_indices(40, W)
    assert idx.shape == (40, W)
    for t in range(40):
        row = idx[t].tolist()
        lo = max(0, t - W + 1)
        assert row[: t - lo + 1] == list(range(lo, t + 1)) and all(v == -1 for v in row[t - lo + 1:])


def test_fp8_kv_switch():
    x, pos = inputs(64, 40)
    a = attention_prefill_parts(x, pos, PARAMS[1], CFG, 1, fp8_kv=True)
    b = attention_prefill_parts(x, pos, PARAMS[1], CFG, 1, fp8_kv=False)
    assert torch.equal(a.kv[:, :NOPE], fp8_roundtrip(b.kv[:, :NOPE], 64))
    assert torch.equal(a.entries[:, :NOPE], fp8_roundtrip(b.entries[:, :NOPE], 64))
    assert torch.equal(a.kv[:, NOPE:], b.kv[:, NOPE:]) and torch.equal(a.entries[:, NOPE:], b.entries[:, NOPE:])
    assert not torch.equal(a.out, b.out)


def test_window_layer_accepts_any_positions_and_t0():
    x, pos = inputs(24, 41)
    out = attention_prefill(x, pos + 500, PARAMS[0], CFG, 0)
    assert out.shape == (24, D)
    # RoPE is relative: shifting every position leaves the logits and the inversely rotated output unchanged
    # up to the bf16 storage of the rotated q and kv (a few 2^-9 relative)
    ref = attention_prefill(x, pos, PARAMS[0], CFG, 0).double()
    assert float((out.double() - ref).norm() / ref.norm()) < 2.0 ** -6
    for layer in KINDS:
        empty = attention_prefill(x[:0], pos[:0], PARAMS[layer], CFG, layer)
        assert empty.shape == (0, D) and empty.dtype == torch.bfloat16


# ---- parameters and the module --------------------------------------------------------------------
def test_params_shapes_names_and_scales():
    for layer, kind in KINDS.items():
        sd = PARAMS[layer].state_dict()
        specs = param_specs(CFG, layer)
        assert set(sd) == set(specs)
        for name, (shape, dtype, _) in specs.items():
            assert sd[name].shape == shape and sd[name].dtype == dtype, name
        assert ("compressor.ape" in sd) == (kind != "window")
        assert ("indexer.wq_b.weight" in sd) == (kind == "csa")
    sd = PARAMS[1].state_dict()
    assert sd["compressor.wkv.weight"].shape == (2 * HD, D) and sd["compressor.ape"].shape == (4, 2 * HD)
    assert PARAMS[2].state_dict()["compressor.ape"].shape == (128, HD)
    w = sd["wq_b.weight"].double()
    assert abs(float(w.std()) * math.sqrt(w.shape[1]) - 1) < 0.05        # N(0, 1/in_features)
    assert AttentionParams.from_state_dict(sd).state_dict().keys() == sd.keys()


def test_init_is_deterministic_per_seed_and_layer():
    a = init_attention_params(CFG, 1, seed=5).state_dict()
    b = init_attention_params(CFG, 1, seed=5).state_dict()
    c = init_attention_params(CFG, 3, seed=5).state_dict()               # another CSA layer
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wq_a.weight"], c["wq_a.weight"])


def test_quantize_weights_fp8_touches_only_fp8_weights_and_is_idempotent():
    q = quantize_weights_fp8(PARAMS[1])
    qq = quantize_weights_fp8(q)
    sd, qsd = PARAMS[1].state_dict(), q.state_dict()
    for name in sd:
        fp8 = name in ("wq_a.weight", "wkv.weight", "wq_b.weight", "wo_a.weight", "wo_b.weight", "indexer.wq_b.weight")
        assert torch.equal(qsd[name], sd[name]) != fp8, name
        assert torch.equal(qq.state_dict()[name], qsd[name]), name


@pytest.mark.parametrize("layer", [0, 1, 2], ids=lambda l: KINDS[l])
def test_module_forward_is_the_reference(layer):
    mod = DSv4Attention(CFG, layer, seed=7)
    assert mod.kind == KINDS[layer]
    assert set(mod.state_dict()) == set(param_specs(CFG, layer))
    assert not any(p.requires_grad for p in mod.parameters())
    x, pos = inputs(64, 50)
    out = mod(x, pos)
    assert torch.equal(out, attention_prefill(x, pos, PARAMS[layer], CFG, layer))
    # loading other weights through state_dict changes the forward accordingly
    other = init_attention_params(CFG, layer, seed=8)
    mod.load_state_dict(other.state_dict())
    assert torch.equal(mod(x, pos), attention_prefill(x, pos, other, CFG, layer))
    assert torch.equal(DSv4Attention(CFG, layer, seed=7, fp8_kv=False)(x, pos),
                       attention_prefill(x, pos, PARAMS[layer], CFG, layer, fp8_kv=False))
    fp8w = DSv4Attention(CFG, layer, seed=7, fp8_weights=True)
    assert torch.equal(fp8w(x, pos), attention_prefill(x, pos, quantize_weights_fp8(PARAMS[layer]), CFG, layer))


def test_module_default_interface_and_backend_choice():
    mod = DSv4Attention(CFG, 2)                                           # how the decoder layer builds it
    x, pos = inputs(130, 51)
    assert mod(x, pos).shape == (130, D)
    with pytest.raises(ValueError, match="backend"):
        DSv4Attention(CFG, 0, backend="cutlass")
    with pytest.raises(ValueError, match="layer"):
        DSv4Attention(CFG, 99)


def test_registered():
    assert registry.get("sparse_attention") is sparse_attention_with_sink
    assert registry.get("attention_output") is attention_output
    assert registry.get("attention_prefill") is attention_prefill


# ---- input contracts ------------------------------------------------------------------------------
def test_prefill_bad_inputs_name_the_argument():
    x, pos = inputs(16, 60)
    p = PARAMS[1]
    cases = [
        (ValueError, "positions", (x, pos[:-1], p, CFG, 1)),
        (TypeError, "positions", (x, pos.float(), p, CFG, 1)),
        (ValueError, "positions", (x, pos + 3, p, CFG, 1)),               # compressed layers: 0..T-1
        (ValueError, "x", (x[None], pos, p, CFG, 1)),
        (ValueError, "x", (x[:, :128], pos, p, CFG, 1)),
        (TypeError, "x", (x.to(torch.int32), pos, p, CFG, 1)),
        (ValueError, "layer", (x, pos, p, CFG, 17)),
        (TypeError, "cfg", (x, pos, p, "toy", 1)),
        (ValueError, "params", (x, pos, PARAMS[0], CFG, 1)),              # window params for a CSA layer
        (ValueError, r"params\.wq_b", (x, pos, p.map(lambda n, t: t[:-1] if n == "wq_b.weight" else t), CFG, 1)),
        (TypeError, "params", (x, pos, p.state_dict(), CFG, 1)),
    ]
    for exc, name, args in cases:
        with pytest.raises(exc, match=name):
            attention_prefill(*args)


def test_core_and_output_bad_inputs_name_the_argument():
    g = torch.Generator().manual_seed(61)
    q, kv = unit_rms((4, H, HD), g), unit_rms((6, HD), g)
    idx, sink = torch.zeros(4, 3, dtype=torch.int64), torch.zeros(H)
    with pytest.raises(ValueError, match="idx"):
        sparse_attention_with_sink(q, kv, idx + 6, sink, 1.0)
    with pytest.raises(ValueError, match="idx"):
        sparse_attention_with_sink(q, kv, idx - 2, sink, 1.0)
    with pytest.raises(TypeError, match="idx"):
        sparse_attention_with_sink(q, kv, idx.float(), sink, 1.0)
    with pytest.raises(ValueError, match="sink"):
        sparse_attention_with_sink(q, kv, idx, sink[:1], 1.0)
    with pytest.raises(ValueError, match="kv"):
        sparse_attention_with_sink(q, kv[:, :64], idx, sink, 1.0)
    with pytest.raises(ValueError, match="q"):
        sparse_attention_with_sink(q[0], kv, idx, sink, 1.0)
    p, inv, pos = PARAMS[0], layer_inv_freq(CFG, 0), torch.arange(4)
    with pytest.raises(ValueError, match="o_groups"):
        attention_output(q, pos, inv, p.wo_a, p.wo_b, 3)
    with pytest.raises(ValueError, match="wo_a"):
        attention_output(q, pos, inv, p.wo_a[:, :128], p.wo_b, 2)
    with pytest.raises(ValueError, match="wo_b"):
        attention_output(q, pos, inv, p.wo_a, p.wo_b[:, :128], 2)
    with pytest.raises(ValueError, match="positions"):
        attention_output(q, pos[:2], inv, p.wo_a, p.wo_b, 2)
    with pytest.raises(ValueError, match="inv_freq"):
        attention_output(q, pos, torch.ones(65), p.wo_a, p.wo_b, 2)
