"""Plotly figure builders for the layer notebooks (02_mhc, 03_attention, 04_moe, 05_mtp) and the README charts.

Each chart has two halves: a data helper that computes what is drawn from tensors (tested against hand-computed
cases and the references) and a ``*_figure`` builder that only draws. plotly is imported inside the builders:
bench scripts import ``dsv4lab.lab`` on the GPU host, which has no plotly.

- mHC: ``sinkhorn_passes`` / ``sinkhorn_history`` (row and column sum error after every normalisation pass) ->
  ``sinkhorn_figure``; ``mix_heatmaps`` (pre, post and one token's comb).
- attention: ``attention_sets`` (which keys each query attends, in token space) -> ``attention_sets_figure``;
  ``entry_scores_figure`` (indexer logits over compressed entries, the selected ones marked); ``attention_mass``
  (probability on window / compressed entries / sink) -> ``attention_mass_figure``.
- MoE: ``expert_load`` -> ``expert_load_figure``; ``router_scores_figure``.
- MTP: ``row_rms`` -> ``mtp_norm_figure``; ``logit_agreement`` -> ``agreement_figure``.
- stored results: ``latest``, ``stored_label``, ``floor_us``, ``stored_time_figure``.
- tensors: ``describe`` (shape, dtype, stats and first values of named intermediates, as a table).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

# ---- tensors --------------------------------------------------------------------------------------


def describe(head: int = 4, **tensors: torch.Tensor | None):
    """One row per named tensor: ``shape``, ``dtype``, ``mean``, ``std``, ``min``, ``max`` (fp64, over finite
    values; -inf/+inf/NaN counted in ``nonfinite``) and the first ``head`` values of the flattened tensor.
    ``None`` entries are listed as absent."""
    import pandas as pd

    rows = []
    for name, t in tensors.items():
        if t is None:
            rows.append(dict(tensor=name, shape="(absent)"))
            continue
        x = t.detach().cpu()
        x64 = x.double() if not x.dtype.is_complex else x.abs().double()
        finite = x64[torch.isfinite(x64)]
        stats = dict(mean=float(finite.mean()), std=float(finite.std()) if finite.numel() > 1 else 0.0,
                     min=float(finite.min()), max=float(finite.max())) if finite.numel() else {}
        first = x64.flatten()[:head].tolist()
        rows.append(dict(tensor=name, shape=str(list(x.shape)), dtype=str(x.dtype).removeprefix("torch."), **stats,
                         nonfinite=int(x64.numel() - finite.numel()),
                         first=", ".join(f"{v:.4g}" for v in first)))
    return pd.DataFrame(rows).set_index("tensor")


# ---- mHC: Sinkhorn --------------------------------------------------------------------------------


def sinkhorn_passes(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6
                    ) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Every intermediate of ``reference.mhc.sinkhorn`` (same ops, same order): yields ``(iteration, pass, C)``.

    Iteration 1 is ``softmax(logits, -1) + eps`` ("row") then the first column pass; iterations 2..iters are a
    row pass ``C / (C.sum(-1) + eps)`` then a column pass ``C / (C.sum(-2) + eps)``. The ``C`` after the column
    pass of iteration ``i`` equals ``sinkhorn(logits, i, eps)`` bitwise.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits: expected [..., n, n], got shape {tuple(logits.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive int, got {iters!r}")
    c = torch.softmax(logits, dim=-1) + eps
    yield 1, "row", c
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    yield 1, "column", c
    for i in range(2, iters + 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        yield i, "row", c
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
        yield i, "column", c


def sinkhorn_history(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6):
    """DataFrame, one row per pass: ``step`` (1, 2, ...), ``iteration``, ``pass``, and the worst deviation from
    a doubly stochastic matrix over all matrices in ``logits``: ``row_err = max |sum_k C[j,k] - 1|``,
    ``col_err = max |sum_j C[j,k] - 1|`` (fp64 sums of the fp32 C)."""
    import pandas as pd

    rows = []
    for step, (it, kind, c) in enumerate(sinkhorn_passes(logits, iters, eps), start=1):
        c64 = c.double()
        rows.append(dict(step=step, iteration=it, kind=kind,
                         row_err=float((c64.sum(-1) - 1).abs().max()), col_err=float((c64.sum(-2) - 1).abs().max())))
    return pd.DataFrame(rows).rename(columns={"kind": "pass"})


def sinkhorn_figure(history, eps: float | None = None, title: str = "Sinkhorn-Knopp: distance from doubly stochastic"):
    """Per iteration: the row-sum error after its column pass and the column-sum error after its row pass (the
    marginal each pass leaves unfixed), log y. ``history`` from ``sinkhorn_history`` (several concatenated with a
    ``label`` column give one colour per label); ``eps`` draws the floor a pass leaves on its own marginal."""
    import plotly.graph_objects as go
    import plotly.colors

    fig = go.Figure()
    groups = list(history.groupby("label", sort=False)) if "label" in history.columns else [("", history)]
    palette = plotly.colors.qualitative.Plotly
    for i, (label, h) in enumerate(groups):
        colour = palette[i % len(palette)]
        for kind, col, what, dash in (("column", "row_err", "rows", "solid"), ("row", "col_err", "columns", "dot")):
            part = h[h["pass"] == kind]
            fig.add_trace(go.Scatter(x=part["iteration"], y=part[col].clip(lower=1e-18), mode="lines+markers",
                                     name=f"{label} {what} (after the {kind} pass)".strip(),
                                     line=dict(dash=dash, color=colour)))
    if eps is not None:
        fig.add_hline(y=eps, line_dash="dash", line_color="grey", annotation_text=f"eps = {eps:g}")
    fig.update_yaxes(type="log", title="max |sum - 1|", exponentformat="e")
    fig.update_xaxes(title="iteration")
    fig.update_layout(title=title, height=400, margin=dict(t=50, l=60, r=20, b=50))
    return fig


def mix_heatmaps(pre: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, token: int = 0,
                 title: str = "mHC mixes"):
    """Three heatmaps: ``pre`` [T, n] and ``post`` [T, n] (token on y, stream on x) and ``comb[token]`` [n, n]
    (source stream j on y, output stream k on x; output stream k takes COLUMN k), values written in the cells."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t, n = pre.shape
    if post.shape != (t, n) or comb.shape != (t, n, n):
        raise ValueError(f"post/comb: expected [{t}, {n}] and [{t}, {n}, {n}], got {tuple(post.shape)}, "
                         f"{tuple(comb.shape)}")
    if not 0 <= token < t:
        raise ValueError(f"token: expected 0 <= token < {t}, got {token}")
    fig = make_subplots(1, 3, column_widths=[0.3, 0.3, 0.4], horizontal_spacing=0.1,
                        subplot_titles=(f"pre [T={t}, n]", f"post [T={t}, n]", f"comb[token {token}] (j -> k)"))
    streams = [f"s{i}" for i in range(n)]
    for col, (m, scale) in enumerate(((pre, "Blues"), (post, "Greens")), start=1):
        right = fig.layout[f"xaxis{col if col > 1 else ''}"].domain[1]
        fig.add_trace(go.Heatmap(z=m.float().cpu().numpy(), x=streams, colorscale=scale,
                                 colorbar=dict(x=right + 0.005, len=0.9, thickness=10),
                                 hovertemplate="token %{y}, stream %{x}: %{z:.4f}<extra></extra>"), 1, col)
        fig.update_yaxes(autorange="reversed", title="token" if col == 1 else None, row=1, col=col)
    c = comb[token].float().cpu().numpy()
    fig.add_trace(go.Heatmap(z=c, x=[f"k={k}" for k in range(n)], y=[f"j={j}" for j in range(n)],
                             colorscale="Oranges", zmin=0, zmax=1, text=[[f"{v:.3f}" for v in r] for r in c],
                             texttemplate="%{text}", colorbar=dict(title="comb", len=0.9),
                             hovertemplate="comb[%{y}, %{x}] = %{z:.5f}<extra></extra>"), 1, 3)
    fig.update_yaxes(autorange="reversed", row=1, col=3)
    fig.update_layout(title=title, height=420, margin=dict(t=70, l=60, r=20, b=40))
    return fig


