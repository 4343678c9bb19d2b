"""lab.viz: the data behind each chart (hand cases, the references, brute-force reformulations) and that each
figure draws exactly that data."""
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from dsv4lab.kernels.reference.attention import causal_entry_indices, window_indices
from dsv4lab.kernels.reference.mhc import sinkhorn
from dsv4lab.lab import viz

pytest.importorskip("plotly")


def test_importing_viz_does_not_import_plotly():
    code = "import sys, dsv4lab.lab.viz; assert 'plotly' not in sys.modules, 'plotly imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_describe_hand_case():
    x = torch.tensor([[1.0, 2.0], [3.0, float("-inf")]])
    d = viz.describe(x=x, ids=torch.tensor([5, 7]), missing=None, head=3)
    assert d.loc["x", "shape"] == "[2, 2]" and d.loc["x", "dtype"] == "float32"
    assert (d.loc["x", "mean"], d.loc["x", "min"], d.loc["x", "max"], d.loc["x", "nonfinite"]) == (2.0, 1.0, 3.0, 1)
    assert d.loc["x", "std"] == pytest.approx(1.0) and d.loc["x", "first"] == "1, 2, 3"
    assert d.loc["ids", "mean"] == 6.0 and d.loc["ids", "dtype"] == "int64"
    assert d.loc["missing", "shape"] == "(absent)"


# ---- Sinkhorn ---------------------------------------------------------------------------------------
def test_sinkhorn_passes_reproduce_the_reference_bitwise():
    logits = torch.randn(5, 4, 4) * 2
    cols = [c for _, kind, c in viz.sinkhorn_passes(logits, 7) if kind == "column"]
    assert len(cols) == 7
    for i, c in enumerate(cols, start=1):
        assert torch.equal(c, sinkhorn(logits, i, 1e-6)), f"column pass of iteration {i}"


def test_sinkhorn_history_errors():
    logits = torch.randn(8, 4, 4) * 3
    h = viz.sinkhorn_history(logits, iters=20)
    assert len(h) == 40 and list(h["pass"][:3]) == ["row", "column", "row"]
    # a column pass leaves column sums S/(S+eps), S = the sums before it: error eps/(S+eps), plus fp32 rounding of
    # the 4 quotients and of the sum (a few ulps of 1, < 1e-6)
    states = [c for _, _, c in viz.sinkhorn_passes(logits, 20)]
    for step in range(1, 40, 2):
        s = states[step - 1].double().sum(-2)
        assert h.col_err[step] == pytest.approx(float((1e-6 / (s + 1e-6)).max()), abs=1e-6)
    # the row error after the last column pass is what Sinkhorn leaves; it shrinks from the first iteration
    assert h.row_err.iloc[-1] < 0.1 * h.row_err.iloc[1]
    # fp64 sums of the final matrix agree with the last row of the history
    c = sinkhorn(logits, 20, 1e-6).double()
    assert h.row_err.iloc[-1] == pytest.approx(float((c.sum(-1) - 1).abs().max()))


def test_sinkhorn_passes_reject_bad_input():
    with pytest.raises(ValueError, match="logits"):
        next(viz.sinkhorn_passes(torch.randn(3, 4), 2))
    with pytest.raises(ValueError, match="iters"):
        next(viz.sinkhorn_passes(torch.randn(4, 4), 0))


def test_sinkhorn_figure_draws_the_history():
    h = viz.sinkhorn_history(torch.randn(2, 4, 4), iters=3)
    fig = viz.sinkhorn_figure(h, eps=1e-6)
    assert [t.name for t in fig.data] == ["rows (after the column pass)", "columns (after the row pass)"]
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == pytest.approx(h.row_err[1::2].tolist())
    assert list(fig.data[1].y) == pytest.approx(h.col_err[0::2].tolist())
    assert fig.layout.yaxis.type == "log"


def test_mix_heatmaps_shows_the_chosen_token():
    t, n = 6, 4
    pre, post = torch.rand(t, n), 2 * torch.rand(t, n)
    comb = sinkhorn(torch.randn(t, n, n))
    fig = viz.mix_heatmaps(pre, post, comb, token=3)
    assert torch.equal(torch.tensor(fig.data[0].z), pre) and torch.equal(torch.tensor(fig.data[1].z), post)
    assert torch.equal(torch.tensor(fig.data[2].z), comb[3])
    with pytest.raises(ValueError, match="token"):
        viz.mix_heatmaps(pre, post, comb, token=6)


