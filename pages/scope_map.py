"""Scope map: the survey's Figure 4 — where the last edit's probes sit in the model's hidden-state space,
which of them changed, and whether that was intended."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from eval.outcomes import BROKEN, ELSEWHERE, KEPT, REACHED, STUCK, gives_answer, is_intended
from eval.probes import ProbeSet, probes_for_requests
from eval.realfacts import factbase_for
from eval.scope import POSITIONS, PROJECTIONS, ScopeMap, scope_map, warm_up_umap
from ui.actions import answers_after, describe_edit, scope_outcomes
from ui.plots import scope_map_figure, selected_probe_ids
from ui.state import AppState, get_state
from ui.widgets import show_error

VIEWS = {"Side by side": ("before", "after"), "Before the edit": ("before",), "After the edit": ("after",)}
AUTO_LAYER = "the edited layer"
MAX_CACHED_MAPS = 8


@st.cache_resource(show_spinner="Preparing UMAP (first use of this server only)…")
def _umap_ready() -> bool:
    # Compiles numba's kernels once per process; every later fit is fast.
    warm_up_umap()
    return True


def _probeset_of_last_edit(state: AppState) -> ProbeSet:
    """The Playground's probes (with the person's own) when the last edit came from there, else the
    probes of the model's fact source for the edit's requests."""
    session = state.current_session()
    last = session.edits[-1]
    result = state.playground
    if result is not None and result.outcome.edit is last:
        return result.probeset
    return probes_for_requests(list(last.requests), factbase_for(session.handle))


def _answered(state: AppState, probeset: ProbeSet) -> dict[str, bool]:
    """Per probe: does the model, with the last edit, give the probe's expected answer? Read from the
    Playground's table when the last edit came from there, else from one teacher-forced pass."""
    session = state.current_session()
    result = state.playground
    if result is not None and result.outcome.edit is session.edits[-1]:
        table = result.outcome.table if result.added is None else pd.concat([result.outcome.table, result.added])
        known = {pid: gives_answer(acc) for pid, acc in zip(table["probe_id"], table["acc_after"], strict=True)}
        if all(p.id in known for p in probeset.probes):
            return known
    return answers_after(session, probeset)


def _scope(state: AppState, layer: int | None, position: str, method: str) -> ScopeMap:
    session = state.current_session()
    last = session.edits[-1]
    probeset = _probeset_of_last_edit(state)
    key = (last, len(probeset.probes), layer, position, method)  # the edit itself: ids can be reused
    cache = state.scope_maps
    if key not in cache:
        if method != "pca":
            _umap_ready()
        with st.spinner("Reading the hidden states of every probe, before and after the edit…"):
            scope = scope_map(session, probeset, layer=layer, position=position, method=method)
            answered = _answered(state, probeset)
        points = scope.points
        points["answered"] = [bool(answered.get(i, False)) for i in points["probe_id"]]
        points["outcome"] = scope_outcomes(points, answered)
        points["wanted"] = points["outcome"].map(is_intended).astype(bool)  # only the expected answer counts
        cache[key] = scope
        while len(cache) > MAX_CACHED_MAPS:
            cache.pop(next(iter(cache)))
    return cache[key]


def _summary(points: pd.DataFrame) -> None:
    inside, outside = points[points["in_scope"]], points[~points["in_scope"]]
    counts = points["outcome"].value_counts()

    def share(outcome: str, of: pd.DataFrame) -> str:
        return f"{int(counts.get(outcome, 0))} / {len(of)}"

    cols = st.columns(5)
    cols[0].metric("In scope: expected", share(REACHED, inside), border=True,
                   help="Edit prompt, paraphrases and consequences that now give their expected answer (every token "
                        "of it is the model's top choice) — the only in-scope outcome that was intended.")
    cols[1].metric("In scope: other answer", share(ELSEWHERE, inside), border=True,
                   help="In-scope probes whose top prediction changed, but not to the expected answer (e.g. a "
                        "consequence expecting “Rome” that now answers “Italy”). Not intended.")
    cols[2].metric("In scope: unchanged", share(STUCK, inside), border=True,
                   help="In-scope probes whose top prediction did not change. Not intended.")
    cols[3].metric("Out of scope: kept", share(KEPT, outside), border=True,
                   help=f"Neighbours and unrelated facts whose top prediction stayed (intended); the other "
                        f"{int(counts.get(BROKEN, 0))} changed.")
    cols[4].metric("As intended", f"{points['wanted'].mean():.0%}" if len(points) else "n/a", border=True,
                   help="Share of probes that behaved as a perfectly scoped edit would: in scope and now giving the "
                        "expected answer, or out of scope and unchanged.")


@st.fragment
def _plot_and_table(scope: ScopeMap, stages: tuple[str, ...]) -> None:
    figure = scope_map_figure(scope.points, stages, projection=scope.projection, layer=scope.layer)
    event = st.plotly_chart(figure, key="scope_chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
    chosen = selected_probe_ids(event)
    points = scope.points
    table = points[points["probe_id"].isin(chosen)] if chosen else points
    if chosen:
        st.caption(f"{len(table)} selected probe(s); clear the selection (double-click the plot) to see all.")
    else:
        st.caption("Select points (click, box or lasso) to filter the table.")
    st.dataframe(table[["probe_id", "kind", "in_scope", "prompt", "answer", "pred_before", "pred_after", "outcome",
                        "prob_change"]].style.format({"prob_change": "{:+.3f}"}), hide_index=True,
                 key="scope_table")


state = get_state()
st.title("Scope map")
st.caption("Every probe of your last edit as a point in the model's own hidden-state space (after Figure 4 of the "
           "survey). In-scope probes — the edit, its paraphrases, its consequences — lie inside the dashed outline; "
           "a well-scoped edit changes those to their expected answers and nothing outside it. An in-scope probe that "
           "changed to another answer is not a success: it is shown apart (purple).")
session = state.current_session()
ctx = state.context
if session is None:
    st.info(ctx.model_error if ctx and ctx.model_error else "Load a model in the sidebar first.")
elif not session.edits:
    st.info("Your edit stack is empty: apply an edit in the Playground, then come back here.")
else:
    st.markdown(f"**Last edit:** {session.edits[-1].method} — {describe_edit(session.edits[-1])}")
    n_layers = session.handle.n_layers
    cols = st.columns([1, 1, 1, 2])
    layer_pick = cols[0].selectbox("Layer", [AUTO_LAYER, *range(n_layers)], key="scope_layer",
                                   persist_state="session")
    position = cols[1].selectbox("Token", POSITIONS, key="scope_position", persist_state="session",
                                 format_func=lambda p: {"last": "prompt's last token",
                                                        "subject": "subject's last token"}[p])
    method = cols[2].selectbox("Projection", PROJECTIONS, key="scope_projection", persist_state="session",
                               help="auto: UMAP from 15 probes on, PCA below.")
    view = cols[3].segmented_control("Show", list(VIEWS), default="Side by side", key="scope_view",
                                     persist_state="session")
    layer = None if layer_pick == AUTO_LAYER else int(layer_pick)
    try:
        scope = _scope(state, layer, position, method)
    except Exception as err:
        show_error(err)
    else:
        st.caption(f"{len(scope.points)} probes · {scope.projection.upper()} of the block-{scope.layer} output at the "
                   f"{'subject' if scope.position == 'subject' else 'prompt'}'s last token, before and after "
                   f"projected together.")
        _summary(scope.points)
        _plot_and_table(scope, VIEWS.get(view or "Side by side", VIEWS["Side by side"]))