# ---- attention: index sets ------------------------------------------------------------------------

SET_LABELS = ("future", "past, not attended", "in a compressed entry the indexer dropped",
              "in an attended compressed entry", "window", "window + attended entry")
_SET_COLOURS = ("#ffffff", "#e8e8e8", "#f6c28b", "#d9480f", "#1c7ed6", "#7048e8")


def attention_sets(T: int, window: int, ratio: int = 0, sel: torch.Tensor | None = None) -> torch.Tensor:
    """Which raw tokens feed each query, by route: ``codes`` uint8 [T, T], row = query t, column = token s.

    Codes (``SET_LABELS``): 0 future (s > t); 1 past but not attended; 2 inside a complete compressed entry
    that is visible to t but not among its selected entries (CSA: dropped by the indexer); 3 inside an attended
    entry; 4 in the sliding window ``t-W+1 <= s <= t`` only; 5 in the window AND inside an attended entry
    (DSv4 keeps both: the window's raw token and the entry that pools it).
    Entry j pools tokens ``[j*ratio, (j+1)*ratio)`` and is visible to t iff ``j < (t+1)//ratio``.
    ``sel`` [T, K] lists the entries each query attends (-1 = unused); ``ratio=0`` is window-only.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T: expected a non-negative int, got {T!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive int, got {window!r}")
    if ratio and sel is None:
        raise ValueError("sel: compressed layers (ratio > 0) need the selected entries per query")
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    codes = torch.ones(T, T, dtype=torch.uint8)
    codes[s > t] = 0
    if ratio:
        if sel.dim() != 2 or sel.shape[0] != T:
            raise ValueError(f"sel: expected [{T}, K], got {tuple(sel.shape)}")
        n_entries = T // ratio
        if sel.numel() and int(sel.max()) >= n_entries:
            raise ValueError(f"sel: entry ids must be < T//ratio = {n_entries}, got {int(sel.max())}")
        entry_of = s // ratio                                           # [1, T] entry that pools token s
        visible = (entry_of < (t + 1) // ratio) & (s < n_entries * ratio)
        picked = torch.zeros(T, n_entries + 1, dtype=torch.bool)       # column n_entries absorbs the -1 slots
        picked.scatter_(1, torch.where(sel < 0, n_entries, sel.long()), True)
        attended = picked[:, :n_entries].gather(1, entry_of.clamp(max=max(n_entries - 1, 0)).expand(T, T)) \
            if n_entries else torch.zeros(T, T, dtype=torch.bool)
        attended &= visible
        codes[visible] = 2
        codes[attended] = 3
    else:
        attended = torch.zeros(T, T, dtype=torch.bool)
    in_window = (s <= t) & (s > t - window)
    codes[in_window] = 4
    codes[in_window & attended] = 5
    return codes


def attention_sets_figure(panels: Mapping[str, torch.Tensor], title: str = "Which tokens each query attends"):
    """One heatmap per ``attention_sets`` result (query t on y, token s on x); the colour bar names the codes."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(panels)
    fig = make_subplots(1, len(names), subplot_titles=names, horizontal_spacing=0.04)
    k = len(SET_LABELS)
    # discrete colour scale: code c occupies [c/k, (c+1)/k] of the colour axis [-0.5, k-0.5]
    scale = [[(i + e) / k, col] for i, col in enumerate(_SET_COLOURS) for e in (0, 1)]
    for col, name in enumerate(names, start=1):
        fig.add_trace(go.Heatmap(z=panels[name].numpy(), zmin=-0.5, zmax=k - 0.5, colorscale=scale,
                                 showscale=col == len(names),
                                 colorbar=dict(tickvals=list(range(k)), ticktext=list(SET_LABELS), len=1.0),
                                 hovertemplate="query %{y}, token %{x}: code %{z}<extra></extra>"), 1, col)
        fig.update_yaxes(autorange="reversed", title="query t" if col == 1 else None, row=1, col=col)
        fig.update_xaxes(title="key token s", row=1, col=col)
    fig.update_layout(title=title, height=420, margin=dict(t=70, l=60, r=20, b=50), plot_bgcolor="white")
    return fig


