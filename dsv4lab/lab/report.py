"""``build_report``: one static, offline HTML page of plotly charts from the stored results.

One section per experiment. Inside a section:
- ``time`` records: one chart per op, the median with p20-p80 error bars, against tokens when the op was
  measured at several token counts (else a bar per backend/variant), one trace per GPU/backend/variant/mode;
- every other numeric metric: one chart per metric, same layout;
- boolean/text metrics (``bitwise_equal``, ``passed``...): a table;
- ``unavailable`` / ``error`` records: a table with their reason.
Every chart title names the GPU(s) and the measurement date(s); these are stored numbers, not a live run.
Malformed lines are not plotted but listed (``path:line: reason``) at the top. plotly.js is embedded inline
once, so the page opens without a network.
"""
from __future__ import annotations

import html
import math
import numbers
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

STATUS_METRICS = ("unavailable", "error")
_TRACE_KEYS = ("slug", "backend", "variant", "timing_mode")


def _esc(v: Any) -> str:
    return html.escape("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))  # numpy ints/floats from pandas


def _label(df) -> str:
    """'GPU(s), date range' of the records in ``df``."""
    gpus = ", ".join(sorted(df["gpu"].dropna().astype(str).unique())) or "unknown GPU"
    days = sorted(df["timestamp"].dropna().astype(str).str[:10].unique())
    when = days[0] if len(days) == 1 else (f"{days[0]} to {days[-1]}" if days else "undated")
    return f"{gpus} · {when}"


def _trace_name(row: Any, keys: tuple[str, ...]) -> str:
    return " / ".join(str(row[k]) for k in keys if k in row and row[k] is not None and row[k] == row[k])


def _figure(df, title: str, y_title: str, keys: tuple[str, ...], with_spread: bool):
    import plotly.graph_objects as go

    fig = go.Figure()
    tokens = df["tokens"].dropna().unique() if "tokens" in df else []
    by_tokens = len(tokens) > 1
    present = tuple(k for k in keys if k in df.columns)
    for name, grp in df.groupby(list(present), dropna=False, sort=True):
        grp = grp.sort_values("tokens") if by_tokens else grp
        label = _trace_name(grp.iloc[0], present)
        y = grp["value"].astype(float)
        err = {}
        if with_spread and {"p20", "p80"} <= set(grp.columns):
            err = dict(error_y=dict(type="data", symmetric=False, array=(grp["p80"].astype(float) - y).tolist(),
                                    arrayminus=(y - grp["p20"].astype(float)).tolist()))
        hover = [f"{_esc(r.get('op'))} {_esc(r.get('backend'))}/{_esc(r.get('variant'))} T={_esc(r.get('tokens'))}"
                 f"<br>value={r['value']:.4g} {_esc(r.get('unit'))}"
                 + (f"<br>{r['pct_of_peak']:.1f}% of {_esc(r.get('peak'))}" if _is_number(r.get("pct_of_peak"))
                    and not math.isnan(r["pct_of_peak"]) else "")
                 + f"<br>{_esc(r.get('gpu'))} {_esc(r.get('timestamp'))}" for r in grp.to_dict("records")]
        if by_tokens:
            fig.add_trace(go.Scatter(x=grp["tokens"].tolist(), y=y.tolist(), mode="lines+markers", name=label,
                                     hovertext=hover, hoverinfo="text", **err))
        else:
            x = [f"{r.get('op')} {r.get('backend')}/{r.get('variant')}" for r in grp.to_dict("records")]
            fig.add_trace(go.Bar(x=x, y=y.tolist(), name=label, hovertext=hover, hoverinfo="text", **err))
    fig.update_layout(title=dict(text=f"{html.escape(title)}<br><sup>stored results: {_esc(_label(df))}</sup>"),
                      yaxis_title=y_title, barmode="group", height=430, margin=dict(t=80, l=60, r=20, b=60),
                      legend=dict(font=dict(size=10)))
    if by_tokens:
        fig.update_xaxes(title="tokens", type="log" if max(tokens) > 10 * max(min(tokens), 1) else "linear")
    return fig


def _table(df, columns: list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_esc(r.get(c))}</td>" for c in cols) + "</tr>"
                   for r in df.to_dict("records"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plotly_embedded = False

    def add(self, s: str) -> None:
        self.parts.append(s)

    def chart(self, fig) -> None:
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=not self.plotly_embedded))
        self.plotly_embedded = True


