"""Backend failure isolation: a backend that cannot import (compile error, missing library) or fails when called
(unsupported GPU) becomes an 'unavailable'/'error' row with its reason in the registry matrix, ``sweep.bench``,
``dsv4lab compare`` and ``report``, and everything else still runs."""
from __future__ import annotations

import sys
import types

import pytest

from dsv4lab import cli, refactors, sweep
from dsv4lab.kernels import registry
from dsv4lab.lab import results
from dsv4lab.lab.report import build_report

BROKEN_IMPORT = "RuntimeError: simulated nvcc failure in the rmsnorm kernel"


@pytest.fixture
def broken_backends(monkeypatch, tmp_path):
    """rmsnorm gains two fake backends: 'triton' whose module raises at import, 'cuda' that raises when called."""
    (tmp_path / "dsv4lab_broken_kernel.py").write_text(
        "raise RuntimeError('simulated nvcc failure in the rmsnorm kernel')\n")
    (tmp_path / "dsv4lab_gpu_only_kernel.py").write_text(
        "def rmsnorm(*a, **k):\n    raise RuntimeError('no kernel image is available for execution on the device')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = dict(registry._TABLE["rmsnorm"])
    table["triton"] = registry.Backend("rmsnorm", "triton", "dsv4lab_broken_kernel:rmsnorm")
    table["cuda"] = registry.Backend("rmsnorm", "cuda", "dsv4lab_gpu_only_kernel:rmsnorm")
    monkeypatch.setitem(registry._TABLE, "rmsnorm", table)
    registry._load.cache_clear()
    yield
    registry._load.cache_clear()


def test_availability_reports_the_import_error(broken_backends):
    ok, why = registry.availability("rmsnorm", "triton")
    assert not ok and BROKEN_IMPORT in why and "dsv4lab_broken_kernel:rmsnorm" in why
    with pytest.raises(registry.BackendUnavailable, match="simulated nvcc failure"):
        registry.get("rmsnorm", "triton")
    rows = {(r["op"], r["backend"]): r for r in registry.matrix()}
    assert rows[("rmsnorm", "triton")]["available"] is False
    assert rows[("rmsnorm", "reference")]["available"] is True           # the op's other backends unaffected
    assert rows[("mhc_pre", "reference")]["available"] is True


def test_missing_library_is_unavailable_not_raised(monkeypatch):
    """A module that cannot be imported at all (None in sys.modules: the import machinery refuses it)."""
    monkeypatch.setitem(sys.modules, "dsv4lab.kernels.triton.moe_routing", None)
    registry._load.cache_clear()
    try:
        ok, why = registry.availability("moe_routing", "triton")
        assert not ok and "import of dsv4lab.kernels.triton.moe_routing:route failed" in why
        assert registry.availability("moe_routing", "reference")[0]
    finally:
        registry._load.cache_clear()


def test_sweep_records_unavailable_and_error_and_goes_on(broken_backends):
    recs = sweep.bench("rmsnorm", preset="toy", tokens=[2, 3], device="cpu")
    by = {}
    for r in recs:
        by.setdefault((r["backend"], r["tokens"]), set()).add(r["metric"])
    for t in (2, 3):                                                   # every token count still ran
        assert "time" in by[("reference", t)]
        assert by[("triton", t)] == {"unavailable"}
        assert by[("cuda", t)] == {"error"}
    un = next(r for r in recs if r["metric"] == "unavailable")
    err = next(r for r in recs if r["metric"] == "error")
    assert BROKEN_IMPORT in un["reason"] and "no kernel image" in err["message"]


def test_sweep_with_a_backend_list_skips_ops_without_that_backend():
    recs = sweep.bench("all", preset="toy", tokens=[1], device="cpu", backends=["torch"])
    assert recs == [] or {r["backend"] for r in recs} == {"torch"}
    assert {r["op"] for r in recs} <= {op for op in registry.ops() if "torch" in registry.backends(op)}


def _module(name: str, run) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.EXPERIMENT, mod.TITLE, mod.run = name, f"fake {name}", run
    return mod


def test_compare_continues_after_a_failing_experiment(monkeypatch, tmp_path, capsys):
    pytest.importorskip("plotly", reason="compare's report needs plotly (not installed on the GPU host)")
    def boom(device="cpu", quick=True, preset="flash"):
        raise RuntimeError("CUDA error: no kernel image is available")

    def good(device="cpu", quick=True, preset="flash"):
        return [results.record("fake_good", "router_gemm", "reference", "after", preset, 4, "float32",
                               "max_abs", None, 0.5)]

    mods = [("fake_broken", _module("fake_broken", boom), ""),
            ("fake_missing", None, "import failed: ModuleNotFoundError: No module named 'tilelang'"),
            ("fake_good", _module("fake_good", good), "")]
    monkeypatch.setattr(refactors, "load_all", lambda: mods)
    rc = cli.main(["compare", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1                                                     # a failure is not hidden in the exit code
    assert "== fake fake_good" in out and "max_abs" in out                    # the healthy experiment ran and printed
    assert "no kernel image" in out and "No module named 'tilelang'" in out
    slug = results.gpu_slug()
    good_recs = results.read_records(tmp_path / slug / "fake_good.jsonl")
    assert [r["metric"] for r in good_recs] == ["max_abs"]
    broken = results.read_records(tmp_path / slug / "fake_broken.jsonl")
    assert [(r["metric"], r["op"]) for r in broken] == [("error", "(run)")]
    assert "no kernel image" in broken[0]["message"]

    # ... and the report lists the failure with its reason next to the healthy experiment's numbers
    page = build_report(root=tmp_path, out=tmp_path / "r.html").read_text()
    assert '<section id="fake_broken">' in page and "Unavailable and failed cases" in page
    assert "no kernel image is available" in page and '<section id="fake_good">' in page


def test_report_lists_a_sweep_with_a_broken_backend(broken_backends, tmp_path):
    pytest.importorskip("plotly", reason="the report's charts need plotly (not installed on the GPU host)")
    recs = sweep.bench("rmsnorm", preset="toy", tokens=[2], device="cpu")
    results.append(tmp_path / "cpu" / f"{sweep.EXPERIMENT}.jsonl", recs)
    page = build_report(root=tmp_path, out=tmp_path / "r.html").read_text()
    assert "simulated nvcc failure" in page and "no kernel image" in page
    assert "rmsnorm time" in page                                       # the working backend is still charted