def entry_scores_figure(logits: torch.Tensor, sel: torch.Tensor, title: str = "Lightning indexer logits"):
    """Indexer logits [T, N] (query t on y, compressed entry j on x; -inf = not yet visible, left blank) with the
    selected entries of each query marked."""
    import plotly.graph_objects as go

    z = logits.float().clone()
    z[~torch.isfinite(z)] = float("nan")
    t_idx, slot = torch.nonzero(sel >= 0, as_tuple=True)
    fig = go.Figure(go.Heatmap(z=z.numpy(), colorscale="Viridis", colorbar=dict(title="I[t, j]"),
                               hovertemplate="query %{y}, entry %{x}: %{z:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=sel[t_idx, slot].tolist(), y=t_idx.tolist(), mode="markers", name="selected (top-k)",
                             marker=dict(size=2, color="red", symbol="square", opacity=0.6)))
    fig.update_yaxes(autorange="reversed", title="query t")
    fig.update_xaxes(title="compressed entry j (pools tokens 4j..4j+3)")
    fig.update_layout(title=title, height=440, margin=dict(t=50, l=60, r=20, b=50))
    return fig


def attention_mass(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                   n_window: int):
    """Where each query's softmax probability goes, averaged over heads: DataFrame ``t, window, compressed, sink``.

    Same softmax as ``reference.attention.sparse_attention_with_sink`` (``q`` [T, H, d], ``kv`` [N, d], ``idx``
    [T, M] with -1 masked, ``sink`` [H]): ``p_u = exp(l_u) / (sum_u' exp(l_u') + exp(sink_h))``. The first
    ``n_window`` columns of ``idx`` are the window, the rest compressed entries; the sink takes the remainder.
    Rows sum to 1 (fp64).
    """
    T, H, d = q.shape
    if idx.shape[0] != T or not 0 <= n_window <= idx.shape[1] or sink.shape != (H,):
        raise ValueError(f"idx/n_window/sink: expected idx [{T}, M], 0 <= n_window <= M, sink [{H}]; got "
                         f"{tuple(idx.shape)}, {n_window}, {tuple(sink.shape)}")
    import pandas as pd

    kv_pad = torch.cat([kv.double(), kv.new_zeros(1, d, dtype=torch.float64)])
    keys = kv_pad[torch.where(idx < 0, kv.shape[0], idx.long())]                     # [T, M, d]
    logits = torch.einsum("thd,tmd->thm", q.double(), keys) * scale
    logits = logits.masked_fill((idx < 0)[:, None, :], float("-inf"))
    sink_l = sink.double().view(1, H, 1).expand(T, H, 1)
    full = torch.cat([logits, sink_l], dim=-1)
    p = torch.softmax(full, dim=-1)                                                   # sink = the last column
    mass = torch.stack([p[..., :n_window].sum(-1), p[..., n_window:-1].sum(-1), p[..., -1]], -1).mean(1)
    return pd.DataFrame(mass.numpy(), columns=["window", "compressed", "sink"]).rename_axis("t").reset_index()


