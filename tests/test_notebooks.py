"""Notebook hygiene: every .py/.ipynb pair is in sync, outputs are stripped, quoted code matches the package.

Execution itself is checked by nbmake (`pytest notebooks --nbmake`, part of `make test`).
"""
import importlib
import inspect
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PY_FILES = sorted(NB_DIR.glob("[0-9]*.py"))
IPYNB_FILES = sorted(NB_DIR.glob("[0-9]*.ipynb"))
# In the percent-format .py every markdown line starts with "# ": the fence lines included.
QUOTE = re.compile(r"quote:\s*(?P<target>[\w.]+:[\w.]+)\s*\n(?:#\s*\n)*#\s*```python\n(?P<code>.*?)#\s*```", re.S)


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_is_paired():
    assert {p.stem for p in PY_FILES} == {p.stem for p in IPYNB_FILES}, "run `make notebooks` to pair them"


@pytest.mark.parametrize("py", PY_FILES, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `make notebooks`"
    assert _cells(jupytext.read(py)) == _cells(jupytext.read(ipynb)), f"{py.name} and {ipynb.name} differ: run `make notebooks`"


@pytest.mark.parametrize("ipynb", IPYNB_FILES, ids=lambda p: p.stem)
def test_outputs_stripped(ipynb):
    nb = jupytext.read(ipynb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"{ipynb.name}: outputs must be stripped"


@pytest.mark.parametrize("py", PY_FILES, ids=lambda p: p.stem)
def test_quoted_code_matches_package(py):
    """A markdown block introduced by `quote: module:qualname` must equal that object's current source."""
    text = py.read_text()
    if "quote:" in text:
        assert QUOTE.search(text), f"{py.name}: a 'quote:' line is not followed by a ```python block"
    for m in QUOTE.finditer(text):
        mod, qual = m["target"].split(":")
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        quoted = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in m["code"].splitlines())
        assert quoted.strip() == inspect.getsource(obj).strip(), f"{py.name}: quote of {m['target']} is stale"
