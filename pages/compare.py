"""Compare methods: one edit through several methods side by side — metrics, predictions, cost."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from editing.core.session import EditSession
from editing.methods import available_methods, get_method
from eval.outcomes import resolve_true_target
from ui.actions import compare_methods, metrics_frame, predictions_frame, probeset_for
from ui.plots import (
    CORE_METRICS,
    SCOPE_COLUMNS,
    TABLE_LABELS,
    cost_figure,
    known_neighbours_label,
    memory_is_comparable,
    metrics_bars,
    metrics_radar,
)
from ui.sidebar import PREFERRED_METHODS
from ui.state import AppState, CompareResult, get_state
from ui.widgets import (
    FACT_FORMS,
    drop_carried_true_target,
    fact_inputs,
    hparams_note,
    read_fact,
    running,
    seed_fact_inputs,
    show_error,
    typed_request,
)

PREFIX = "cmp"
COUNTERFACT_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score")
MAX_DEFAULT = 3


def default_methods(methods: list[str]) -> list[str]:
    """Up to three methods picked before the person chooses (the usual baselines first)."""
    preferred = [m for m in (*PREFERRED_METHODS, "KN", "FT-M") if m in methods]
    rest = [m for m in methods if m not in preferred]
    return (preferred + rest)[:MAX_DEFAULT]


def _run(state: AppState, methods: list[str], on_stack: bool) -> None:
    fact = read_fact(state, PREFIX)
    ctx = state.context
    if ctx is None or ctx.handle is None:
        st.error(ctx.model_error if ctx and ctx.model_error else "No model is loaded; pick one in the sidebar.")
        return
    if not methods:
        st.error("Pick at least one method to compare.")
        return
    try:
        request, carried = typed_request(state, fact)
    except Exception as err:
        show_error(err)
        return
    hparams = {ctx.method: ctx.hparams} if ctx.method and ctx.hparams and not ctx.hparam_error else {}
    errors: dict[str, str] = {}
    runnable = []
    for name in methods:
        problem = get_method(name).readiness(ctx.handle, hparams.get(name))
        if problem:
            errors[name] = problem
        else:
            runnable.append(name)
    session = state.current_session()
    base_edits = list(session.edits) if on_stack and session is not None else []
    outcomes = {}
    true = None
    if runnable:
        try:
            label = f"Editing {request.subject} → {request.target_new} with {len(runnable)} method(s)"
            with running(label) as progress:
                base = EditSession(ctx.handle)
                for edit in base_edits:
                    base.push(edit)
                progress(0.0, "reading the model's own answer" if request.target_true is None else "building probes")
                true = resolve_true_target(base, request)  # the typed true target, else the model's own answer
                request = true.request
                probeset = probeset_for(request, [(p.prompt, p.answer, p.kind) for p in state.user_probes],
                                        handle=ctx.handle, progress=progress)
                outcomes, failed = compare_methods(ctx.handle, request, runnable, hparams, probeset, base_edits,
                                                   progress)
        except Exception as err:
            show_error(err)
            return
        errors.update(failed)
    if carried:
        drop_carried_true_target(state, fact, FACT_FORMS)
    state.compare = CompareResult(request=request, outcomes=outcomes, errors=errors, model_key=ctx.model.key,
                                  on_stack=bool(base_edits), true_target=true, carried_over=carried)


def _changed_style(frame: pd.DataFrame, methods: list[str]) -> pd.io.formats.style.Styler:
    def colour(row: pd.Series) -> list[str]:
        return ["background-color: #fff3b0" if col in methods and row[col] != row["pred_before"] else ""
                for col in row.index]

    formats = {f"{m} P(answer)": "{:.3f}" for m in methods}
    return frame.style.apply(colour, axis=1).format(formats)


def _show(result: CompareResult) -> None:
    request = result.request
    st.subheader(f"{request.subject}: {request.target_true or '…'} → {request.target_new}")
    base = "on top of your edit stack" if result.on_stack else "on the unedited model"
    st.caption(f"Each method edited a private copy of the stack, {base}; your own stack is unchanged.")
    if result.carried_over:
        st.info(f"The true target “{result.carried_over}” was left from the example you picked before and belongs "
                f"to that fact, not to this one; it was not used.")
    if result.true_target is not None:
        st.markdown(result.true_target.describe())
    for method, message in result.errors.items():
        st.warning(f"**{method}** did not run: {message}")
    if not result.outcomes:
        return
    metrics = metrics_frame(result.outcomes)
    core = [c for c in CORE_METRICS if c in metrics.columns]
    columns = core + [c for c in COUNTERFACT_METRICS if c in metrics.columns]
    # beside the survey's four: edit success (efficacy alone passes an edit the model does not answer) and
    # locality over known neighbours and unrelated facts; every method starts from the same model, so the
    # number of known neighbours goes in the label
    scope = [c for c in SCOPE_COLUMNS if c in metrics.columns and c != "n_locality_known"]
    known = metrics["n_locality_known"].tolist() if "n_locality_known" in metrics.columns else []
    labels = {**TABLE_LABELS, "locality_known": known_neighbours_label(known)}
    shown = metrics[[*core, *scope, *columns[len(core):]]].rename(columns=labels)
    shown["time (s)"] = metrics["wall_time_s"]
    comparable = memory_is_comparable(list(metrics["memory_kind"]))
    if comparable:
        shown["peak GPU memory (MiB)"] = metrics["peak_memory_bytes"] / 2**20
    counts = [labels[c] for c in scope if c.startswith("n_")]
    st.dataframe(shown.style.format("{:.3f}", na_rep="n/a").format("{:.0f}", na_rep="n/a", subset=counts),
                 key="cmp_metrics")
    chart = st.segmented_control("Chart", ["Radar", "Bars"], default="Radar", key="cmp_chart",
                                 persist_state="session")
    left, right = st.columns(2)
    with left:
        if chart == "Bars":
            st.plotly_chart(metrics_bars(metrics, columns), key="cmp_bars")
        else:
            st.plotly_chart(metrics_radar(metrics), key="cmp_radar")
    with right:
        st.plotly_chart(cost_figure(metrics[["wall_time_s", "peak_memory_bytes", "memory_kind"]]), key="cmp_cost")
        if not comparable:
            st.caption("Peak memory is not shown: on the CPU it is the growth of the whole server process's "
                       "memory, which depends on what ran before (memory one method freed is reused by the next, "
                       "and the first run loads shared statistics), so it cannot compare methods. On a GPU the "
                       "allocator's peak is exact and is shown for each method.")
    st.markdown("**Predictions per probe** — highlighted where a method changed the top prediction.")
    predictions = predictions_frame(result.outcomes)
    st.dataframe(_changed_style(predictions, list(result.outcomes)), hide_index=True, key="cmp_predictions")


state = get_state()
st.title("Compare methods")
st.caption("The same edit through several methods: the survey's metrics, every probe's prediction, and the cost.")
seed_fact_inputs(state, PREFIX)
methods = available_methods()
with st.form("cmp_form"):
    fact_inputs(PREFIX)
    chosen = st.multiselect("Methods", methods, default=default_methods(methods), key="cmp_methods",
                            persist_state="session")
    on_stack = st.checkbox("Apply on top of my edit stack", key="cmp_on_stack", persist_state="session",
                           help="Off: every method edits the unedited model.")
    ctx = state.context
    hparams_note(ctx.method if ctx else None, ctx.hparams if ctx else {})
    submitted = st.form_submit_button("Compare", type="primary")
if submitted:
    _run(state, chosen, on_stack)
if state.compare is not None:
    _show(state.compare)