def attention_mass_figure(masses: Mapping[str, Any], title: str = "Where the attention probability goes"):
    """Stacked areas (window, compressed entries, sink) vs query t, one panel per ``attention_mass`` table."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(masses)
    fig = make_subplots(1, len(names), subplot_titles=names, shared_yaxes=True, horizontal_spacing=0.03)
    colours = {"window": _SET_COLOURS[4], "compressed": _SET_COLOURS[3], "sink": "#868e96"}
    for col, name in enumerate(names, start=1):
        df = masses[name]
        for part in ("window", "compressed", "sink"):
            fig.add_trace(go.Scatter(x=df["t"], y=df[part], stackgroup="one", name=part, legendgroup=part,
                                     showlegend=col == 1, line=dict(width=0.5, color=colours[part])), 1, col)
        fig.update_xaxes(title="query t", row=1, col=col)
    fig.update_yaxes(title="probability (mean over heads)", range=[0, 1], row=1, col=1)
    fig.update_layout(title=title, height=380, margin=dict(t=70, l=60, r=20, b=50))
    return fig


# ---- MoE ------------------------------------------------------------------------------------------


def expert_load(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: int64 [n_experts] counts of ``ids`` [T, k] (a token counts once per slot)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids: expected an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise ValueError(f"ids: expected expert ids in [0, {n_experts})")
    return torch.bincount(ids.reshape(-1).long().cpu(), minlength=n_experts)


def expert_load_figure(loads: Mapping[str, torch.Tensor], ideal: float | None = None,
                       title: str = "Tokens per expert"):
    """Grouped bars, one group per expert and one bar per entry of ``loads``; ``ideal`` (T*k/E) as a line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, counts in loads.items():
        fig.add_trace(go.Bar(x=list(range(len(counts))), y=counts.tolist(), name=name))
    if ideal is not None:
        fig.add_hline(y=ideal, line_dash="dot", annotation_text=f"uniform T*k/E = {ideal:g}")
    fig.update_xaxes(title="expert", dtick=1 if max(len(c) for c in loads.values()) <= 32 else None)
    fig.update_yaxes(title="tokens routed")
    fig.update_layout(title=title, barmode="group", height=380, margin=dict(t=50, l=60, r=20, b=50))
    return fig


