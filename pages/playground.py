"""Playground: type a fact, apply the edit, and read what changed on every probe — and whether the
model now really *says* the new target."""

from __future__ import annotations

import math
import re

import pandas as pd
import streamlit as st

from editing.core.edit import EditError
from editing.core.request import EditRequest
from editing.models.loader import ModelHandle
from eval.datasets import EditCase, load_dataset
from eval.outcomes import (
    GENERATION_TOKENS,
    efficacy_detail,
    format_prob,
    generated_rows,
    locality_detail,
    missing_probe_reasons,
    resolve_true_target,
    says_share,
)
from eval.probes import PROBE_KINDS, ProbeSet
from eval.realfacts import factbase_for, is_demo, known_facts
from ui.actions import (
    apply_and_evaluate,
    check_added_probes,
    example_facts,
    metrics_with_added,
    outcome_column,
    probeset_for,
    target_breakdown,
)
from ui.plots import METRIC_LABELS, OUTCOME_COLOURS, memory_is_comparable, top_predictions_figure
from ui.state import AppState, FactInputs, PlaygroundResult, UserProbe, get_state
from ui.widgets import (
    FACT_FORMS,
    drop_carried_true_target,
    fact_inputs,
    read_fact,
    running,
    seed_fact_inputs,
    set_fact,
    show_error,
    typed_request,
)

PREFIX = "pg"
NO_EXAMPLE = "— type your own fact —"
BUNDLED_CASES = 50
PROBE_WIDGETS = ("pg_probe_prompt", "pg_probe_answer", "pg_example", "pg_case")  # widgets emptied on the next run
PROMPT_TIP = ("Write prompts that end exactly where the answer starts: real models often continue a short prompt "
              "with “the” or a comma before the answer, so “The Eiffel Tower is in” may go on “… the heart of "
              "Paris”. “The Eiffel Tower is located in the country of” leaves room for the answer only.")

#: what each tile measures (its help text)
TILE_HELP = {
    "reliability": "The survey's / EasyEdit's reliability: token accuracy of the new target on the edit prompt — "
                   "the share of its tokens that are the model's top choice, each given the target's earlier tokens "
                   "(teacher forcing). For a two-token target, 50 % means one of its two tokens is right; it does "
                   "not say that the model writes the target.",
    "generality": "Token accuracy of the new target on paraphrases of the edit prompt (teacher-forced, as "
                  "reliability).",
    "locality": "Locality (agreement): agreement, token by token, of the answers of neighbouring facts after the "
                "edit with their answers before it (1 = nothing outside the edit moved). It also credits a "
                "neighbour the model never answered right for keeping its wrong answer; the locality over the "
                "known neighbours (answered correctly before the edit) is given below the tiles.",
    "portability": "Token accuracy of the expected answers of the edit's consequences (e.g. 2-hop questions through "
                   "the new object: the capital of the country the landmark is now in).",
    "efficacy_score": "CounterFact's efficacy: share of edit prompts where P(new target) > P(true target), each the "
                      "per-token geometric mean probability (exp of the mean log-probability). It only compares the "
                      "two targets — both can be tiny — and needs a true target.",
    "paraphrase_score": "CounterFact: share of paraphrases where P(new target) > P(true target) (per-token geometric "
                        "means).",
    "neighborhood_score": "CounterFact: share of neighbours whose own true answer still beats the new target "
                          "(per-token geometric means).",
    "score": "Harmonic mean of the three CounterFact scores above.",
    "says": f"The plain verdict: share of the edit prompt and its paraphrases whose greedy continuation "
            f"({GENERATION_TOKENS} tokens, no teacher forcing) contains the new target as whole words.",
}


@st.cache_data(show_spinner=False)
def _examples_of(model: str, _handle: ModelHandle | None) -> dict[str, tuple[str, str, str, str]]:
    factbase = factbase_for(_handle) if _handle is not None else None  # the facts this model knows
    return {e.label: (e.prompt, e.subject, e.target_new, e.target_true) for e in example_facts(factbase)}


def _examples() -> dict[str, tuple[str, str, str, str]]:
    """Example facts for the loaded model (the fact base for the demo, real facts it knows otherwise)."""
    ctx = get_state().context
    handle = ctx.handle if ctx is not None else None
    return _examples_of(handle.name if handle is not None else "demo", handle)


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
        set_fact(state, FactInputs(prompt, subject, target_new, target_true), FACT_FORMS)


