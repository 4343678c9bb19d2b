"""Lightning indexer reference (dsv4-layers.md 3.5): logits vs a float64 oracle, top-k vs an argsort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _attn_oracles import assert_within, rope64, unit_rms
from dsv4lab import get_config
from dsv4lab.kernels import registry
from dsv4lab.kernels.reference.attention import init_attention_params
from dsv4lab.kernels.reference.compressor import compress
from dsv4lab.kernels.reference.indexer import indexer_topk
from dsv4lab.rope import layer_inv_freq

CFG = get_config("toy")
LAYER = 1                                  # toy layer 1 is CSA
INV = layer_inv_freq(CFG, LAYER)
K_I = CFG.index_topk                       # 32
P = init_attention_params(CFG, LAYER, seed=3).indexer


def make(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return unit_rms((T, CFG.hidden_size), g), unit_rms((T, CFG.q_lora_rank), g), torch.arange(T)


def run(x, qr, pos, topk=K_I, inv=INV):
    c = P.compressor
    return indexer_topk(x, qr, pos, P.wq_b, P.weights_proj, c.wkv, c.wgate, c.ape, c.norm_weight, inv, topk)


def oracle(x, qr, pos):
    """float64 logits (no bf16 storage of q / w) and the per-element error bound of the bf16 storage."""
    c = P.compressor
    keys = compress(x, c.wkv, c.wgate, c.ape, c.norm_weight, 4, INV, head_dim=CFG.index_head_dim).double()
    n_i, d_i = CFG.index_n_heads, CFG.index_head_dim
    q = rope64((qr.double() @ P.wq_b.double().T).view(-1, n_i, d_i), pos, INV)
    w = (x.double() @ P.weights_proj.double().T) * d_i ** -0.5 * n_i ** -0.5
    dots = torch.einsum("thd,jd->thj", q, keys)
    logits = (dots.clamp(min=0) * w[:, :, None]).sum(1)
    # The reference stores q (after the GEMM and after RoPE) and w in bf16: three relative roundings of at most
    # 2^-8 each; relu is 1-Lipschitz, so |err| <= 3 * 2^-8 * sum_h |w_h| sum_i |q_hi k_ji| (+ fp32 noise).
    mag = torch.einsum("thd,jd->thj", q.abs(), keys.abs())
    bound = 2.0 ** -6 * (mag * w.abs()[:, :, None]).sum(1) + 1e-5
    T = x.shape[0]
    invalid = torch.arange(T // 4)[None, :] >= ((torch.arange(T) + 1) // 4)[:, None]
    return logits.masked_fill(invalid, float("-inf")), bound, invalid


def test_logits_match_fp64_oracle_and_mask():
    T = 200
    x, qr, pos = make(T)
    sel, logits = run(x, qr, pos)
    assert sel.dtype == torch.int64 and sel.shape == (T, K_I)
    assert logits.dtype == torch.float32 and logits.shape == (T, T // 4)
    ref, bound, invalid = oracle(x, qr, pos)
    assert torch.equal(torch.isneginf(logits), invalid)                 # -inf exactly where j >= (t+1)//4
    assert bool(torch.isfinite(logits[~invalid]).all())
    assert_within(logits[~invalid], ref[~invalid], bound[~invalid], "indexer logits")
    assert float(ref[~invalid].abs().max()) > 0.1                     # non-trivial logits
    # the worst-case bound is loose; on average bf16 storage of q and w costs ~2^-9 relative RMS (measured
    # ~2^-8.6 here), so a 2^-7 bar is tight enough to catch a wrong scale, rotation or head reduction
    err = (logits[~invalid].double() - ref[~invalid])
    assert float(err.norm() / ref[~invalid].norm()) < 2.0 ** -7


def test_selection_is_the_stable_argsort_of_the_valid_prefix():
    T = 200
    x, qr, pos = make(T, seed=1)
    sel, logits = run(x, qr, pos)
    for t in range(T):
        nv = (t + 1) // 4
        k = min(K_I, nv)
        order = np.argsort(-logits[t, :nv].numpy(), kind="stable")[:k]   # descending, ties: lower index first
        assert sel[t, :k].tolist() == order.tolist(), f"row {t}"
        assert bool((sel[t, k:] == -1).all()), f"row {t}: unused slots must be -1"
    assert bool((sel[131:] >= 0).all())             # from t = 131 on, 32 < (t+1)//4 valid entries: pruning


def test_selection_agrees_with_fp64_oracle_up_to_its_error_bound():
    T = 260
    x, qr, pos = make(T, seed=2)
    sel, _ = run(x, qr, pos)
    ref, bound, _ = oracle(x, qr, pos)
    pruned = 0
    for t in range(4 * K_I + 3, T):                 # rows with more valid entries than K_I
        nv = (t + 1) // 4
        chosen = torch.zeros(nv, dtype=torch.bool)
        chosen[sel[t]] = True
        slack = 2 * float(bound[t, :nv].max())
        assert float(ref[t, :nv][chosen].min()) >= float(ref[t, :nv][~chosen].max()) - slack, f"row {t}"
        pruned += int((~chosen).sum())
    assert pruned > 0


def test_short_rows_get_all_valid_entries_then_minus_one():
    T = 41                                           # 10 entries < K_I
    x, qr, pos = make(T, seed=4)
    sel, logits = run(x, qr, pos)
    assert logits.shape == (T, 10)
    for t in range(T):
        nv = (t + 1) // 4
        assert sorted(sel[t, :nv].tolist()) == list(range(nv))
        assert bool((sel[t, nv:] == -1).all())
    assert bool((sel[:3] == -1).all())               # tokens 0..2: no complete block yet
    sel3, logits3 = run(x[:3], qr[:3], pos[:3])
    assert logits3.shape == (3, 0) and bool((sel3 == -1).all())
    sel0, logits0 = run(x[:0], qr[:0], pos[:0])
    assert sel0.shape == (0, K_I) and logits0.shape == (0, 0)


def test_topk_larger_than_entries_and_small_topk():
    T = 64
    x, qr, pos = make(T, seed=5)
    sel_big, logits = run(x, qr, pos, topk=100)
    assert sel_big.shape == (T, 100) and bool((sel_big[:, 16:] == -1).all())
    sel_small, _ = run(x, qr, pos, topk=3)
    assert torch.equal(sel_small, sel_big[:, :3])    # the same ranking, truncated


@pytest.mark.parametrize("t0", [126, 130, 131])
def test_causal_rows_ignore_later_tokens(t0):
    T = 180
    x, qr, pos = make(T, seed=6)
    sel, logits = run(x, qr, pos)
    x2, qr2 = x.clone(), qr.clone()
    g = torch.Generator().manual_seed(99)
    x2[t0 + 1:] = unit_rms((T - t0 - 1, x.shape[1]), g)
    qr2[t0 + 1:] = unit_rms((T - t0 - 1, qr.shape[1]), g)
    sel2, logits2 = run(x2, qr2, pos)
    assert torch.equal(logits2[: t0 + 1], logits[: t0 + 1])
    assert torch.equal(sel2[: t0 + 1], sel[: t0 + 1])
    assert not torch.equal(logits2[t0 + 1:], logits[t0 + 1:])


def test_registered():
    assert registry.get("indexer_topk", "reference") is indexer_topk


BAD = [
    ("positions", lambda a: {"pos": a["pos"] + 1}, ValueError),             # not a prefill from 0
    ("positions", lambda a: {"pos": a["pos"].float()}, TypeError),
    ("positions", lambda a: {"pos": a["pos"][:-1]}, ValueError),
    ("qr", lambda a: {"qr": a["qr"][:-1]}, ValueError),
    ("x", lambda a: {"x": a["x"].to(torch.int64)}, TypeError),
    ("topk", lambda a: {"topk": 0}, ValueError),
    ("inv_freq", lambda a: {"inv": torch.ones(65)}, ValueError),
]


@pytest.mark.parametrize("name,change,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_argument(name, change, exc):
    x, qr, pos = make(16)
    args = dict(x=x, qr=qr, pos=pos, topk=K_I, inv=INV)
    args.update(change(args))
    with pytest.raises(exc, match=name):
        run(**args)


def test_bad_weight_shapes_name_the_argument():
    x, qr, pos = make(16)
    c = P.compressor
    with pytest.raises(ValueError, match="wq_b"):
        indexer_topk(x, qr, pos, P.wq_b[:-1], P.weights_proj, c.wkv, c.wgate, c.ape, c.norm_weight, INV, K_I)
    with pytest.raises(ValueError, match="weights_proj"):
        indexer_topk(x, qr, pos, P.wq_b, P.weights_proj[:, 1:], c.wkv, c.wgate, c.ape, c.norm_weight, INV, K_I)
    with pytest.raises(ValueError, match="comp_ape"):
        indexer_topk(x, qr, pos, P.wq_b, P.weights_proj, c.wkv, c.wgate, c.ape[:, :128], c.norm_weight, INV, K_I)
