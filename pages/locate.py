"""Locate: causal tracing of a typed fact (ROME's heatmaps) — which hidden states carry it."""

from __future__ import annotations

from contextlib import nullcontext

import streamlit as st

from editing.analysis.trace import causal_trace, default_window
from ui.plots import TRACE_TITLES, trace_heatmap
from ui.state import AppState, TraceView, get_state
from ui.widgets import fact_inputs, read_fact, running, seed_fact_inputs, show_error

PREFIX = "loc"
KINDS = ("block", "mlp", "attn")


def _trace(state: AppState, kinds: list[str], n_samples: int, window: int, answer: str, with_edits: bool) -> None:
    fact = read_fact(state, PREFIX)
    ctx = state.context
    if ctx is None or ctx.handle is None:
        st.error(ctx.model_error if ctx and ctx.model_error else "No model is loaded; pick one in the sidebar.")
        return
    prompt, subject = " ".join(fact.prompt.split()), " ".join(fact.subject.split())
    if not prompt or not subject:
        st.error("Type a prompt and the subject it contains.")
        return
    prompt = prompt.replace("{}", subject)
    if not kinds:
        st.error("Pick at least one kind of state to restore.")
        return
    session = state.current_session() if with_edits else None
    answer = answer.strip()
    results = {}
    try:
        with running(f"Causal tracing of '{prompt}'") as progress:
            for index, kind in enumerate(kinds):
                def report(fraction: float, message: str, index: int = index, kind: str = kind) -> None:
                    progress((index + fraction) / len(kinds), f"{kind}: {message}")

                # causal_trace holds the model's lock, so no other session's edit is applied meanwhile;
                # with the person's edits it runs inside their session (which holds the same lock).
                with session.active() if session is not None else nullcontext():
                    results[kind] = causal_trace(ctx.handle, prompt, subject, answer=answer or None, kind=kind,
                                                 n_samples=n_samples, window=window, progress=report)
                answer = answer or results[kind].answer  # every kind traces the same answer
    except Exception as err:
        show_error(err)
        return
    state.trace = TraceView(prompt=prompt, subject=subject, results=results, model_key=ctx.model.key,
                            with_edits=session is not None and bool(session.edits))


state = get_state()
st.title("Locate")
st.caption("Causal tracing (Meng et al., 2022): the subject's embeddings are corrupted with noise, then one hidden "
           "state at a time is restored from the clean run. Where restoring brings the answer back, that state "
           "carries the fact.")
seed_fact_inputs(state, PREFIX)
with st.form("loc_form"):
    fact_inputs(PREFIX, include_target_true=False, include_target_new=False)
    answer = st.text_input("Answer to trace (optional)", key="loc_answer",
                           help="Default: the model's own most likely next token.")
    left, middle, right = st.columns(3)
    kinds = left.multiselect("States to restore", KINDS, default=list(KINDS), key="loc_kinds",
                             format_func=lambda k: TRACE_TITLES[k], persist_state="session")
    n_samples = middle.number_input("Noise samples", min_value=1, max_value=50, value=10, step=1, key="loc_samples",
                                    persist_state="session")
    handle = state.context.handle if state.context is not None else None
    window = right.number_input("Window (layers, MLP/attention)", min_value=1, max_value=64, step=1,
                                value=default_window(handle.n_layers) if handle is not None else 1,
                                key="loc_window", persist_state="session",
                                help="Layers restored together around each layer for MLP and attention. "
                                     "Default: a quarter of the model's layers, at most 10 (ROME's 10 on "
                                     "GPT-2 XL's 48 layers); a window twice as deep as the model makes every "
                                     "column equal.")
    with_edits = st.checkbox("Trace the model with my edits applied", key="loc_with_edits", persist_state="session",
                             help="Off: the unedited model. On: see where your edits put the fact.")
    submitted = st.form_submit_button("Trace", type="primary")
if submitted:
    _trace(state, list(kinds), int(n_samples), int(window), answer, with_edits)
view = state.trace
if view is not None:
    first = next(iter(view.results.values()))
    st.subheader(f"{view.prompt} → {first.answer}")
    if view.with_edits:
        st.caption("Traced with your edits applied.")
    start, end = first.subject_range
    st.caption(f"Subject tokens (marked *): {', '.join(first.tokens[start:end])}. Clean P({first.answer}) = "
               f"{first.base_score:.3f}; with the subject corrupted = {first.low_score:.3f}.")
    for kind, result in view.results.items():
        st.plotly_chart(trace_heatmap(result), key=f"loc_heatmap_{kind}")