def router_scores_figure(scores: Mapping[str, torch.Tensor], ids: Mapping[str, torch.Tensor],
                         title: str = "Router scores s = sqrt(softplus(logits)), chosen experts marked"):
    """One heatmap per layer: token t on y, expert e on x, colour = score; the experts each token is routed to
    (``ids[name]`` [T, k]) as markers."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(scores)
    fig = make_subplots(1, len(names), subplot_titles=names, horizontal_spacing=0.06)
    for col, name in enumerate(names, start=1):
        s, chosen = scores[name].float(), ids[name]
        fig.add_trace(go.Heatmap(z=s.numpy(), colorscale="Blues", showscale=col == len(names),
                                 hovertemplate="token %{y}, expert %{x}: s = %{z:.3f}<extra></extra>"), 1, col)
        t = torch.arange(chosen.shape[0]).repeat_interleave(chosen.shape[1])
        fig.add_trace(go.Scatter(x=chosen.reshape(-1).tolist(), y=t.tolist(), mode="markers", showlegend=col == 1,
                                 name="routed to (marker)", marker=dict(size=5, color="#e8590c", symbol="circle")),
                      1, col)
        fig.update_yaxes(autorange="reversed", title="token" if col == 1 else None, row=1, col=col)
        fig.update_xaxes(title="expert", row=1, col=col)
    fig.update_layout(title=title, height=480, margin=dict(t=70, l=60, r=20, b=50),
                      legend=dict(orientation="h", y=-0.15))
    return fig


# ---- MTP ------------------------------------------------------------------------------------------


def row_rms(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean(x^2))`` over the last dim, fp64 on the CPU: [...]."""
    return x.detach().double().pow(2).mean(-1).sqrt().cpu()


