"""scripts/readme_charts.py: every chart is built from the stored results and written (HTML here: PNG needs
Chromium); a results root without the files writes nothing and exits 1."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("plotly")
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_charts", ROOT / "scripts" / "readme_charts.py")
readme_charts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_charts)


def test_charts_from_the_stored_results(tmp_path):
    needed = ["pr43905_mhc_direct", "pr43746_mtp_norm", "pr44367_megamoe"]
    if not all((ROOT / "data" / "results" / "h100" / f"{e}.jsonl").exists() for e in needed):
        pytest.skip("stored H100 results not present")
    assert readme_charts.main(["--html", "--out", str(tmp_path)]) == 0
    for name in readme_charts.CHARTS:
        page = (tmp_path / f"{name}.html").read_text(encoding="utf-8")
        assert "stored results: NVIDIA H100" in page and "roofline floor" in page


def test_no_results_writes_nothing(tmp_path):
    assert readme_charts.main(["--html", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert not list((tmp_path / "out").iterdir())