def _use_case() -> None:
    state = get_state()
    case = _case_options(state).get(st.session_state.get("pg_case") or "")
    if case is not None:
        r = case.requests[0]
        state.picked_case = case
        set_fact(state, FactInputs(r.text, r.subject, r.target_new, r.target_true or ""), FACT_FORMS)


def _case_probes(state: AppState, request: EditRequest) -> ProbeSet | None:
    """The picked data-set case's own probes, while the form still holds that case's request."""
    case = state.picked_case
    if case is not None and case.requests[0] == request:
        return case.probes
    return None


def _md(text: object) -> str:
    """Text shown inside markdown as typed or generated (no accidental emphasis, links or headings)."""
    return re.sub(r"([\\`*_\[\]<>#|~$])", r"\\\1", str(text)).replace("\n", " ")


def _apply(state: AppState) -> None:
    fact = read_fact(state, PREFIX)
    ctx = state.context
    problem = ctx.ready_to_edit if ctx is not None else "The sidebar has not loaded yet."
    if problem:
        st.error(problem)
        return
    try:
        typed, carried = typed_request(state, fact)
        session = state.current_session()
        with running(f"Applying {ctx.method}: {typed.subject} → {typed.target_new}") as progress:
            progress(0.0, "reading the model's own answer" if typed.target_true is None else "building the probes")
            true = resolve_true_target(session, typed)
            request = true.request
            case_probes = _case_probes(state, typed)
            probeset = probeset_for(request, [(p.prompt, p.answer, p.kind) for p in state.user_probes],
                                    base=case_probes, handle=ctx.handle, progress=progress)
            outcome = apply_and_evaluate(session, ctx.method, request, probeset, ctx.hparams, progress,
                                         generate=True)
            progress(1.0, "reading the targets token by token")
            breakdown = target_breakdown(session, outcome.edit, request)
            if case_probes is None:
                missing = missing_probe_reasons(request, probeset)
            else:  # the case's own probes were used: the fact base was not asked
                have = {p.kind for p in probeset.probes}
                missing = {kind: f"the data-set case {state.picked_case.case_id} brings none"
                           for kind in ("generality", "locality", "portability") if kind not in have}
    except Exception as err:  # every failure is shown; the typed fact stays in the form
        show_error(err)
        return
    if carried:
        drop_carried_true_target(state, fact, FACT_FORMS)  # the box empties on the next run
    _forget_stale_pickers(state, typed)
    state.playground = PlaygroundResult(request=request, method=ctx.method, probeset=probeset, outcome=outcome,
                                        model_key=ctx.model.key, true_target=true, breakdown=breakdown,
                                        missing=missing, carried_over=carried)
    st.session_state.pop("pg_top_probe", None)  # the next chart starts from this edit's own prompt
    state.notify(f"{ctx.method} edited {request.subject}: {request.target_true or '…'} → {request.target_new}.")
    st.rerun()  # the sidebar's stack was drawn before this edit


def _forget_stale_pickers(state: AppState, typed: EditRequest) -> None:
    """Reset the example and case pickers (on the next run) when the applied fact is no longer theirs."""
    example = _examples().get(st.session_state.get("pg_example") or "")
    if example is not None and (" ".join(example[0].split()), example[1]) != (typed.text, typed.subject):
        state.pending_widgets["pg_example"] = NO_EXAMPLE
    case = state.picked_case
    if st.session_state.get("pg_case", NO_EXAMPLE) != NO_EXAMPLE and (case is None or case.requests[0].text !=
                                                                     typed.text or case.requests[0].subject !=
                                                                     typed.subject):
        state.pending_widgets["pg_case"] = NO_EXAMPLE