def mtp_norm_figure(positions: torch.Tensor, e: torch.Tensor, h: torch.Tensor, channels: int = 64,
                    title: str = "MTP input norms: position-0 rows of enorm are zero"):
    """Left: ``e`` [T, D] (first ``channels`` channels), rows at position 0 zero. Right: the RMS of every row of
    ``e`` and of each hnorm stream ``h`` [T, n, D], position-0 rows marked."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = e.shape[0]
    fig = make_subplots(1, 2, column_widths=[0.45, 0.55], horizontal_spacing=0.1,
                        subplot_titles=(f"enorm output e[:, :{channels}]", "RMS per row"))
    fig.add_trace(go.Heatmap(z=e[:, :channels].float().cpu().numpy(), colorscale="RdBu", zmid=0, showscale=False,
                             hovertemplate="row %{y}, channel %{x}: %{z:.3f}<extra></extra>"), 1, 1)
    fig.update_yaxes(autorange="reversed", title="row (token)", row=1, col=1)
    rows = list(range(t))
    fig.add_trace(go.Scatter(x=rows, y=row_rms(e).tolist(), mode="lines+markers", name="e (enorm)",
                             line=dict(width=3)), 1, 2)
    for k in range(h.shape[1]):
        fig.add_trace(go.Scatter(x=rows, y=row_rms(h[:, k]).tolist(), mode="lines", name=f"h stream {k} (hnorm)",
                                 line=dict(dash="dot")), 1, 2)
    zero_rows = torch.nonzero(positions.cpu() == 0).flatten().tolist()
    fig.add_trace(go.Scatter(x=zero_rows, y=[0.0] * len(zero_rows), mode="markers", name="position 0",
                             marker=dict(symbol="x", size=10, color="black")), 1, 2)
    fig.update_xaxes(title="row (token)", row=1, col=2)
    fig.update_yaxes(title="RMS", row=1, col=2)
    fig.update_layout(title=title, height=400, margin=dict(t=70, l=60, r=20, b=50))
    return fig


def logit_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 5):
    """Row-wise agreement of two logit matrices [T, V]: DataFrame with ``row``, ``top1_equal`` (same argmax),
    ``topk_overlap`` (|top-k(a) & top-k(b)| / k), ``cosine`` and ``max_abs`` (fp64)."""
    import pandas as pd

    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a/b: expected two [T, V] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= a.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= V = {a.shape[1]}, got {k!r}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    ta, tb = a64.topk(k, -1).indices, b64.topk(k, -1).indices
    overlap = (ta[:, :, None] == tb[:, None, :]).any(-1).sum(-1).double() / k
    cos = torch.nn.functional.cosine_similarity(a64, b64, dim=-1)
    return pd.DataFrame(dict(row=range(a.shape[0]), top1_equal=(a64.argmax(-1) == b64.argmax(-1)).tolist(),
                             topk_overlap=overlap.tolist(), cosine=cos.tolist(),
                             max_abs=(a64 - b64).abs().amax(-1).tolist()))


def agreement_figure(tables: Mapping[str, Any], k: int = 5, title: str = "Logit agreement per row"):
    """Per-row top-k overlap and cosine similarity for each ``logit_agreement`` table in ``tables``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    import plotly.colors

    fig = make_subplots(1, 2, subplot_titles=(f"top-{k} overlap", "cosine similarity"), horizontal_spacing=0.1)
    palette = plotly.colors.qualitative.Plotly
    for i, (name, df) in enumerate(tables.items()):
        top1 = float(df["top1_equal"].mean())
        label = f"{name} (top-1 agree {top1:.0%})"
        marker = dict(color=palette[i % len(palette)])
        fig.add_trace(go.Scatter(x=df["row"], y=df["topk_overlap"], mode="markers", name=label, marker=marker,
                                 legendgroup=name), 1, 1)
        fig.add_trace(go.Scatter(x=df["row"], y=df["cosine"], mode="markers", name=label, legendgroup=name,
                                 marker=marker, showlegend=False), 1, 2)
    fig.update_yaxes(range=[-0.05, 1.05], row=1, col=1)
    fig.update_xaxes(title="row (token)")
    fig.update_layout(title=title, height=380, margin=dict(t=70, l=60, r=20, b=50),
                      legend=dict(orientation="h", y=-0.2))
    return fig


