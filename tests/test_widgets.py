"""lab.widgets.explore: knobs built from specs, items turned into widgets, rebuilt on a knob change, and the
headless path (no ipywidgets) drawing the defaults once."""
import builtins
import sys

import pandas as pd
import pytest

w = pytest.importorskip("ipywidgets")
go = pytest.importorskip("plotly.graph_objects")
from dsv4lab.lab import widgets as lw  # noqa: E402


def _build(layer: int = 2, kind: str = "attn", iters: int = 5, log: bool = False):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[layer, iters]))
    return [fig, pd.DataFrame({"kind": [kind], "log": [log]}), f"layer={layer}", None]


def test_explore_builds_knobs_and_items(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.extend(a))
    box = lw.explore(_build, layer=[0, 1, 2, 3], kind=("attn", "ffn"), iters=(1, 40), log=False)
    assert shown == [box]
    knobs, body = box.children
    layer, kind, iters, log = knobs.children
    assert isinstance(layer, w.Dropdown) and layer.value == 2 and list(layer.options) == [0, 1, 2, 3]
    assert isinstance(kind, w.Dropdown) and kind.value == "attn"
    assert isinstance(iters, w.IntSlider) and (iters.min, iters.max, iters.value) == (1, 40, 5)
    assert isinstance(log, w.Checkbox) and log.value is False
    fig, table, text = body.children                                 # None items are dropped
    assert isinstance(fig, go.FigureWidget) and list(fig.data[0].y) == [2, 5]
    assert isinstance(table, w.HTML) and "<table" in table.value and "attn" in table.value
    assert text.value == "<pre>layer=2</pre>"

    layer.value, iters.value = 3, 7                                   # each change rebuilds from all knobs
    assert list(body.children[0].data[0].y) == [3, 7] and body.children[2].value == "<pre>layer=3</pre>"


def test_explore_shows_errors_in_place(monkeypatch):
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)

    def build(n: int = 1):
        if n == 2:
            raise ValueError("n: two is not allowed")
        return f"n={n}"

    box = lw.explore(build, n=[1, 2])
    box.children[0].children[0].value = 2
    assert "ValueError: n: two is not allowed" in box.children[1].children[0].value
    box.children[0].children[0].value = 1
    assert box.children[1].children[0].value == "<pre>n=1</pre>"


def test_explore_rejects_unknown_knobs_and_specs(monkeypatch):
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    with pytest.raises(TypeError, match="no parameter"):
        lw.explore(_build, depth=[1, 2])
    with pytest.raises(TypeError, match="iters"):
        lw.explore(_build, iters=3.5)


def test_explore_headless_without_ipywidgets(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.extend(a))
    real_import = builtins.__import__

    def no_ipywidgets(name, *args, **kwargs):
        if name == "ipywidgets" or name.startswith("ipywidgets."):
            raise ImportError("no ipywidgets")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ipywidgets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ipywidgets)
    assert lw.explore(_build, layer=[0, 1, 2]) is None
    fig, table, text = shown                                          # the defaults, drawn once, None dropped
    assert list(fig.data[0].y) == [2, 5] and table.kind.tolist() == ["attn"] and text == "layer=2"


def test_interact_headless_calls_once_with_defaults(monkeypatch):
    from dsv4lab.lab import widgets as W

    calls = []

    def fn(a: int = 3, b: str = "x"):
        calls.append((a, b))
        return a * 2

    monkeypatch.setenv("DSV4LAB_HEADLESS", "1")
    assert W.headless() and W.interact(fn, a=[1, 2, 3]) == 6 and calls == [(3, "x")]
    monkeypatch.setenv("DSV4LAB_HEADLESS", "0")
    assert not W.headless()
