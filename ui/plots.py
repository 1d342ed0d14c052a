"""Plotly figures of the dashboard. Every figure has axis titles, a legend and hover text.

These functions only draw what ``eval/`` and ``editing/`` computed (plus plot geometry such as the
scope boundary); they never run the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from eval.outcomes import BROKEN, ELSEWHERE, KEPT, REACHED, STUCK, probe_outcome

#: outcome of one probe (eval.outcomes.OUTCOMES) — the colour of its point and row
OUTCOME_COLOURS = {
    REACHED: "#1a9850",
    ELSEWHERE: "#8e44ad",
    STUCK: "#fc8d59",
    BROKEN: "#d73027",
    KEPT: "#91bfdb",
}
KIND_SYMBOLS = {
    "reliability": "star",
    "generality": "circle",
    "portability": "diamond",
    "locality": "square",
    "unrelated": "x",
}
CORE_METRICS = ("reliability", "generality", "locality", "portability")
METRIC_LABELS = {
    "reliability": "Reliability",
    "generality": "Generality",
    "locality": "Locality",
    "portability": "Portability",
    "efficacy_score": "Efficacy score",
    "paraphrase_score": "Paraphrase score",
    "neighborhood_score": "Neighbourhood score",
    "efficacy_magnitude": "Efficacy magnitude",
    "paraphrase_magnitude": "Paraphrase magnitude",
    "neighborhood_magnitude": "Neighbourhood magnitude",
    "score": "Score (harmonic mean)",
    "fluency": "Fluency",
    "says": "Says the new target",
    # the figures beside them (eval.metrics.SCOPE_METRICS), named by what they count
    "edit_success": "Edit success (answers the new target)",
    "n_efficacy_without_reliability": "Efficacy without reliability (n)",
    "locality_known": "Locality (known neighbours)",
    "n_locality_known": "Known neighbours (n)",
    "n_locality": "Neighbours (n)",
    "locality_same_relation": "Locality (same-relation neighbours)",
    "unrelated": "Locality (random other facts)",
    "unrelated_unchanged": "Unrelated facts unchanged (random other facts)",
    "n_unrelated": "Unrelated facts (n)",
}
#: labels in tables, where locality stands beside its other figures: the plain one is named by how it counts
TABLE_LABELS = {**METRIC_LABELS, "locality": "Locality (agreement)",
                "first_efficacy_score": "First edits: efficacy score",
                "first_edit_success": "First edits: edit success",
                "first_n_efficacy_without_reliability": "First edits: efficacy without reliability (n)"}
#: the panels of the batch and sequential curves: the survey's four, then edit success, which (unlike
#: efficacy) fails an edit whose new target beats the old one while the model answers neither
CURVE_METRICS = (*CORE_METRICS, "edit_success")
#: the columns experiment and comparison tables add after the survey's four
SCOPE_COLUMNS = ("edit_success", "n_efficacy_without_reliability", "locality_known", "n_locality_known",
                 "locality_same_relation", "unrelated_unchanged")


def known_neighbours_label(counts: Sequence[float]) -> str:
    """The known-neighbour locality's column label, with its n when every row has the same one."""
    known = {int(c) for c in counts if c is not None and not pd.isna(c)}
    label = METRIC_LABELS["locality_known"]
    return label.replace(")", f", n={known.pop()})") if len(known) == 1 else label
LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), hoverlabel=dict(align="left"))


def point_outcomes(points: pd.DataFrame) -> list[str]:
    """Each scope-map point's outcome: its ``outcome`` column, else derived from ``in_scope``,
    ``flipped`` and ``answered`` (whether it gives its expected answer after; unknown counts as no)."""
    if "outcome" in points.columns:
        return [str(v) for v in points["outcome"]]
    answered = points["answered"] if "answered" in points.columns else [False] * len(points)
    return [probe_outcome(bool(s), bool(f), bool(a))
            for s, f, a in zip(points["in_scope"], points["flipped"], answered, strict=True)]


