"""Playground: type a fact, apply the edit, and read what changed on every probe."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from editing.edit import EditError
from editing.request import EditRequest
from eval.datasets import EditCase, load_dataset
from eval.probes import IN_SCOPE_KINDS, PROBE_KINDS, ProbeSet
from ui.actions import apply_and_evaluate, check_added_probes, example_facts, intended_column, probeset_for
from ui.plots import METRIC_LABELS, OUTCOME_COLOURS, outcome_label, top_predictions_figure
from ui.state import AppState, FactInputs, PlaygroundResult, UserProbe, get_state
from ui.widgets import fact_inputs, read_fact, request_from, running, seed_fact_inputs, set_fact, show_error

PREFIX = "pg"
FORM_PREFIXES = ("pg", "cmp", "loc")  # forms that share the typed fact
NO_EXAMPLE = "— type your own fact —"
BUNDLED_CASES = 50


@st.cache_data(show_spinner=False)
def _examples() -> dict[str, tuple[str, str, str, str]]:
    return {e.label: (e.prompt, e.subject, e.target_new, e.target_true) for e in example_facts()}


@st.cache_resource(show_spinner=False)
def _bundled_cases() -> list[EditCase]:
    # Shared read-only by every session (probe sets are copied before anyone extends them).
    return load_dataset("demo", limit=BUNDLED_CASES)


def _case_options(state: AppState) -> dict[str, EditCase]:
    """Single-edit cases of the bundled data set and of the data set loaded on the Batch page."""
    sources = [("bundled", _bundled_cases())]
    if state.dataset is not None:
        sources.append((state.dataset.label, state.dataset.cases))
    options: dict[str, EditCase] = {}
    for label, cases in sources:
        for case in cases:
            if len(case.requests) == 1:
                r = case.requests[0]
                options[f"[{label}] {case.case_id}: {r.subject}: {r.target_true or '…'} → {r.target_new}"] = case
    return options


def _use_example() -> None:
    label = st.session_state.get("pg_example")
    if label and label != NO_EXAMPLE:
        prompt, subject, target_new, target_true = _examples()[label]
        state = get_state()
        state.picked_case = None
        set_fact(state, FactInputs(prompt, subject, target_new, target_true), FORM_PREFIXES)


def _use_case() -> None:
    state = get_state()
    case = _case_options(state).get(st.session_state.get("pg_case") or "")
    if case is not None:
        r = case.requests[0]
        state.picked_case = case
        set_fact(state, FactInputs(r.text, r.subject, r.target_new, r.target_true or ""), FORM_PREFIXES)


def _case_probes(state: AppState, request: EditRequest) -> ProbeSet | None:
    """The picked data-set case's own probes, while the form still holds that case's request."""
    case = state.picked_case
    if case is not None and case.requests[0] == request:
        return case.probes
    return None


def _apply(state: AppState) -> None:
    fact = read_fact(state, PREFIX)
    ctx = state.context
    problem = ctx.ready_to_edit if ctx is not None else "The sidebar has not loaded yet."
    if problem:
        st.error(problem)
        return
    try:
        request = request_from(fact)
        probeset = probeset_for(request, [(p.prompt, p.answer, p.kind) for p in state.user_probes],
                                base=_case_probes(state, request))
        session = state.current_session()
        with running(f"Applying {ctx.method}: {request.subject} → {request.target_new}") as progress:
            outcome = apply_and_evaluate(session, ctx.method, request, probeset, ctx.hparams, progress)
    except Exception as err:  # every failure is shown; the typed fact stays in the form
        show_error(err)
        return
    state.playground = PlaygroundResult(request=request, method=ctx.method, probeset=probeset, outcome=outcome,
                                        model_key=ctx.model.key)
    state.notify(f"{ctx.method} edited {request.subject}: {request.target_true or '…'} → {request.target_new}.")
    st.rerun()  # the sidebar's stack was drawn before this edit


def _metric_tiles(metrics: dict[str, float]) -> None:
    def known(value: float | None) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    def tile(column, key: str, help_text: str) -> None:
        value, before = metrics.get(key), metrics.get(f"{key}_before")
        shown = f"{value:.0%}" if known(value) else "n/a"
        delta = f"{value - before:+.0%} vs before" if known(value) and known(before) else None
        column.metric(METRIC_LABELS[key], shown, delta=delta, help=help_text, border=True)

    cols = st.columns(4)
    tile(cols[0], "reliability", "Token-level accuracy of the new target on the edit prompt.")
    tile(cols[1], "generality", "Accuracy of the new target on paraphrases of the edit.")
    tile(cols[2], "locality", "Agreement of neighbouring and unrelated facts with their answers before the edit.")
    tile(cols[3], "portability", "Accuracy on consequences of the edit (e.g. 2-hop questions through the new object).")
    cols = st.columns(4)
    tile(cols[0], "efficacy_score", "CounterFact: share of edit prompts with P(new) > P(true).")
    tile(cols[1], "paraphrase_score", "CounterFact: share of paraphrases with P(new) > P(true).")
    tile(cols[2], "neighborhood_score", "CounterFact: share of neighbours still preferring their true answer.")
    tile(cols[3], "score", "Harmonic mean of the three CounterFact scores.")


def probe_table_view(table: pd.DataFrame) -> pd.io.formats.style.Styler:
    """The per-probe table as shown: changed answers coloured by whether the change was wanted."""
    shown = table.assign(as_intended=intended_column(table))
    shown = shown[["probe_id", "kind", "subkind", "prompt", "answer", "pred_before", "prob_before", "pred_after",
                   "prob_after", "changed", "as_intended"]]

    def colour(row: pd.Series) -> list[str]:
        label = outcome_label(bool(row["changed"]), row["kind"] in IN_SCOPE_KINDS)
        if not row["changed"] and row["as_intended"]:
            return [""] * len(row)
        return [f"background-color: {OUTCOME_COLOURS[label]}33"] * len(row)

    return shown.style.apply(colour, axis=1).format({"prob_before": "{:.3f}", "prob_after": "{:.3f}"})


def _show_result(state: AppState, result: PlaygroundResult) -> None:
    outcome = result.outcome
    edit = outcome.edit
    request = result.request
    st.subheader(f"{result.method}: {request.subject} → {request.target_new}")
    session = state.current_session()
    if result.model_key != (state.context.model.key if state.context else None):
        st.info("This result is from another model than the one picked in the sidebar.")
    elif session is None or not any(e is edit for e in session.edits):
        st.info("This edit is no longer on your stack (undone or cleared); the results are from when it was applied.")
    memory = f"{outcome.peak_memory_bytes / 2**20:.1f} MiB ({outcome.memory_kind})"
    st.caption(f"Computed in {outcome.wall_time_s:.2f} s · peak extra memory {memory} · "
               f"stored size {edit.size_bytes / 1024:.1f} KiB · edit kind: {edit.kind.replace('_', ' ')}")
    _metric_tiles(outcome.metrics)
    table = outcome.table if result.added is None else pd.concat([outcome.table, result.added], ignore_index=True)
    reliability = table[table["kind"] == "reliability"]
    if not reliability.empty:
        row = reliability.iloc[0]
        left, right = st.columns([2, 3])
        with left:
            st.markdown(f"**Edit prompt:** {row['prompt']} …")
            with st.container(key="pg_edit_result"):
                st.markdown(f"Before the edit: **{row['pred_before']}** → after: **{row['pred_after']}**  \n"
                            f"P({row['answer']}): {row['prob_before']:.3f} → {row['prob_after']:.3f}")
        with right:
            labels = {r.probe_id: f"{r.kind}: {r.prompt}" for r in table.itertuples()}
            if st.session_state.get("pg_top_probe") not in labels:  # a new edit: start from its own prompt
                st.session_state["pg_top_probe"] = row["probe_id"]
            picked = st.selectbox("Top predictions for", list(labels), format_func=labels.get, key="pg_top_probe")
            probe = table[table["probe_id"] == picked].iloc[0] if picked in labels else row
            st.plotly_chart(top_predictions_figure(probe["top_before"], probe["top_after"],
                                                   title=f"Next-token predictions: {probe['prompt']} …"),
                            key="pg_top_chart")
    own = table[table["source"] == "user"] if "source" in table.columns else table.iloc[:0]
    if not own.empty:
        with st.container(key="pg_user_probes"):
            st.markdown("**Your probes**\n" + "\n".join(
                f"- *{r.kind}*: {r.prompt} → expected **{r.answer}**: before **{r.pred_before}**, after "
                f"**{r.pred_after}**" for r in own.itertuples()))
    st.markdown("**Every probe** — rows whose top prediction changed are coloured: green when that was "
                "intended (in scope), red when not; orange marks in-scope probes that did not change.")
    st.dataframe(probe_table_view(table), hide_index=True, key="pg_table")
    changed = int(table["changed"].sum())
    st.caption(f"{changed} of {len(table)} probes changed their top prediction.")


def _add_probe_form(state: AppState) -> None:
    with st.expander("Add your own probes", expanded=bool(state.user_probes)):
        with st.form("pg_probe_form", clear_on_submit=True):
            prompt = st.text_input("Probe prompt", key="pg_probe_prompt",
                                   placeholder="e.g. The capital of the country where Eiffel Tower is located is")
            left, right = st.columns(2)
            answer = left.text_input("Expected answer", key="pg_probe_answer")
            kinds = [k for k in PROBE_KINDS if k != "reliability"]
            kind = right.selectbox("Kind", kinds, key="pg_probe_kind",
                                   help="In scope (should follow the edit): generality, portability. "
                                        "Out of scope (should not change): locality, unrelated.")
            added = st.form_submit_button("Add probe")
        if added:
            if not prompt.strip() or not answer.strip():
                st.error("A probe needs both a prompt and an expected answer.")
            else:
                probe = UserProbe(prompt.strip(), answer.strip(), kind)
                state.user_probes.append(probe)
                _check_new_probe(state, probe)
        if state.user_probes:
            st.markdown("\n".join(f"- *{p.kind}*: {p.prompt} → **{p.answer}**" for p in state.user_probes))
            st.caption("Your probes are added to every edit you apply here.")
            if st.button("Remove my probes", key="pg_probe_clear"):
                state.user_probes.clear()
                st.rerun()


def _check_new_probe(state: AppState, probe: UserProbe) -> None:
    """Answer a newly typed probe with and without the last Playground edit, if it is still on the stack."""
    result = state.playground
    session = state.current_session()
    if result is None or session is None or result.model_key != state.context.model.key:
        return
    try:
        rows = check_added_probes(session, result.outcome.edit, result.probeset, [(probe.prompt, probe.answer,
                                                                                     probe.kind)])
    except EditError as err:
        st.info(f"{err} Your probe will be checked with the next edit.")
        return
    except Exception as err:
        show_error(err)
        return
    result.added = rows if result.added is None else pd.concat([result.added, rows], ignore_index=True)


state = get_state()
st.title("Playground")
st.caption("Type a fact, apply it with the method picked in the sidebar, and see what the edit changed: the edit "
           "itself, its paraphrases, its neighbours and its consequences.")
seed_fact_inputs(state, PREFIX)
left, right = st.columns(2)
left.selectbox("Start from a fact of the fact base (a counterfactual new target is filled in)",
               [NO_EXAMPLE, *_examples()], key="pg_example", on_change=_use_example)
right.selectbox("… or from a data-set case (its own probes are used)", [NO_EXAMPLE, *_case_options(state)],
                key="pg_case", on_change=_use_case)
with st.form("pg_form"):
    fact_inputs(PREFIX)
    submitted = st.form_submit_button("Apply edit", type="primary")
if submitted:
    _apply(state)
_add_probe_form(state)
if state.playground is not None:
    _show_result(state, state.playground)