def _known(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _metric_tiles(metrics: dict[str, float], missing: dict[str, str]) -> None:
    # the figures that keep locality and efficacy honest, in the tiles' help and below them
    details = {"locality": locality_detail(metrics), "efficacy_score": efficacy_detail(metrics)}

    def tile(column, key: str) -> None:
        value, before = metrics.get(key), metrics.get(f"{key}_before")
        shown = f"{value:.0%}" if _known(value) else "n/a"
        delta = f"{value - before:+.0%} vs before" if _known(value) and _known(before) else None
        help_text = TILE_HELP[key]
        if not _known(value) and key in missing:
            help_text += f" — n/a: no {key} probes, because {missing[key]}."
        detail = details.get(key, "")
        if detail:
            help_text += " " + detail
        column.metric(METRIC_LABELS[key], shown, delta=delta, help=help_text, border=True)

    cols = st.columns(4)
    for column, key in zip(cols, ("reliability", "generality", "locality", "portability"), strict=True):
        tile(column, key)
    cols = st.columns(4)
    for column, key in zip(cols, ("efficacy_score", "paraphrase_score", "neighborhood_score", "score"), strict=True):
        tile(column, key)
    unexplained = [k for k in ("reliability", "generality", "locality", "portability")
                   if not _known(metrics.get(k)) and k not in missing]
    if unexplained:
        st.caption(f"n/a: this edit has no {', '.join(unexplained)} probes.")
    shown = " ".join(d for d in details.values() if d)
    if shown:
        st.caption(shown)


def probe_table_view(table: pd.DataFrame) -> pd.io.formats.style.Styler:
    """The per-probe table as shown: each row's outcome, coloured unless it is an out-of-scope probe
    that kept its answer."""
    shown = table.assign(outcome=outcome_column(table))
    shown = shown[["probe_id", "kind", "subkind", "prompt", "answer", "pred_before", "prob_before", "pred_after",
                   "prob_after", "changed", "outcome"]]

    def colour(row: pd.Series) -> list[str]:
        if row["outcome"] == "unchanged, as intended":
            return [""] * len(row)
        return [f"background-color: {OUTCOME_COLOURS[row['outcome']]}33"] * len(row)

    return shown.style.apply(colour, axis=1).format({"prob_before": format_prob, "prob_after": format_prob})


def _true_target_line(result: PlaygroundResult) -> None:
    with st.container(key="pg_true_target"):
        if result.carried_over:
            st.info(f"The true target “{_md(result.carried_over)}” was left from the example you picked before and "
                    f"belongs to that fact, not to this one; it was not used.")
        if result.true_target is not None:
            st.markdown(result.true_target.describe())


def _verdict(result: PlaygroundResult, table: pd.DataFrame) -> None:
    """Does the model now *say* the new target? The edit prompt's greedy continuation before and after."""
    request = result.request
    generations = generated_rows(table)
    rows = generations[generations["kind"] == "reliability"]
    with st.container(key="pg_verdict"):
        if rows.empty:
            st.caption("No generation was made for this edit.")
            return
        row = rows.iloc[0]
        question = f"Does the model now say “{_md(request.target_new)}”?"
        says = row["gen_hit_after"] == 1.0
        text = (f"**{question} {'Yes' if says else 'No'}.** Greedy continuation of "
                f"“{_md(row['prompt'])} …” after the edit: “{_md(row['gen_after'])}”  \n"
                f"Before the edit: “{_md(row['gen_before'])}”"
                f"{' (it already said it)' if row['gen_hit_before'] == 1.0 else ''}.")
        (st.success if says else st.warning)(text)  # a "no" is a finding, not a failure of the page
        share, before = says_share(table, "after"), says_share(table, "before")
        left, right = st.columns([1, 3])
        left.metric(METRIC_LABELS["says"], f"{share:.0%}" if _known(share) else "n/a",
                    delta=f"{share - before:+.0%} vs before" if _known(share) and _known(before) else None,
                    help=TILE_HELP["says"], border=True)
        right.caption("Reliability and the CounterFact scores read probabilities with the target given (teacher "
                      "forcing); this verdict reads what the model writes on its own. They can disagree: a "
                      "two-token target can score 50 % reliability and 100 % efficacy while never being written.")


def _target_probabilities(result: PlaygroundResult, row: pd.Series) -> None:
    """The whole target's probability (the product over its tokens), and per token where it has several."""
    request = result.request
    breakdown = result.breakdown
    if breakdown is None:  # a result from before breakdowns existed: the table's whole-target figures
        st.markdown(f"P({_md(row['answer'])}): {format_prob(row['prob_before'])} → {format_prob(row['prob_after'])}")
        return
    new_b, new_a = breakdown.new_before, breakdown.new_after
    n = len(new_a.tokens)
    st.markdown(f"P(“{_md(request.target_new)}”), the whole target{f' (product over its {n} tokens)' if n > 1 else ''}"
                f": **{format_prob(new_b.whole)} → {format_prob(new_a.whole)}**")
    if breakdown.true_after is not None:
        true_b, true_a = breakdown.true_before, breakdown.true_after
        st.markdown(f"P(“{_md(request.target_true)}”), the true target: {format_prob(true_b.whole)} → "
                    f"{format_prob(true_a.whole)}")
    rows = []
    for label, before, after in (("new", new_b, new_a), ("true", breakdown.true_before, breakdown.true_after)):
        if after is None or len(after.tokens) < 2:
            continue
        for token, pb, pa in zip(after.tokens, before.probs, after.probs, strict=True):
            rows.append({"target": label, "token": token, "P before": pb, "P after": pa})
        rows.append({"target": label, "token": "per-token geometric mean",
                     "P before": before.geometric_mean, "P after": after.geometric_mean})
        rows.append({"target": label, "token": "whole target (product)", "P before": before.whole,
                     "P after": after.whole})
    if rows:
        st.caption("Per token, each given the prompt and the target's earlier tokens. CounterFact's scores compare "
                   "the per-token geometric means; reliability counts the tokens that are the top choice.")
        st.dataframe(pd.DataFrame(rows).style.format({"P before": format_prob, "P after": format_prob}),
                     hide_index=True, key="pg_token_probs")


def _generations_view(table: pd.DataFrame) -> None:
    generations = generated_rows(table)
    if generations.empty:
        return
    st.markdown(f"**What the model writes** — greedy continuations ({GENERATION_TOKENS} tokens) before and after "
                f"the edit; “says it” means the text contains the probe's expected answer.")
    shown = generations.rename(columns={"answer": "expected", "gen_before": "before the edit",
                                        "gen_after": "after the edit"})
    shown["says it before"] = generations["gen_hit_before"] == 1.0
    shown["says it after"] = generations["gen_hit_after"] == 1.0
    st.dataframe(shown[["kind", "prompt", "expected", "says it before", "says it after", "before the edit",
                        "after the edit"]], hide_index=True, key="pg_generations",
                 column_config={"before the edit": st.column_config.TextColumn(width="large"),
                                "after the edit": st.column_config.TextColumn(width="large")})


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
    memory = (f" · peak extra GPU memory {outcome.peak_memory_bytes / 2**20:.1f} MiB"
              if memory_is_comparable([outcome.memory_kind]) else "")
    st.caption(f"Computed in {outcome.wall_time_s:.2f} s{memory} · stored size {edit.size_bytes / 1024:.1f} KiB · "
               f"edit kind: {edit.kind.replace('_', ' ')}")
    _true_target_line(result)
    table = outcome.table if result.added is None else pd.concat([outcome.table, result.added], ignore_index=True)
    _verdict(result, table)
    metrics = outcome.metrics if result.added is None else metrics_with_added(outcome.metrics, table)
    missing = _still_missing(result)
    _metric_tiles(metrics, missing)
    if missing:
        with st.container(key="pg_missing"):
            grouped: dict[str, list[str]] = {}
            for kind, why in missing.items():
                grouped.setdefault(why, []).append(kind)
            reasons = "; ".join(f"no {' or '.join(kinds)} probes, because {why}" for why, kinds in grouped.items())
            st.warning(f"Some tiles read n/a — {reasons}. Add your own probes below (a paraphrase as "
                       f"*generality*, another subject's fact as *locality*, a consequence as *portability*): "
                       f"they are answered with and without this edit at once.")
            _add_probe_form(state, expanded=True)
    reliability = table[table["kind"] == "reliability"]
    if not reliability.empty:
        row = reliability.iloc[0]
        left, right = st.columns([2, 3])
        with left:
            st.markdown(f"**Edit prompt:** {_md(row['prompt'])} …")
            with st.container(key="pg_edit_result"):
                st.markdown(f"Top next token before the edit: **{_md(row['pred_before'])}** → after: "
                            f"**{_md(row['pred_after'])}**")
                _target_probabilities(result, row)
        with right:
            labels = {r.probe_id: f"{r.kind}: {r.prompt}" for r in table.itertuples()}
            if st.session_state.get("pg_top_probe") not in labels:  # a new edit: start from its own prompt
                st.session_state["pg_top_probe"] = row["probe_id"]
            picked = st.selectbox("Top predictions for", list(labels), format_func=labels.get, key="pg_top_probe")
            probe = table[table["probe_id"] == picked].iloc[0] if picked in labels else row
            st.plotly_chart(top_predictions_figure(probe["top_before"], probe["top_after"],
                                                   title=f"Next-token predictions: {probe['prompt']} …"),
                            key="pg_top_chart")
    _generations_view(table)
    own = table[table["source"] == "user"] if "source" in table.columns else table.iloc[:0]
    if not own.empty:
        with st.container(key="pg_user_probes"):
            st.markdown("**Your probes**\n" + "\n".join(
                f"- *{r.kind}*: {_md(r.prompt)} → expected **{_md(r.answer)}**: before **{_md(r.pred_before)}**, "
                f"after **{_md(r.pred_after)}**" for r in own.itertuples()))
    st.markdown("**Every probe** — in scope (the edit, paraphrases, consequences): green when it now gives the "
                "expected answer, purple when it changed to something else, orange when it did not change; out of "
                "scope (neighbours, unrelated facts): red when it changed. P is the whole answer's probability.")
    st.dataframe(probe_table_view(table), hide_index=True, key="pg_table")
    changed = int(table["changed"].sum())
    st.caption(f"{changed} of {len(table)} probes changed their top prediction.")


def _still_missing(result: PlaygroundResult) -> dict[str, str]:
    """The probe kinds the edit had none of, and why — less those the person has added since."""
    have = {p.kind for p in result.probeset.probes}
    return {kind: why for kind, why in result.missing.items() if kind not in have}


def _apply_pending_inputs(state: AppState) -> None:
    """Empty the probe form after a probe was added, and the pickers whose fact was replaced (a widget
    cannot change once drawn)."""
    for key in PROBE_WIDGETS:
        if key in state.pending_widgets:
            st.session_state[key] = state.pending_widgets.pop(key)


def _add_probe_form(state: AppState, expanded: bool = False) -> None:
    with st.expander("Add your own probes", expanded=expanded or bool(state.user_probes)):
        with st.form("pg_probe_form"):
            prompt = st.text_input("Probe prompt", key="pg_probe_prompt",
                                   placeholder="e.g. The capital of the country where Eiffel Tower is located is",
                                   help=PROMPT_TIP)
            left, right = st.columns(2)
            answer = left.text_input("Expected answer", key="pg_probe_answer")
            kinds = [k for k in PROBE_KINDS if k != "reliability"]
            kind = right.selectbox("Kind", kinds, key="pg_probe_kind",
                                   help="In scope (should follow the edit): generality, portability. "
                                        "Out of scope (should not change): locality, unrelated.")
            added = st.form_submit_button("Add probe")
        if added:
            if not prompt.strip() or not answer.strip():
                st.error("A probe needs both a prompt and an expected answer.")  # what was typed stays
            else:
                probe = UserProbe(prompt.strip(), answer.strip(), kind)
                state.user_probes.append(probe)
                for key in PROBE_WIDGETS:  # emptied on the next run, once the probe is kept
                    state.pending_widgets[key] = ""
                if _check_new_probe(state, probe):
                    st.rerun()  # redraw the tiles and tables with the new probe
        if state.user_probes:
            st.markdown("\n".join(f"- *{p.kind}*: {_md(p.prompt)} → **{_md(p.answer)}**" for p in state.user_probes))
            st.caption("Your probes are added to every edit you apply here.")
            if st.button("Remove my probes", key="pg_probe_clear"):
                state.user_probes.clear()
                st.rerun()


def _check_new_probe(state: AppState, probe: UserProbe) -> bool:
    """Answer (and continue) a newly typed probe with and without the last Playground edit, if it is
    still on the stack. False when an error is on the page (it must not be rerun away)."""
    result = state.playground
    session = state.current_session()
    if result is None or session is None or result.model_key != state.context.model.key:
        return True
    try:
        rows = check_added_probes(session, result.outcome.edit, result.probeset,
                                  [(probe.prompt, probe.answer, probe.kind)], generate=True)
    except EditError as err:
        state.notify(f"{err} Your probe will be checked with the next edit.", "info")
        return True
    except Exception as err:
        show_error(err)
        return False
    result.added = rows if result.added is None else pd.concat([result.added, rows], ignore_index=True)
    return True


state = get_state()
_apply_pending_inputs(state)
st.title("Playground")
st.caption("Type a fact, apply it with the method picked in the sidebar, and see what the edit changed: the edit "
           "itself, its paraphrases, its neighbours and its consequences — as probabilities and as the text the "
           "model writes.")
st.caption(f"Tip: {PROMPT_TIP}")
seed_fact_inputs(state, PREFIX)
if state.context is not None and state.context.handle is not None and not is_demo(state.context.handle):
    st.caption(f"Examples and probes come from real-world facts (countries, cities, landmarks, people) checked "
               f"against this model: {known_facts(state.context.handle).summary()}.")
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
last = state.playground
if last is None or not _still_missing(last):  # else the probe form sits beside the explanation
    _add_probe_form(state)
if last is not None:
    _show_result(state, last)