def _fmt_prob(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "–"


# -- predictions ---------------------------------------------------------------------------------
def top_predictions_figure(top_before: Sequence[tuple[str, float]], top_after: Sequence[tuple[str, float]],
                           title: str = "Next-token predictions for the edit prompt") -> go.Figure:
    """Grouped horizontal bars: each token's probability before and after the edit."""
    before, after = dict(top_before), dict(top_after)
    tokens = list(dict.fromkeys([*after, *before]))
    fig = go.Figure()
    for label, probs, colour in (("before", before, "#9e9e9e"), ("after", after, "#3366cc")):
        values = [probs.get(t) for t in tokens]
        fig.add_bar(y=tokens, x=[v if v is not None else 0.0 for v in values], name=f"{label} the edit",
                    orientation="h", marker_color=colour,
                    hovertext=[f"{t!r} {label}: {'not in top-k' if v is None else f'{v:.3f}'}"
                               for t, v in zip(tokens, values, strict=True)],
                    hoverinfo="text")
    fig.update_layout(title=title, barmode="group", xaxis_title="probability", yaxis_title="next token",
                      yaxis=dict(autorange="reversed"), legend_title_text="model", height=320, **LAYOUT)
    return fig


# -- scope map ------------------------------------------------------------------------------------
def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def scope_boundary(xy: np.ndarray, margin: float) -> np.ndarray:
    """A closed, rounded outline around ``xy`` (the hull of a circle of radius ``margin`` around each point)."""
    if len(xy) == 0:
        return np.zeros((0, 2))
    angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * max(margin, 1e-6)
    cloud = (xy[:, None, :] + ring[None, :, :]).reshape(-1, 2)
    hull = _convex_hull(cloud)
    return np.vstack([hull, hull[:1]])


def _scope_panel(fig: go.Figure, points: pd.DataFrame, stage: str, col: int, show_legend: bool,
                 margin: float) -> None:
    x, y = points[f"x_{stage}"].to_numpy(float), points[f"y_{stage}"].to_numpy(float)
    in_scope = points["in_scope"].to_numpy(bool)
    if in_scope.any():
        outline = scope_boundary(np.stack([x[in_scope], y[in_scope]], axis=1), margin)
        fig.add_trace(go.Scatter(x=outline[:, 0], y=outline[:, 1], mode="lines",
                                 name="intended scope (in-scope probes)",
                                 line=dict(color="#555555", dash="dash", width=1.5), hoverinfo="skip",
                                 legendgroup="scope", showlegend=show_legend), row=1, col=col)
    frame = points.assign(outcome=point_outcomes(points))
    for label, colour in OUTCOME_COLOURS.items():
        part = frame[frame["outcome"] == label]
        if part.empty:
            continue
        hover = [
            f"<b>{row.prompt}</b><br>kind: {row.kind}{' (in scope)' if row.in_scope else ' (out of scope)'}"
            f"<br>expected: {row.answer}<br>before: {row.pred_before} → after: {row.pred_after}"
            f"<br>P(expected) change: {_fmt_prob(row.prob_change)}<br>outcome: {row.outcome}"
            for row in part.itertuples()
        ]
        fig.add_trace(go.Scatter(
            x=part[f"x_{stage}"].tolist(), y=part[f"y_{stage}"].tolist(), mode="markers", name=label, legendgroup=label,
            showlegend=show_legend, customdata=part["probe_id"].tolist(), hovertext=hover, hoverinfo="text",
            marker=dict(color=colour, size=12, line=dict(color="#222222", width=0.8),
                        symbol=[KIND_SYMBOLS.get(k, "circle") for k in part["kind"]]),
        ), row=1, col=col)


def scope_map_figure(points: pd.DataFrame, stages: Sequence[str] = ("before", "after"),
                     projection: str = "umap", layer: int | None = None) -> go.Figure:
    """The survey's Figure 4: every probe in the model's hidden-state space, before and/or after the edit.

    Colour gives the probe's outcome (in scope: changed to the expected answer, to something else, or
    unchanged; out of scope: changed or kept — see :mod:`eval.outcomes`); the symbol gives
    its kind; the dashed outline surrounds the in-scope probes. Each point's customdata is its
    probe id, so a selection can filter the probe table.
    """
    titles = [f"{stage} the edit" for stage in stages]
    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=titles, shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.04)
    xs = np.concatenate([points[f"x_{s}"].to_numpy(float) for s in stages]) if len(points) else np.zeros(1)
    ys = np.concatenate([points[f"y_{s}"].to_numpy(float) for s in stages]) if len(points) else np.zeros(1)
    span = max(float(np.ptp(xs)), float(np.ptp(ys)), 1e-3)
    for col, stage in enumerate(stages, start=1):
        _scope_panel(fig, points, stage, col, show_legend=col == 1, margin=0.06 * span)
    for kind, symbol in KIND_SYMBOLS.items():
        if kind in set(points["kind"]):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"kind: {kind}", legendgroup="kinds",
                                     marker=dict(symbol=symbol, color="#bbbbbb", size=10,
                                                 line=dict(color="#222222", width=0.8)), hoverinfo="skip"),
                          row=1, col=1)
    axis = projection.upper()
    for col in range(1, len(stages) + 1):
        fig.update_xaxes(title_text=f"{axis} 1", row=1, col=col)
        fig.update_yaxes(title_text=f"{axis} 2", row=1, col=col)
    where = f"layer {layer}" if layer is not None else "the edited layer"
    fig.update_layout(title=f"Editing scope in the model's hidden states ({axis} of {where})", height=520,
                      legend=dict(orientation="v", x=1.02, y=1), dragmode="select", **LAYOUT)
    return fig


