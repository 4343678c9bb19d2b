"""The #43746 MTP-norm refactor module: variants agree, the oracle and roofline are right, records are well
formed, targets are computed as specified, and the CPU entry points run.

Small shapes only (Triton runs in the interpreter on a CPU). before_compiled is traced with Dynamo's "eager"
backend here (seconds, same graph capture and guards); Inductor's CPU compile takes tens of seconds and is
exercised by the GPU bench script.
"""
import pandas as pd
import pytest
import torch

from dsv4lab.kernels.reference import mtp as ref
from dsv4lab.lab import results
from dsv4lab.refactors import pr43746_mtp_norm as exp

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (see tests/test_mtp_input_rmsnorm.py)."""
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 1 - MANTISSA_BITS[dtype]).clamp_min(2.0 ** -24)


def within(a, b, n_ulps, dtype=torch.bfloat16):
    big = torch.maximum(a.double().abs(), b.double().abs())
    return bool(((a.double() - b.double()).abs() <= n_ulps * ulp(big, dtype)).all())


def test_make_inputs_shapes_positions_and_magnitudes():
    embed, pos, prev, ew, hw = exp.make_inputs("mtp_input_rmsnorm", 300, 64, 4, torch.bfloat16, "cpu", seed=1)
    assert embed.shape == (300, 64) and prev.shape == (300, 256) and ew.shape == hw.shape == (64,)
    assert embed.dtype == prev.dtype == torch.bfloat16 and pos.dtype == torch.int64
    assert torch.equal((pos == 0).nonzero().flatten(), torch.tensor([0, 128, 256]))  # packed 128-token sequences
    rms = embed.float().square().mean().sqrt().item()
    assert 0.9 < rms < 1.1  # unit-RMS activations (19200 samples: the RMS is within ~1 % of 1)
    h, w = exp.make_inputs("mtp_shared_head_rmsnorm", 5, 32, dtype=torch.float16)
    assert h.shape == (5, 32) and w.dtype == torch.float16
    with pytest.raises(ValueError, match="op"):
        exp.make_inputs("rmsnorm", 1, 8)


def test_oracle_hand_computed():
    """D = 2: row [3, 4] has mean square 12.5; a position-0 row is zero whatever its content."""
    embed = torch.tensor([[3.0, 4.0], [7.0, -1.0]])
    pos = torch.tensor([5, 0])
    prev = torch.tensor([[1.0, 1.0, 0.0, 2.0], [2.0, 0.0, 0.0, 0.0]])  # n = 2
    ew, hw = torch.tensor([1.0, 2.0]), torch.tensor([1.0, -1.0])
    out = exp.oracle("mtp_input_rmsnorm", (embed, pos, prev, ew, hw), eps=0.5)
    r = 13.0 ** -0.5  # 1 / sqrt(12.5 + 0.5)
    want = torch.tensor([3 * r, 8 * r, 0, 0,  # e
                         1, -1, 0, -2 * 2.5 ** -0.5,  # h[0]: streams [1,1] (ms 1) and [0,2] (ms 2)
                         2 * 2.5 ** -0.5, 0, 0, 0], dtype=torch.float64)  # h[1]: [2,0] (ms 2), [0,0]
    want[4:6] = torch.tensor([1.0, -1.0], dtype=torch.float64) * 1.5 ** -0.5
    assert torch.allclose(out, want, rtol=1e-12, atol=0)


def test_before_eager_is_the_reference_eager_sequence():
    args = exp.make_inputs("mtp_input_rmsnorm", 9, 64, seed=2)
    e, h = exp.before_eager(*args)
    e_ref, h_ref = ref.mtp_input_before_eager(*args)
    assert torch.equal(e, e_ref) and torch.equal(h, h_ref) and h.shape == (9, 4, 64)
    hh, w = exp.make_inputs("mtp_shared_head_rmsnorm", 5, 64, seed=3)
    assert torch.equal(exp.head_before_eager(hh, w), ref.mtp_shared_head_rmsnorm(hh, w, two_rounding=True))


def test_variants_agree_with_references():
    """after ~ one-rounding reference (1 ulp), the two-rounding variants ~ before_eager (3 ulps: the interpreter
    truncates both casts; see tests/test_mtp_input_rmsnorm.py for the derivation)."""
    args = exp.make_inputs("mtp_input_rmsnorm", 6, 64, seed=4)
    one = ref.mtp_input_rmsnorm(*args)
    eager = exp.before_eager(*args)
    for name, want, n_ulps in (("after", one, 1), ("after_two_rounding", eager, 3), ("before_kernel_norms", eager, 3)):
        got = exp.variants("mtp_input_rmsnorm")[name](*args)
        assert all(g.shape == w.shape and within(g, w, n_ulps) for g, w in zip(got, want)), name
    h, w = exp.make_inputs("mtp_shared_head_rmsnorm", 4, 64, seed=5)
    assert within(exp.head_after(h, w), ref.mtp_shared_head_rmsnorm(h, w), 1)
    assert within(exp.head_after_two_rounding(h, w), exp.head_before_eager(h, w), 3)


def test_before_compiled_traces_fullgraph_with_dynamic_tokens(monkeypatch):
    """One Dynamo graph for every T >= 2 (token dim dynamic), a second one for T = 1; outputs equal eager."""
    monkeypatch.setattr(exp, "COMPILE_BACKEND", "eager")
    try:
        args = exp.make_inputs("mtp_input_rmsnorm", 8, 32, seed=6)
        seconds = exp.compile_before("mtp_input_rmsnorm", args)
        assert seconds > 0
        for T in (8, 3, 1):
            a = exp.make_inputs("mtp_input_rmsnorm", T, 32, seed=T)
            assert all(torch.equal(c, e) for c, e in zip(exp.before_compiled(*a), exp.before_eager(*a)))
        h, w = exp.make_inputs("mtp_shared_head_rmsnorm", 4, 32)
        assert torch.equal(exp.head_before_compiled(h, w), exp.head_before_eager(h, w))
    finally:
        exp.reset_compiled()


def test_roofline_cost_hand_computed():
    c = exp.roofline_cost("mtp_input_rmsnorm", T=2, D=8, n=4)
    assert c.bytes == 2 * 2 * 5 * 8 * 2 + 2 * 8 * 2 + 8 * 2  # acts in+out, two bf16 weights, int64 positions
    c32 = exp.roofline_cost("mtp_input_rmsnorm", T=2, D=8, n=4, dtype=torch.float32)
    assert c32.bytes == 2 * 2 * 5 * 8 * 4 + 2 * 8 * 4 + 8 * 2
    assert exp.roofline_cost("mtp_shared_head_rmsnorm", T=3, D=16).bytes == 2 * 3 * 16 * 2 + 16 * 2


def _fields_ok(rec):
    return all(k in rec for k in results.REQUIRED + results.PROVENANCE) and results.validate(rec) is None


def test_numerics_records_flag_unmasked_rows_and_non_bitwise_outputs():
    args = exp.make_inputs("mtp_input_rmsnorm", 4, 32, seed=7)
    eager = exp.before_eager(*args)
    broken_e = eager[0].clone()
    broken_e[0] = 1.0  # position 0 is masked: this row must be zero
    recs = exp.numerics_records("mtp_input_rmsnorm", args, {"before_eager": eager, "after": (broken_e, eager[1]),
                                                            "after_two_rounding": eager}, preset="toy", D=32)
    assert all(_fields_ok(r) for r in recs)
    get = {(r["variant"], r["metric"]): r["value"] for r in recs}
    assert get[("before_eager", "masked_rows_zero")] is True
    assert get[("after", "masked_rows_zero")] is False
    assert get[("after", "bitwise_equal")] is False and get[("after_two_rounding", "bitwise_equal")] is True
    assert get[("after_two_rounding", "ulp_max")] == 0 and get[("after", "ulp_max")] > 0
    assert ("before_eager", "ulp_max_vs_oracle") in get and ("before_eager", "err_ratio") not in get


def _time(op, variant, T, mode, value, pct=None):
    return results.record(exp.EXPERIMENT, op, exp.BACKEND[variant], variant, "flash", T, "bfloat16", "time", "us",
                          value, p20=value, p80=value, mode=mode, D=4096, hc_mult=4, pct_of_peak=pct)


def test_target_records_follow_the_issue_definitions():
    op = "mtp_input_rmsnorm"
    recs = [_time(op, "after", 4096, "graph", 50.0, pct=90.0), _time(op, "before_compiled", 4096, "graph", 49.0),
            _time(op, "after", 16, "eager", 20.0), _time(op, "before_eager", 16, "eager", 50.0),
            _time(op, "after", 16384, "graph", 300.0, pct=80.0)]
    got = {(r["target"], r["tokens"], r["mode"]): r for r in exp.target_records(recs)}
    assert got[("bandwidth", 4096, "graph")]["value"] is True
    assert got[("bandwidth", 16384, "graph")]["value"] is False  # 80 % < 85 %
    assert got[("not_slower_than_compiled", 4096, "graph")]["value"] is False  # 50 us > 49 us
    assert got[("eager_speedup", 16, "eager")]["value"] is False  # 2.5x < 3x
    assert got[("eager_speedup", 16, "eager")]["observed"] == pytest.approx(2.5)
    assert ("bandwidth", 16, "eager") not in got and len(got) == 4
    assert all(_fields_ok(r) for r in got.values())


def test_run_on_cpu_records_every_variant():
    recs = exp.run("cpu", quick=True, preset="toy")
    assert recs and all(_fields_ok(r) and r["experiment"] == exp.EXPERIMENT for r in recs)
    df = pd.DataFrame(recs)
    comp = df[(df.variant == "before_compiled") & (df.metric == "unavailable")]
    assert len(comp) == 2 and comp.reason.str.contains("quick").all()
    for op, names in (("mtp_input_rmsnorm", ["before_eager", "before_kernel_norms", "after", "after_two_rounding"]),
                      ("mtp_shared_head_rmsnorm", ["before_eager", "after", "after_two_rounding"])):
        sub = df[df.op == op]
        assert set(sub[sub.metric == "time"].variant) == set(names)
        assert (sub[sub.metric == "time"]["mode"] == "cpu").all()
        assert set(sub[sub.metric == "rel_rms"].variant) == set(names)
        assert (sub[sub.metric == "passed"].value.notna()).all()
    masked = df[df.metric == "masked_rows_zero"]
    assert len(masked) and masked.value.all()
    assert not (df.metric == "error").any(), df[df.metric == "error"].message.tolist()


def test_notebook_helpers_on_records(tmp_path):
    recs = exp.run("cpu", quick=True, preset="toy")
    path = results.results_path(exp.EXPERIMENT, slug="cpu", root=tmp_path)
    results.append(path, recs)
    df = exp.load_results(root=tmp_path, slug="cpu")
    assert len(df) == len(recs)
    fig = exp.time_figure(df, 256, mode="cpu")
    assert len(fig.data) == 4 and "stored results" in fig.layout.title.text and "CPU" in fig.layout.title.text
    assert len(exp.ulp_figure(df, 256, 4).data) == 3
    assert len(exp.ulp_figure(df, 256, 4, vs="oracle").data) == 4
    assert len(exp.launches_figure(df).data) == 1  # CPU: aten ops of before_eager only
    assert exp.time_table(df, mode="cpu").shape[0] == 2
    assert "before_eager" in "\n".join(exp.summary_lines(recs))
    empty = exp.load_results(root=tmp_path / "nothing")
    assert empty.empty and len(exp.time_figure(empty, 4096).data) == 0
    html = exp.code_side_by_side()
    assert "def before_eager" in html and "def fused_mtp_input_rmsnorm" in html


def test_bench_script_refuses_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script would run the full sweep")
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "pr43746_mtp_norm.py"
    spec = importlib.util.spec_from_file_location("bench_pr43746", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