# ---- stored results -------------------------------------------------------------------------------


def latest(df, keys: Sequence[str]):
    """The most recent record (by ``timestamp``) per combination of ``keys`` (columns absent from ``df`` are
    ignored; NaN counts as a value)."""
    present = [k for k in keys if k in df.columns]
    if not len(df):
        return df
    return df.sort_values("timestamp", kind="stable").drop_duplicates(present, keep="last")


def floor_us(op_cost: Any, peaks: Any) -> float:
    """Roofline floor of one call in microseconds: ``max(bytes / copy_bw, flops / matmul rate)``, the matmul
    term only when the op has a matmul compute dtype whose peak was measured (``lab.roofline`` objects)."""
    t = op_cost.bytes / peaks.copy_bw
    rate = peaks.matmul_rate(getattr(op_cost, "compute_dtype", None))
    if rate:
        t = max(t, op_cost.flops / rate)
    return t * 1e6


def stored_label(df) -> str:
    """'stored results: <GPU(s)>, <date or date range>' of the records in ``df`` (or a no-records note)."""
    if not len(df):
        return "no stored results"
    gpus = ", ".join(sorted(df["gpu"].dropna().astype(str).unique())) if "gpu" in df else ""
    days = sorted(df["timestamp"].dropna().astype(str).str[:10].unique()) if "timestamp" in df else []
    when = days[0] if len(days) == 1 else (f"{days[0]} to {days[-1]}" if days else "undated")
    return f"stored results: {gpus or 'unknown GPU'}, {when}"


def stored_time_figure(df, op: str, *, preset: str | None = None, mode: str | None = None,
                       color: Sequence[str] = ("backend", "variant"),
                       floor_us: Callable[[int], float] | None = None, floor_name: str = "roofline floor",
                       title: str | None = None):
    """p50 time (p20-p80 bars) vs tokens of the ``time`` records of ``op`` (optionally one ``preset`` and one
    ``timing_mode``), one line per ``color`` combination, latest record per point, log-log; ``floor_us(T)`` is
    drawn dotted. The subtitle says these are stored results and from which GPU and date."""
    import plotly.graph_objects as go

    sel = df[(df["metric"] == "time") & (df["op"] == op)]
    if preset is not None:
        sel = sel[sel["preset"] == preset]
    if mode is not None and "timing_mode" in sel.columns:
        sel = sel[sel["timing_mode"] == mode]
    cols = [c for c in color if c in sel.columns]
    sel = latest(sel, [*cols, "preset", "tokens", "timing_mode", "norm_weight"])
    fig = go.Figure()
    for key, grp in sel.groupby(cols, sort=True, dropna=False) if cols else [("", sel)]:
        grp = grp.sort_values("tokens")
        name = " / ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)))
        err = {}
        if {"p20", "p80"} <= set(grp.columns) and grp["p20"].notna().all():
            err = dict(error_y=dict(type="data", symmetric=False, array=(grp["p80"] - grp["value"]).tolist(),
                                    arrayminus=(grp["value"] - grp["p20"]).tolist()))
        fig.add_trace(go.Scatter(x=grp["tokens"].tolist(), y=grp["value"].tolist(), mode="lines+markers",
                                 name=name, **err))
    if floor_us is not None and len(sel):
        ts = sorted(int(t) for t in sel["tokens"].dropna().unique())
        fig.add_trace(go.Scatter(x=ts, y=[floor_us(t) for t in ts], mode="lines", name=floor_name,
                                 line=dict(dash="dot", color="black")))
    what = " ".join(x for x in (op, preset, mode) if x)
    fig.update_layout(title=dict(text=f"{title or what}<br><sup>{stored_label(sel)}</sup>"), height=400,
                      margin=dict(t=80, l=60, r=20, b=50))
    fig.update_xaxes(type="log", title="tokens T")
    fig.update_yaxes(type="log", title="us per call (p50)")
    return fig