def selected_probe_ids(event: Any) -> list[str]:
    """Probe ids of the points selected in a scope-map chart (``st.plotly_chart(on_select=...)``)."""
    if not event:
        return []
    selection = event.get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    points = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    ids: list[str] = []
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, list | tuple):
            data = data[0] if data else None
        if data is not None and str(data) not in ids:
            ids.append(str(data))
    return ids


# -- comparing methods -----------------------------------------------------------------------------
def metrics_radar(metrics: pd.DataFrame, axes: Sequence[str] = CORE_METRICS) -> go.Figure:
    """One polygon per method (rows of ``metrics``) over the survey's four properties."""
    axes = [a for a in axes if a in metrics.columns and metrics[a].notna().any()]
    labels = [METRIC_LABELS.get(a, a) for a in axes]
    fig = go.Figure()
    for method, row in metrics.iterrows():
        values = [float(row[a]) if pd.notna(row[a]) else 0.0 for a in axes]
        fig.add_trace(go.Scatterpolar(
            r=[*values, values[0]] if values else [], theta=[*labels, labels[0]] if labels else [],
            fill="toself", opacity=0.55, name=str(method),
            hovertext=[f"{method} · {lab}: {v:.2f}" for lab, v in zip([*labels, labels[0]], [*values, values[0]],
                                                                    strict=True)] if values else [],
            hoverinfo="text"))
    fig.update_layout(title="Edit quality per method", polar=dict(radialaxis=dict(range=[0, 1], title="score")),
                      legend_title_text="method", height=420, **LAYOUT)
    return fig


def metrics_bars(metrics: pd.DataFrame, columns: Sequence[str]) -> go.Figure:
    """Grouped bars: one group per metric, one bar per method."""
    columns = [c for c in columns if c in metrics.columns]
    fig = go.Figure()
    for method, row in metrics.iterrows():
        values = [float(row[c]) if pd.notna(row[c]) else None for c in columns]
        fig.add_bar(x=[METRIC_LABELS.get(c, c) for c in columns], y=values, name=str(method),
                    hovertext=[f"{method} · {METRIC_LABELS.get(c, c)}: {'n/a' if v is None else f'{v:.3f}'}"
                               for c, v in zip(columns, values, strict=True)], hoverinfo="text")
    fig.update_layout(title="Metrics per method", barmode="group", xaxis_title="metric", yaxis_title="value",
                      legend_title_text="method", height=380, **LAYOUT)
    return fig


def cost_figure(costs: pd.DataFrame) -> go.Figure:
    """Wall time and, where it is comparable, peak memory per method (index: method; columns
    ``wall_time_s``, ``peak_memory_bytes`` and optionally ``memory_kind``).

    Peak memory is drawn only when every method was measured by the CUDA allocator's peak: on the
    CPU the figure is the growth of the whole process's resident set, which depends on what ran
    before (memory one method freed is reused by the next), so it cannot compare methods.
    """
    names = [str(m) for m in costs.index]
    seconds = costs["wall_time_s"].astype(float).tolist()
    with_memory = "memory_kind" in costs.columns and memory_is_comparable(list(costs["memory_kind"]))
    fig = make_subplots(rows=1, cols=2 if with_memory else 1,
                        subplot_titles=("Wall time", "Peak extra GPU memory") if with_memory else ("Wall time",))
    fig.add_bar(x=names, y=seconds, name="wall time (s)", marker_color="#3366cc",
                hovertext=[f"{n}: {s:.2f} s" for n, s in zip(names, seconds, strict=True)], hoverinfo="text",
                row=1, col=1)
    fig.update_yaxes(title_text="seconds", row=1, col=1)
    if with_memory:
        mib = (costs["peak_memory_bytes"].astype(float) / 2**20).tolist()
        fig.add_bar(x=names, y=mib, name="peak GPU memory (MiB)", marker_color="#ff9900",
                    hovertext=[f"{n}: {m:.1f} MiB (CUDA allocator peak above the start)"
                               for n, m in zip(names, mib, strict=True)], hoverinfo="text", row=1, col=2)
        fig.update_yaxes(title_text="MiB", row=1, col=2)
    fig.update_xaxes(title_text="method")
    fig.update_layout(title="Cost of computing the edit", legend_title_text="measure", showlegend=True, height=360,
                      **LAYOUT)
    return fig