# ---- attention index sets ---------------------------------------------------------------------------
def test_attention_sets_window_hand_case():
    expected = torch.tensor([[4, 0, 0, 0], [4, 4, 0, 0], [1, 4, 4, 0], [1, 1, 4, 4]], dtype=torch.uint8)
    assert torch.equal(viz.attention_sets(4, 2), expected)


def test_attention_sets_compressed_hand_case():
    # ratio 2: entry j pools tokens 2j, 2j+1 and is visible to t iff j < (t+1)//2; window W = 1 (the token itself)
    sel = torch.tensor([[-1, -1], [0, -1], [0, -1], [1, -1], [-1, -1], [2, 0]])
    expected = torch.tensor([[4, 0, 0, 0, 0, 0],
                             [3, 5, 0, 0, 0, 0],
                             [3, 3, 4, 0, 0, 0],
                             [2, 2, 3, 5, 0, 0],
                             [2, 2, 2, 2, 4, 0],
                             [3, 3, 2, 2, 3, 5]], dtype=torch.uint8)
    assert torch.equal(viz.attention_sets(6, 1, 2, sel), expected)


def _sets_by_loops(T, window, ratio, sel):
    codes = torch.zeros(T, T, dtype=torch.uint8)
    for t in range(T):
        chosen = {int(j) for j in sel[t] if j >= 0} if ratio else set()
        for s in range(T):
            if s > t:
                continue
            j = s // ratio if ratio else None
            visible = ratio and j < (t + 1) // ratio
            attended = visible and j in chosen
            win = t - window < s <= t
            codes[t, s] = 5 if win and attended else 4 if win else 3 if attended else 2 if visible else 1
    return codes


@pytest.mark.parametrize("T,window,ratio", [(23, 5, 4), (40, 7, 8), (9, 3, 0), (3, 2, 4)])
def test_attention_sets_match_a_loop_reformulation(T, window, ratio):
    n = T // ratio if ratio else 0
    sel = None
    if ratio:   # random valid selections: some visible entries per query, -1 padding
        k = max(1, n)
        sel = torch.full((T, k), -1)
        for t in range(T):
            vis = (t + 1) // ratio
            if vis:
                pick = torch.randperm(vis)[: torch.randint(0, vis + 1, ()).item()]
                sel[t, : len(pick)] = pick
    assert torch.equal(viz.attention_sets(T, window, ratio, sel), _sets_by_loops(T, window, ratio, sel))


def test_attention_sets_agree_with_the_reference_index_lists():
    T, W, r = 300, 32, 128
    codes = viz.attention_sets(T, W, r, causal_entry_indices(T, r))
    win = window_indices(T, W)
    for t in range(T):
        assert set(torch.nonzero(codes[t] >= 4).flatten().tolist()) == {int(s) for s in win[t] if s >= 0}
    assert not (codes == 2).any()                       # HCA attends every visible entry
    # t = 254: entry 0 (tokens 0..127) attended, window 223..254, the 95 tokens between not attended
    assert [(codes[254] == c).sum().item() for c in (1, 3, 4, 5)] == [95, 128, 32, 0]
    # t = 255: entry 1 completes; every token 0..255 is in an entry, the last 32 also in the window
    assert [(codes[255] == c).sum().item() for c in (1, 3, 4, 5)] == [0, 224, 0, 32]


def test_attention_sets_reject_bad_input():
    with pytest.raises(ValueError, match="sel"):
        viz.attention_sets(8, 2, 4)
    with pytest.raises(ValueError, match="sel"):
        viz.attention_sets(8, 2, 4, torch.tensor([[2]] * 8))       # T//4 = 2 entries: id 2 does not exist
    with pytest.raises(ValueError, match="window"):
        viz.attention_sets(8, 0)


def test_attention_sets_figure_draws_the_codes():
    codes = viz.attention_sets(6, 2)
    fig = viz.attention_sets_figure({"window": codes})
    assert torch.equal(torch.as_tensor(fig.data[0].z), codes)
    assert list(fig.data[0].colorbar.ticktext) == list(viz.SET_LABELS) and list(fig.data[0].colorbar.tickvals) == [
        0, 1, 2, 3, 4, 5]


