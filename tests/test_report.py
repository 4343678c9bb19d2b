"""lab.report: one offline HTML page from a temporary results folder."""
import json
import re

from plotly.offline import get_plotlyjs

from dsv4lab.lab import results
from dsv4lab.lab.report import build_report


def _rec(experiment, metric, value, tokens=16, variant="after", **extra):
    return results.record(experiment, "router_gemm", "torch", variant, "flash", tokens, "bfloat16", metric,
                          extra.pop("unit", "us"), value, **extra)


def _fake_gpu(rec, name):
    return dict(rec, gpu=name, timestamp="2026-11-20T10:00:00+00:00")


def test_report_has_plotly_inline_and_a_section_per_experiment(tmp_path):
    root = tmp_path / "results"
    h100 = [_fake_gpu(_rec("pr41300_router_gemm", "time", v, tokens=t, variant=var, p20=v * 0.9, p80=v * 1.1,
                           timing_mode="cuda-graph", pct_of_peak=40.0, peak="copy_bandwidth"), "NVIDIA H100 80GB HBM3")
            for t, v in ((1, 5.0), (64, 6.0), (4096, 40.0)) for var in ("before", "after")]
    results.append(root / "h100" / "pr41300_router_gemm.jsonl", h100)
    cpu = [_rec("pr43891_custom_op_wrappers", "host_overhead", 12.5),
           _rec("pr43891_custom_op_wrappers", "bitwise_equal", True, unit="bool"),
           _rec("pr43891_custom_op_wrappers", "kernels_per_call", 3, unit="kernels"),
           _rec("pr43891_custom_op_wrappers", "kernels_per_call", 1, variant="before", unit="kernels"),
           _rec("pr43891_custom_op_wrappers", "unavailable", None, unit=None, reason="needs sm90 (DeepGEMM)"),
           _rec("pr43891_custom_op_wrappers", "error", None, unit=None, message="RuntimeError: boom")]
    path_cpu = root / "cpu" / "pr43891_custom_op_wrappers.jsonl"
    results.append(path_cpu, cpu)
    with open(path_cpu, "a") as f:
        f.write('{"experiment": "pr43891_custom_op_wrappers", "op": \n')   # malformed line 7

    out = build_report(root=root, out=tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    assert get_plotlyjs() in page and "<script src=" not in page              # embedded inline: opens offline
    assert page.count("plotly.js v") == 1                                      # ... and only once
    for exp in ("pr41300_router_gemm", "pr43891_custom_op_wrappers"):
        assert f'<section id="{exp}">' in page
    # chart titles carry GPU and date
    titles = [json.loads(f'"{t}"') for t in re.findall(r'"title":\{"text":"((?:[^"\\]|\\.)*)"', page)]
    assert any("NVIDIA H100 80GB HBM3" in t and "2026-11-20" in t and "router_gemm time" in t for t in titles)
    assert any("host_overhead" in t and "cpu: " in t for t in titles)
    assert any("kernels_per_call" in t for t in titles)                       # integer-valued metrics plot too
    # status records are listed, with their reasons
    assert "Unavailable and failed cases" in page
    assert "needs sm90 (DeepGEMM)" in page and "RuntimeError: boom" in page
    # the malformed line is reported with file and line, not plotted
    assert f"{path_cpu}:7: invalid JSON" in page


def test_report_with_no_results_says_so(tmp_path):
    out = build_report(root=tmp_path / "empty", out=tmp_path / "r.html")
    page = out.read_text()
    assert "No results found under" in page and "0 file(s)" in page