def memory_is_comparable(kinds: Sequence[str]) -> bool:
    """Whether peak-memory figures of these measurements can be compared (all CUDA allocator peaks)."""
    return bool(kinds) and set(kinds) == {"cuda"}


def integer_ticks(values: Sequence[float], max_ticks: int = 12) -> dict[str, Any]:
    """Axis settings that put ticks on whole numbers only (batch sizes, numbers of edits): the values
    themselves when there are few, else a whole-number step."""
    finite = sorted({float(v) for v in values if v is not None and not pd.isna(v)})
    if not finite:
        return {}
    if len(finite) <= max_ticks and all(v.is_integer() for v in finite):
        return dict(tickmode="array", tickvals=[int(v) for v in finite], ticktext=[str(int(v)) for v in finite])
    span = finite[-1] - finite[0]
    step = max(1, math.ceil(span / max_ticks))
    return dict(tickmode="linear", tick0=0, dtick=step, tickformat="d")


# -- experiments -------------------------------------------------------------------------------------
def metric_curves(curves: pd.DataFrame, x: str, x_title: str, metrics: Sequence[str] = CORE_METRICS,
                  title: str = "") -> go.Figure:
    """One panel per metric, one line per method: the survey's Figures 6 (batch) and 7 (sequential).

    ``curves`` has a ``method`` column, the ``x`` column and one column per metric.
    """
    metrics = [m for m in metrics if m in curves.columns and curves[m].notna().any()]
    cols = max(1, len(metrics))
    fig = make_subplots(rows=1, cols=cols, subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics] or [""],
                        shared_yaxes=True)
    palette = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00"]
    for index, (method, part) in enumerate(curves.groupby("method", sort=False)):
        part = part.sort_values(x)
        colour = palette[index % len(palette)]
        for col, metric in enumerate(metrics, start=1):
            fig.add_trace(go.Scatter(
                x=part[x].tolist(), y=part[metric].tolist(), mode="lines+markers", name=str(method),
                legendgroup=str(method), showlegend=col == 1, line=dict(color=colour),
                hovertext=[f"{method} · {x_title} {xv}: {METRIC_LABELS.get(metric, metric)} "
                           f"{'n/a' if pd.isna(yv) else f'{yv:.3f}'}" for xv, yv in zip(part[x], part[metric],
                                                                                    strict=True)],
                hoverinfo="text"), row=1, col=col)
            fig.update_xaxes(title_text=x_title, row=1, col=col)
    if len(curves):
        fig.update_xaxes(**integer_ticks(curves[x].tolist()))  # batch sizes and edit counts are whole numbers
    fig.update_yaxes(title_text="score", range=[-0.02, 1.02])
    fig.update_layout(title=title or f"Metrics against {x_title}", legend_title_text="method", height=380, **LAYOUT)
    return fig


# -- causal tracing --------------------------------------------------------------------------------
TRACE_TITLES = {"block": "hidden state (residual stream)", "mlp": "MLP output", "attn": "attention output"}
TRACE_SCALES = {"block": "Purples", "mlp": "Greens", "attn": "Reds"}


def trace_heatmap(result: Any) -> go.Figure:
    """ROME's causal-tracing heatmap: P(answer) when one state is restored, per token and layer."""
    scores = result.scores.detach().float().cpu().numpy() if hasattr(result.scores, "detach") else \
        np.asarray(result.scores, dtype=float)
    start, end = result.subject_range
    labels = [f"{tok}*" if start <= i < end else tok for i, tok in enumerate(result.tokens)]
    # Duplicate token strings would merge rows on a categorical axis: keep rows apart by position.
    rows = [f"{i}: {lab}" for i, lab in enumerate(labels)]
    layers = list(range(scores.shape[1]))
    hover = [[f"token {rows[i]}<br>layer {j}<br>P({result.answer}) = {scores[i, j]:.3f}" for j in layers]
             for i in range(len(rows))]
    fig = go.Figure(go.Heatmap(z=scores.tolist(), x=layers, y=rows, colorscale=TRACE_SCALES.get(result.kind, "Viridis"),
                               colorbar=dict(title=f"P({result.answer})"), hovertext=hover, hoverinfo="text",
                               name=f"restored {TRACE_TITLES.get(result.kind, result.kind)}", showscale=True))
    fig.update_layout(
        title=(f"Restoring the {TRACE_TITLES.get(result.kind, result.kind)} — clean P = {result.base_score:.3f}, "
               f"corrupted P = {result.low_score:.3f}"),
        xaxis_title="layer", xaxis=dict(dtick=1), yaxis_title="token (* = subject)", yaxis=dict(autorange="reversed"),
        height=max(260, 34 * len(rows) + 120), showlegend=True, legend_title_text="state restored", **LAYOUT)
    return fig