def test_entry_scores_figure_marks_the_selection():
    logits = torch.tensor([[1.0, float("-inf")], [0.5, 2.0]])
    sel = torch.tensor([[0, -1], [1, 0]])
    fig = viz.entry_scores_figure(logits, sel)
    assert list(fig.data[1].x) == [0, 1, 0] and list(fig.data[1].y) == [0, 1, 1]
    assert torch.isnan(torch.tensor(fig.data[0].z, dtype=torch.float64)[0, 1])


def test_attention_mass_hand_case_and_reference():
    # one query, one head, two window keys with logits 0 and ln 2, one compressed key with logit ln 3, sink ln 4
    d = 2
    kv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[[2 ** 0.5 * math.log(2), 2 ** 0.5 * math.log(3)]]], dtype=torch.float64)
    idx = torch.tensor([[0, 1, 2, -1]])
    m = viz.attention_mass(q, kv, idx, torch.tensor([math.log(4)]), d ** -0.5, n_window=2)
    assert m.loc[0, ["window", "compressed", "sink"]].tolist() == pytest.approx([3 / 10, 3 / 10, 4 / 10])
    # mass-weighted output reproduces the reference core: o = (window + compressed part) of sum p K
    from dsv4lab.kernels.reference.attention import sparse_attention_with_sink
    T, H = 5, 3
    q, kv = torch.randn(T, H, 8), torch.randn(7, 8)
    idx = torch.randint(-1, 7, (T, 4))
    sink = torch.randn(H)
    m = viz.attention_mass(q, kv, idx, sink, 8 ** -0.5, n_window=3)
    assert (m[["window", "compressed", "sink"]].sum(axis=1) - 1).abs().max() < 1e-12
    ones = torch.ones(7, 8)        # with every value row = 1, o[t, h] = 1 - p_sink(t, h)
    o = sparse_attention_with_sink(q, ones, idx, sink, 8 ** -0.5).double()
    sink_only = viz.attention_mass(q, ones, idx, sink, 8 ** -0.5, n_window=3)   # logits use the same keys
    # o is bf16: |error| <= 2^-9 relative per head before the mean
    assert (1 - o[..., 0].mean(1)).tolist() == pytest.approx(sink_only.sink.tolist(), abs=2 ** -8)
    fig = viz.attention_mass_figure({"L": m})
    assert [t.name for t in fig.data] == ["window", "compressed", "sink"] and list(fig.data[2].y) == m.sink.tolist()


# ---- MoE -------------------------------------------------------------------------------------------
def test_expert_load_counts_every_slot():
    ids = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert viz.expert_load(ids, 5).tolist() == [2, 1, 0, 3, 0]
    with pytest.raises(ValueError, match="ids"):
        viz.expert_load(ids, 3)
    with pytest.raises(TypeError, match="ids"):
        viz.expert_load(ids.float(), 5)


def test_expert_load_and_router_figures():
    loads = {"hash": torch.tensor([3, 1]), "bias": torch.tensor([2, 2])}
    fig = viz.expert_load_figure(loads, ideal=2.0)
    assert [list(t.y) for t in fig.data] == [[3, 1], [2, 2]]
    s = torch.rand(3, 4)
    ids = torch.tensor([[0, 2], [1, 3], [2, 0]])
    fig = viz.router_scores_figure({"L0": s}, {"L0": ids})
    assert torch.equal(torch.tensor(fig.data[0].z), s)
    assert list(fig.data[1].x) == [0, 2, 1, 3, 2, 0] and list(fig.data[1].y) == [0, 0, 1, 1, 2, 2]


