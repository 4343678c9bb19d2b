"""Notebook explorers: knobs (ipywidgets) in front of a function that returns what to show.

    explore(build, layer=[0, 1, 2, 3], tokens=[64, 256], iters=(1, 40))

``build(**values)`` returns one item or a list of items: plotly figures, pandas DataFrames (or Stylers), strings
(shown preformatted) or ready widgets. Knob specs: a list/tuple of options -> dropdown; ``(lo, hi)`` of two ints ->
integer slider; a bool -> checkbox; an ipywidgets widget is used as given. Initial values are ``build``'s
defaults.

With ipywidgets the result is one box: the knobs, then the items as widgets (figures as plotly ``FigureWidget``,
tables and text as ``HTML``); turning a knob rebuilds the items (an exception is shown in place of the items).
Without ipywidgets the defaults are drawn once with ``display``: the headless path.

Why not ``ipywidgets.interact``: it draws into an ``Output`` widget, and when a notebook is executed headless by
nbclient (nbmake, nbconvert) nbclient mirrors every output written into an ``Output`` widget back to the kernel
on the shell channel; with a large output (a plotly figure of a few MB) the cell then stalls until nbclient's
timeout (nbclient issue #312). Widgets whose state only travels from the kernel to the frontend do not stall.
"""
from __future__ import annotations

import html
import inspect
from typing import Any, Callable


def _items(result: Any) -> list[Any]:
    if result is None:
        return []
    return [r for r in result if r is not None] if isinstance(result, (list, tuple)) else [result]


def _defaults(build: Callable[..., Any]) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(build).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _control(name: str, spec: Any, default: Any):
    import ipywidgets as w

    if isinstance(spec, w.ValueWidget):
        return spec
    if isinstance(spec, bool):
        return w.Checkbox(value=bool(default if default is not None else spec), description=name)
    if (isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in spec)):
        lo, hi = spec
        return w.IntSlider(value=default if default is not None else lo, min=lo, max=hi, description=name,
                           continuous_update=False)
    if isinstance(spec, (list, tuple)):
        options = list(spec)
        value = default if default in options else options[0]
        return w.Dropdown(options=options, value=value, description=name)
    raise TypeError(f"{name}: expected a list of options, a (lo, hi) int pair, a bool or an ipywidgets widget, "
                    f"got {spec!r}")


def as_widget(item: Any):
    """A widget showing ``item``: plotly figure -> FigureWidget, DataFrame/Styler -> HTML table, widget -> itself,
    anything else -> its ``str`` preformatted in an HTML widget."""
    import ipywidgets as w

    if isinstance(item, w.Widget):
        return item
    try:
        from plotly.basedatatypes import BaseFigure
    except ImportError:
        BaseFigure = ()  # noqa: N806
    if BaseFigure and isinstance(item, BaseFigure):
        import plotly.graph_objects as go

        return item if isinstance(item, go.FigureWidget) else go.FigureWidget(item)
    to_html = getattr(item, "to_html", None)
    if callable(to_html):
        return w.HTML(to_html())
    return w.HTML(f"<pre>{html.escape(str(item))}</pre>")


def explore(build: Callable[..., Any], **knobs: Any):
    """Knobs in front of ``build`` (module docstring). Returns the box (with ipywidgets) or None (headless)."""
    from IPython.display import display

    defaults = _defaults(build)
    missing = sorted(set(knobs) - set(inspect.signature(build).parameters))
    if missing:
        raise TypeError(f"knobs: {build.__name__} has no parameter(s) {missing}")
    try:
        import ipywidgets as w
    except ImportError:
        for item in _items(build(**defaults)):
            display(item)
        return None

    controls = {name: _control(name, spec, defaults.get(name)) for name, spec in knobs.items()}
    body = w.VBox()

    def render(*_: Any) -> None:
        values = dict(defaults, **{name: c.value for name, c in controls.items()})
        try:
            body.children = [as_widget(item) for item in _items(build(**values))]
        except Exception as e:  # show the failure where the output would be; the knobs stay usable
            body.children = [w.HTML(f"<pre style='color:#c92a2a'>{html.escape(type(e).__name__ + ': ' + str(e))}"
                                    "</pre>")]

    for c in controls.values():
        c.observe(render, names="value")
    render()
    box = w.VBox([w.HBox(list(controls.values()), layout=w.Layout(flex_flow="row wrap")), body])
    display(box)
    return box


def headless() -> bool:
    """True when notebooks are executed without a front-end (``make test`` sets DSV4LAB_HEADLESS=1)."""
    import os

    return os.environ.get("DSV4LAB_HEADLESS") == "1"


def interact(fn: Callable[..., Any], **controls: Any):
    """``ipywidgets.interact`` in a live notebook; headless (``headless()``) or without ipywidgets, one call of
    ``fn`` with its defaults, output written directly to the cell -- no ``Output`` widget, so nbclient cannot stall
    on it (module docstring)."""
    if headless():
        return fn()
    try:
        import ipywidgets as w
    except ImportError:
        return fn()
    return w.interact(fn, **controls)
