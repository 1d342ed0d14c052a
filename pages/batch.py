"""Batch & sequential: many edits at once or one after another, and the metrics against the batch size or the
number of edits (the survey's Figures 6 and 7). Runs go on in the background, can be cancelled, and are kept in
the run store."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from editing.core.safety import resolve_allowed, save_upload
from editing.methods import available_methods, get_method
from eval.datasets import load_dataset
from ui.jobs import ExperimentJob, ExperimentPlan, curves_from, parse_sizes, run_store, time_left
from ui.plots import CORE_METRICS, CURVE_METRICS, SCOPE_COLUMNS, TABLE_LABELS, metric_curves
from ui.state import AppState, LoadedDataset, get_state
from ui.widgets import hparams_note, show_error

SOURCES = ("Bundled fact base (counterfactual edits)", "Upload a file", "A file on this machine")
MODE_LABELS = {"batch": "Batch — edit b cases at once", "sequential": "Sequential — one edit after another"}
X_TITLES = {"batch": "batch size", "sequential": "number of edits"}
POLL_SECONDS = 1.0


def _load_data(state: AppState, source: str, limit: int, seed: int, upload, typed_path: str) -> None:
    try:
        if source == SOURCES[0]:
            cases, label = load_dataset("demo", limit=limit, seed=seed), "bundled fact base"
        elif source == SOURCES[1]:
            if upload is None:
                st.error("Choose a file to upload first (CounterFact, ZsRE, MQuAKE, KnowEdit or a fact base, as JSON).")
                return
            path = save_upload(upload.getvalue(), upload.name)
            cases, label = load_dataset(path, limit=limit, seed=seed), upload.name
        else:
            if not typed_path.strip():
                st.error("Type the path of a data set file.")
                return
            path = resolve_allowed(typed_path.strip(), must_exist=True)
            cases, label = load_dataset(path, limit=limit, seed=seed), path.name
    except Exception as err:  # DatasetError, UnsafeInput, FileNotFoundError, ...: shown, inputs kept
        show_error(err)
        return
    if not cases:
        st.error("The data set holds no edit cases.")
        return
    state.dataset = LoadedDataset(label=label, cases=cases)
    st.success(f"Loaded {len(cases)} case(s) from {label}.")


def _data_section(state: AppState) -> None:
    st.subheader("1. Data")
    source = st.radio("Source", SOURCES, key="batch_source", horizontal=True, persist_state="session")
    upload, typed_path = None, ""
    if source == SOURCES[1]:
        upload = st.file_uploader("Data set file", type=["json", "jsonl"], key="batch_upload",
                                  help=("CounterFact, ZsRE, MQuAKE or KnowEdit records, or a fact base; "
                                        "the format is detected."))
    elif source == SOURCES[2]:
        typed_path = st.text_input("Path", key="batch_path", persist_state="session",
                                   help="Inside the bundled data folder, the EditScope cache, or a folder listed in "
                                        "EDITSCOPE_ALLOWED_DIRS.")
    left, right = st.columns(2)
    limit = left.number_input("Cases to read (a sample)", min_value=1, max_value=10_000, value=16, step=1,
                              key="batch_limit", persist_state="session")
    seed = right.number_input("Shuffle seed (bundled data)", min_value=0, value=0, step=1, key="batch_seed",
                              persist_state="session")
    if st.button("Load data", key="batch_load"):
        _load_data(state, source, int(limit), int(seed), upload, typed_path)
    if state.dataset is not None:
        st.caption(f"Loaded: {len(state.dataset.cases)} case(s) from {state.dataset.label} "
                   f"({sum(len(c.requests) for c in state.dataset.cases)} edit request(s)).")


def _start(state: AppState, methods: list[str], mode: str, sizes_text: str) -> None:
    ctx = state.context
    if ctx is None or ctx.handle is None:
        st.error(ctx.model_error if ctx and ctx.model_error else "No model is loaded; pick one in the sidebar.")
        return
    if state.dataset is None:
        st.error("Load a data set first (step 1).")
        return
    if state.job is not None and not state.job.done:
        st.error("An experiment is still running; cancel it or wait for it to finish.")
        return
    try:
        sizes = parse_sizes(sizes_text)
        hparams = {ctx.method: ctx.hparams} if ctx.method and ctx.hparams and not ctx.hparam_error else {}
        problems = {m: get_method(m).readiness(ctx.handle, hparams.get(m)) for m in methods}
        problems = {m: p for m, p in problems.items() if p}
        if problems:
            raise ValueError(" ".join(f"{m}: {p}" for m, p in problems.items()))
        plan = ExperimentPlan(methods=tuple(methods), mode=mode, sizes=sizes, dataset=state.dataset.label,
                              hparams=hparams)
    except Exception as err:
        show_error(err)
        return
    if plan.n_cases > len(state.dataset.cases):
        st.warning(f"Only {len(state.dataset.cases)} cases are loaded; the runs use all of them.")
    state.job = ExperimentJob(ctx.handle, state.dataset.cases, plan, store=run_store()).start()
    state.last_run_methods = tuple(methods)


def _experiment_section(state: AppState) -> None:
    st.subheader("2. Experiment")
    methods = available_methods()
    ctx = state.context
    default = [ctx.method] if ctx is not None and ctx.method in methods else methods[:1]
    with st.form("batch_form"):
        chosen = st.multiselect("Methods", methods, default=default, key="batch_methods", persist_state="session")
        kept = state.last_run_methods
        if kept is not None and tuple(chosen) == kept:
            sidebar = f" The sidebar's method is {ctx.method}." if ctx is not None and ctx.method and \
                ctx.method not in kept else ""
            st.caption(f"These are the methods of your last run ({', '.join(kept)}), kept for the next one; change "
                       f"them above.{sidebar}")
        mode = st.radio("Mode", list(MODE_LABELS), format_func=MODE_LABELS.get, key="batch_mode",
                        persist_state="session", horizontal=True)
        sizes = st.text_input("Sizes", value="1, 2, 4", key="batch_sizes", persist_state="session",
                              help="Batch mode: the batch sizes (every size edits the same max-size cases). "
                                   "Sequential mode: the largest number is how many edits are made in sequence.")
        hparams_note(ctx.method if ctx else None, ctx.hparams if ctx else {})
        started = st.form_submit_button("Run", type="primary")
    if started:
        _start(state, chosen, mode, sizes)


def _curves_chart(job: ExperimentJob, curves: pd.DataFrame, running: bool) -> None:
    x_title = X_TITLES[job.plan.mode]
    so_far = " — so far" if running else ""
    st.plotly_chart(metric_curves(curves, "x", x_title, CURVE_METRICS,
                                  title=f"Metrics against the {x_title} ({job.plan.dataset}){so_far}"),
                    key="batch_curves_live" if running else "batch_curves")


def _job_progress() -> None:
    job = get_state().job
    if job is None:
        return
    st.progress(job.progress, text=job.message + time_left(job.started_at, job.progress))
    if job.done:
        st.rerun(scope="app")  # draw the results and stop polling
    st.button("Cancel", key="batch_cancel", on_click=job.cancel, disabled=job.cancelled,
              help="Stops after the current step; the steps done so far are kept in the run store.")
    curves = job.curves(partial=True)
    if not curves.empty:  # the curves grow as steps land
        _curves_chart(job, curves, running=True)
    else:
        st.caption("The curves appear here as soon as the first step is judged.")


def _job_section(state: AppState) -> None:
    job = state.job
    if job is None:
        return
    st.subheader("3. Results")
    if not job.done:
        st.fragment(_job_progress, run_every=POLL_SECONDS)()
        return
    if job.cancelled:
        st.warning("The experiment was cancelled; the steps done before are shown and kept.")
    for error in job.errors:
        st.error(error)
    curves = job.curves()
    if curves.empty:
        st.info("No step finished.")
        return
    x_title = X_TITLES[job.plan.mode]
    _curves_chart(job, curves, running=False)
    # edit success and the efficacy-only failures beside the survey's four; a sequential run also shows its
    # first edits' (FT-L once kept first-edit efficacy 0.8 after 50 edits with none of them answered)
    first = ("first_efficacy_score", "first_edit_success", "first_n_efficacy_without_reliability")
    shown = (*CORE_METRICS, *SCOPE_COLUMNS, "score", *first, "wall_time_s")
    columns = ["method", "x", *[m for m in shown if m in curves.columns]]
    st.dataframe(curves[columns].rename(columns={"x": x_title, **TABLE_LABELS}), hide_index=True, key="batch_table")
    st.caption("Run ids in the store: " + ", ".join(str(r.result.run_id) for r in job.results))


def _past_runs_section(state: AppState) -> None:
    store = run_store()
    runs = store.list_runs()
    if runs.empty:
        st.caption("No runs stored yet.")
        return
    st.dataframe(runs.drop(columns=["error"]), hide_index=True, key="past_runs_table")
    ids = runs["run_id"].tolist()
    chosen = st.multiselect("Plot runs", ids, key="past_runs_pick",
                            format_func=lambda i: _run_label(runs, i),
                            help="Pick sequential runs for metrics against the number of edits, or batch runs of "
                                 "different batch sizes for metrics against the batch size.")
    if chosen:
        picked = runs[runs["run_id"].isin(chosen)]
        modes = set(picked["mode"])
        if len(modes) > 1:
            st.error("Pick runs of one mode to plot them together.")
        else:
            mode = modes.pop()
            summaries = [(f"{row.method} (run {row.run_id})" if mode == "sequential" else row.method,
                          int(row.batch_size or 1), store.load_run(int(row.run_id)).summary)
                         for row in picked.itertuples()]
            curves = curves_from("sequential" if mode == "sequential" else "batch", summaries)
            if curves.empty:
                st.info("These runs have no finished step.")
            else:
                x_title = X_TITLES.get(mode, "batch size")
                st.plotly_chart(metric_curves(curves, "x", x_title, CURVE_METRICS), key="past_runs_curves")
    run_id = st.selectbox("Export or delete a run", ids, key="past_run_one", format_func=lambda i: _run_label(runs, i))
    left, middle, right = st.columns(3)
    for column, suffix, label in ((left, ".csv", "Download summary (CSV)"), (middle, ".json", "Download all (JSON)")):
        column.download_button(label, data=lambda suffix=suffix, run_id=run_id: _export(store, run_id, suffix),
                               file_name=f"editscope-run-{run_id}{suffix}", key=f"past_run_export{suffix}",
                               on_click="ignore")
    if right.button("Delete run", key="past_run_delete"):
        try:
            store.delete(int(run_id))
        except KeyError as err:
            show_error(err)
        else:
            state.notify(f"Deleted run {run_id}.")
            st.rerun()


def _run_label(runs: pd.DataFrame, run_id: int) -> str:
    row = runs[runs["run_id"] == run_id].iloc[0]
    return f"#{run_id} {row['method']} {row['mode']} n={row['n']} b={row['batch_size']} ({row['status']})"


def _export(store, run_id: int, suffix: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="editscope-export-") as tmp:
        return store.export(int(run_id), Path(tmp) / f"run{suffix}").read_bytes()


state = get_state()
st.title("Batch & sequential")
st.caption("Edit many facts at once (batch) or one after another (sequential) and watch the metrics as the batch "
           "grows or the edits pile up — the survey's Figures 6 and 7. Runs go on in the background, can be "
           "cancelled, and every step is saved in the run store.")
new_tab, past_tab = st.tabs(["New experiment", "Past runs"])
with new_tab:
    _data_section(state)
    _experiment_section(state)
    _job_section(state)
with past_tab:
    _past_runs_section(state)