# ---- MTP -------------------------------------------------------------------------------------------
def test_row_rms_hand_case():
    assert viz.row_rms(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist() == pytest.approx([12.5 ** 0.5, 0.0])


def test_logit_agreement():
    a = torch.randn(4, 50)
    same = viz.logit_agreement(a, a.clone(), k=5)
    assert same.top1_equal.all() and (same.topk_overlap == 1).all() and (same.max_abs == 0).all()
    assert same.cosine.tolist() == pytest.approx([1.0] * 4)
    b = a.clone()
    b[0, a[0].argmax()] = a[0].min() - 1                    # row 0 loses its argmax from the top-5
    d = viz.logit_agreement(a, b, k=5)
    assert d.top1_equal.tolist() == [False, True, True, True]
    assert d.topk_overlap[0] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="k"):
        viz.logit_agreement(a, b, k=51)


def test_mtp_and_agreement_figures():
    pos = torch.tensor([0, 1, 2, 0])
    e = torch.randn(4, 8)
    e[pos == 0] = 0
    h = torch.randn(4, 2, 8)
    fig = viz.mtp_norm_figure(pos, e, h, channels=4)
    rms_trace = fig.data[1]
    assert rms_trace.y[0] == 0 and rms_trace.y[3] == 0 and rms_trace.y[1] > 0
    assert list(fig.data[-1].x) == [0, 3]                   # position-0 markers
    t = viz.logit_agreement(torch.randn(3, 10), torch.randn(3, 10))
    fig = viz.agreement_figure({"x": t})
    assert list(fig.data[0].y) == t.topk_overlap.tolist() and list(fig.data[1].y) == t.cosine.tolist()


# ---- stored results --------------------------------------------------------------------------------
def _records():
    rows = []
    for ts, v in (("2026-01-01T00:00:00", 9.0), ("2026-01-02T00:00:00", 5.0)):    # a rerun: the later one wins
        for t in (1, 64):
            rows.append(dict(metric="time", op="mhc_post", backend="tilelang", variant="eager", preset="flash",
                             tokens=t, value=v * t ** 0.5, p20=v * t ** 0.5 * 0.9, p80=v * t ** 0.5 * 1.1,
                             timing_mode="cuda-events", gpu="NVIDIA H100", timestamp=ts))
    rows.append(dict(metric="time", op="mhc_post", backend="torch", variant="eager", preset="flash", tokens=1,
                     value=20.0, p20=19.0, p80=21.0, timing_mode="cuda-events", gpu="NVIDIA H100",
                     timestamp="2026-01-01T00:00:00"))
    return pd.DataFrame(rows)


def test_latest_keeps_the_newest_record_per_key():
    df = viz.latest(_records(), ["backend", "tokens", "not_a_column"])
    assert len(df) == 3
    assert df[df.backend == "tilelang"].value.tolist() == pytest.approx([5.0, 40.0])


def test_floor_us_takes_the_binding_roof():
    from dsv4lab.lab.roofline import OpCost, Peaks

    peaks = Peaks(gpu="x", copy_bw=2e12, bf16_flops=1e15, fp8_flops=2e15)
    stream = OpCost(op="copy", row=0, flops=0, bytes=4e6, compute_dtype=None)
    assert viz.floor_us(stream, peaks) == pytest.approx(2.0)                 # 4 MB at 2 TB/s
    gemm = OpCost(op="g", row=0, flops=8e12, bytes=4e6, compute_dtype="fp8")
    assert viz.floor_us(gemm, peaks) == pytest.approx(4000.0)                # 8 TFLOP at 2 PFLOP/s
    no_fp8 = Peaks(gpu="x", copy_bw=2e12, bf16_flops=1e15, fp8_flops=None)
    assert viz.floor_us(gemm, no_fp8) == pytest.approx(2.0)                  # unknown rate: memory roof only


def test_stored_label():
    assert viz.stored_label(_records()) == "stored results: NVIDIA H100, 2026-01-01 to 2026-01-02"
    assert viz.stored_label(_records().iloc[:0]) == "no stored results"


def test_stored_time_figure():
    fig = viz.stored_time_figure(_records(), "mhc_post", preset="flash", mode="cuda-events",
                                 floor_us=lambda t: 0.1 * t)
    names = [t.name for t in fig.data]
    assert names == ["tilelang / eager", "torch / eager", "roofline floor"]
    assert list(fig.data[0].y) == pytest.approx([5.0, 40.0]) and list(fig.data[0].x) == [1, 64]
    assert list(fig.data[2].y) == pytest.approx([0.1, 6.4])
    assert "stored results: NVIDIA H100" in fig.layout.title.text