def _section(page: _Page, exp: str, df) -> None:
    page.add(f'<section id="{_esc(exp)}"><h2>{_esc(exp)}</h2><p class="meta">{len(df)} records · '
             f"{_esc(_label(df))}</p>")
    status = df[df["metric"].isin(STATUS_METRICS)]
    data = df[~df["metric"].isin(STATUS_METRICS)]
    is_num = data["value"].map(_is_number).astype(bool)   # bool even when empty: an object mask selects columns
    numeric = data[is_num]
    times = numeric[numeric["metric"] == "time"]
    for op, grp in times.groupby("op", sort=True):
        modes = ", ".join(sorted(grp["timing_mode"].dropna().astype(str).unique())) if "timing_mode" in grp else ""
        note = " (CPU clock, not GPU time)" if "cpu-clock" in modes else ""
        page.chart(_figure(grp, f"{exp}: {op} time{note}", "µs (p50, bars p20-p80)", _TRACE_KEYS, True))
    for metric, grp in numeric[numeric["metric"] != "time"].groupby("metric", sort=True):
        unit = next((u for u in grp["unit"].dropna().astype(str).unique()), "")
        page.chart(_figure(grp, f"{exp}: {metric}", f"{metric} [{unit}]" if unit else metric,
                           ("slug", "op", "backend", "variant"), False))
    other = data[~is_num]
    if len(other):
        page.add("<h3>Boolean and text results</h3>")
        page.add(_table(other, ["op", "backend", "variant", "preset", "tokens", "dtype", "metric", "value",
                                "gpu", "timestamp"]))
    if len(status):
        page.add("<h3>Unavailable and failed cases</h3>")
        st = status.copy()
        st["why"] = [r.get("reason") if isinstance(r.get("reason"), str) else r.get("message")
                     for r in st.to_dict("records")]
        page.add(_table(st, ["metric", "op", "backend", "variant", "preset", "tokens", "why", "gpu", "timestamp"]))
    page.add("</section>")


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}.meta{color:#555}.problem{color:#a00}"""


def build_report(root: str | Path | None = None, out: str | Path = "report.html",
                 title: str = "dsv4lab stored results") -> Path:
    """Write the report for every ``<root>/<slug>/<experiment>.jsonl`` (root: ``results.default_root()``) to
    ``out`` and return its path. Works with no results at all (the page says so)."""
    from . import results

    root = Path(root) if root is not None else results.default_root()
    files = results.result_files(root)
    problems: list[str] = []
    with warnings.catch_warnings():  # malformed lines are listed on the page instead
        warnings.simplefilter("ignore")
        df = results.load(paths=files, strict=False) if files else None
    if df is not None:
        problems = list(df.attrs.get("problems", []))
    page = _Page()
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page.add(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>"
             f"<p class='meta'>Built {made} from <code>{_esc(root)}</code>: {len(files)} file(s). "
             "These are stored measurements with their provenance, not a live run.</p>")
    if problems:
        page.add("<h2 class='problem'>Malformed records (not plotted)</h2><ul>"
                 + "".join(f"<li class='problem'><code>{_esc(p)}</code></li>" for p in problems) + "</ul>")
    if df is None or df.empty:
        page.add(f"<p><b>No results found under <code>{_esc(root)}</code>.</b> Run <code>dsv4lab compare</code> "
                 "or a <code>bench/</code> script and store its records there.</p>")
    else:
        experiments = sorted(df["experiment"].astype(str).unique())
        page.add("<nav><ul>" + "".join(f'<li><a href="#{_esc(e)}">{_esc(e)}</a></li>' for e in experiments)
                 + "</ul></nav>")
        for exp in experiments:
            _section(page, exp, df[df["experiment"] == exp])
    page.add("</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(page.parts), encoding="utf-8")
    return out
