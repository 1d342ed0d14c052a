"""What the Playground and Scope map say really happened — the helpers behind them, without a browser:
probe outcomes, whole-target probabilities, the model's own answer, missing probes, generations, and the
figures' honesty (memory, integer ticks, live curves)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.models.tiny import tiny_model
from eval import outcomes
from eval.outcomes import (
    BROKEN,
    ELSEWHERE,
    KEPT,
    REACHED,
    STUCK,
    TokenProbs,
    format_prob,
    generated_rows,
    gives_answer,
    missing_probe_reasons,
    probe_outcome,
    resolve_true_target,
    says_share,
    short_answer,
    token_probs,
)
from eval.probes import probes_for_request
from ui import plots
from ui.actions import carried_true_target, intended_column, outcome_column, scope_outcomes
from ui.sidebar import model_options


def test_three_outcomes_for_in_scope_probes_and_only_the_expected_answer_is_intended():
    assert probe_outcome(in_scope=True, changed=True, answers_expected=True) == REACHED
    # a consequence expecting "Rome" that now answers "Italy": changed, but not to the expected answer
    assert probe_outcome(in_scope=True, changed=True, answers_expected=False) == ELSEWHERE
    assert probe_outcome(in_scope=True, changed=False, answers_expected=False) == STUCK
    # a two-token target whose first token was already right: the top token did not change, the answer did
    assert probe_outcome(in_scope=True, changed=False, answers_expected=True) == REACHED
    assert probe_outcome(in_scope=False, changed=True, answers_expected=False) == BROKEN
    assert probe_outcome(in_scope=False, changed=False, answers_expected=True) == KEPT
    assert [outcomes.is_intended(o) for o in (REACHED, ELSEWHERE, STUCK, BROKEN, KEPT)] == \
        [True, False, False, False, True]
    assert gives_answer(1.0) and not gives_answer(0.5) and not gives_answer(float("nan")) and not gives_answer(None)


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "probe_id": ["rel-0", "port-0", "port-1", "gen-0", "loc-0", "loc-1"],
        "kind": ["reliability", "portability", "portability", "generality", "locality", "locality"],
        "changed": [True, True, False, True, False, True],
        "acc_after": [1.0, 0.0, 0.0, 0.5, 1.0, 0.0],
    })


def test_probe_table_outcomes_count_a_wrong_change_as_not_intended():
    table = _table()
    assert outcome_column(table).tolist() == [REACHED, ELSEWHERE, STUCK, ELSEWHERE, KEPT, BROKEN]
    assert intended_column(table).tolist() == [True, False, False, False, True, False]


def test_scope_points_get_the_same_three_outcomes():
    points = pd.DataFrame({"probe_id": ["rel-0", "port-0", "gen-0", "loc-0"],
                           "in_scope": [True, True, True, False], "flipped": [True, True, False, False]})
    answered = {"rel-0": True, "port-0": False, "gen-0": False, "loc-0": True}
    assert scope_outcomes(points, answered).tolist() == [REACHED, ELSEWHERE, STUCK, KEPT]
    # the figure colours each point by that outcome and says it on hover
    frame = points.assign(kind=["reliability", "portability", "generality", "locality"], prompt="p", answer="a",
                          pred_before="b", pred_after="c", prob_change=0.1, x_before=[0.0, 1, 2, 3],
                          y_before=[0.0, 1, 0, 1], x_after=[1.0, 2, 3, 4], y_after=[0.0, 1, 0, 1],
                          outcome=scope_outcomes(points, answered))
    fig = plots.scope_map_figure(frame, ("after",))
    markers = {t.name: list(t.customdata) for t in fig.data if t.mode == "markers" and t.customdata is not None}
    assert markers == {REACHED: ["rel-0"], ELSEWHERE: ["port-0"], STUCK: ["gen-0"], KEPT: ["loc-0"]}
    hover = " ".join(h for t in fig.data if t.hovertext is not None for h in t.hovertext)
    assert f"outcome: {ELSEWHERE}" in hover
    assert set(plots.OUTCOME_COLOURS) == set(outcomes.OUTCOMES)


def test_whole_target_probability_is_the_product_and_never_prints_as_zero():
    probs = TokenProbs(("United", "Kingdom"), (0.02, 0.01))
    assert probs.whole == pytest.approx(0.0002)
    assert probs.geometric_mean == pytest.approx(math.sqrt(0.0002))
    assert format_prob(probs.whole) == "0.0002" and format_prob(3.1e-7) == "3.1e-07" and format_prob(0.4312) == "0.431"
    assert format_prob(0.0) == "0" and format_prob(float("nan")) == "n/a"


def test_token_probs_multiply_to_the_scored_whole_target():
    from editing.analysis.scoring import score_targets

    handle = tiny_model("gpt2")
    session = EditSession(handle)
    breakdown = token_probs(session, "Eiffel Tower is a famous landmark in", "United Kingdom")
    score = score_targets(handle, ["Eiffel Tower is a famous landmark in"], ["United Kingdom"])[0]
    assert len(breakdown.tokens) == len(score.token_ids) == 2
    assert breakdown.tokens == ("United", "Kingdom")
    assert breakdown.whole == pytest.approx(score.prob, rel=1e-5)
    assert breakdown.geometric_mean == pytest.approx(math.exp(-score.mean_nll), rel=1e-5)


def test_short_answer_reads_the_answer_a_continuation_starts_with():
    known = ["United Kingdom", "United States", "France", "Bosnia and Herzegovina"]
    assert short_answer("United Kingdom . The capital is London", known) == "United Kingdom"
    assert short_answer("bosnia and herzegovina, a country", known) == "Bosnia and Herzegovina"
    assert short_answer(" the heart of Paris, France.", known) == "heart"
    assert short_answer("theoretical physicist at the Institute", ()) == "theoretical physicist"
    assert short_answer("painter and sculptor", ()) == "painter"
    assert short_answer("", known) == "" and short_answer(" . . .", known) == ""


def test_an_empty_true_target_is_read_from_the_model_and_a_typed_one_is_kept():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    typed = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")
    kept = resolve_true_target(session, typed)
    assert kept.source == "typed" and kept.request is typed and "(typed)" in kept.describe()
    empty = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy")
    read = resolve_true_target(session, empty)
    answer, text = outcomes.model_answer(session, empty.text)
    assert read.continuation == text
    if read.source == "model":  # a random model says something: exactly that is used
        assert read.request.target_true == answer and answer.casefold() != "italy"
        assert "the model's own answer" in read.describe()
    else:
        assert read.request.target_true is None and "none" in read.describe()


def test_a_true_target_left_by_another_fact_is_recognised():
    origin = ("Eiffel Tower is a famous landmark in", "Eiffel Tower", "France")
    assert carried_true_target("Albert Einstein worked as a", "Albert Einstein", "France", origin)
    assert not carried_true_target("Eiffel Tower is a famous  landmark in", "Eiffel Tower", "France", origin)
    assert not carried_true_target("Albert Einstein worked as a", "Albert Einstein", "physicist", origin)  # typed
    assert not carried_true_target("Albert Einstein worked as a", "Albert Einstein", "", origin)
    assert not carried_true_target("Albert Einstein worked as a", "Albert Einstein", "France", None)


def test_missing_probes_of_an_unknown_subject_are_explained():
    unknown = EditRequest("Albert Einstein worked as a", "Albert Einstein", "painter")
    probeset = probes_for_request(unknown)
    reasons = missing_probe_reasons(unknown, probeset)
    assert set(reasons) == {"generality", "locality", "portability"}
    assert all("no facts about “Albert Einstein”" in why for why in reasons.values())
    known = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")
    assert missing_probe_reasons(known, probes_for_request(known)) == {}
    # a known relation whose new object has no second hop in the fact base: portability alone is explained
    odd = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Atlantis", "France")
    assert list(missing_probe_reasons(odd, probes_for_request(odd))) == ["portability"]


def test_generated_rows_and_the_says_share_read_the_judged_generations():
    from eval.evaluate import with_generations

    table = pd.DataFrame({"probe_id": ["rel-0", "gen-0", "loc-0", "unrel-0"],
                          "kind": ["reliability", "generality", "locality", "unrelated"],
                          "prompt": ["p0", "p1", "p2", "p3"], "answer": ["Italy", "Italy", "France", "Cairo"],
                          "contrast": ["France", "France", "Italy", None]})
    judged = with_generations(table, ["France .", "France", "France .", None],
                              ["the city of italy.", "Italian food", "France", None])
    rows = generated_rows(judged)
    assert rows["probe_id"].tolist() == ["rel-0", "gen-0", "loc-0"]  # the unrelated probe was not generated
    assert rows["gen_hit_after"].tolist() == [1.0, 0.0, 1.0]  # "Italian" does not say "Italy"
    assert says_share(judged, "after") == 0.5 and says_share(judged, "before") == 0.0
    assert math.isnan(says_share(table)) and generated_rows(table).empty


def test_peak_memory_is_drawn_only_when_it_compares_methods():
    costs = pd.DataFrame({"wall_time_s": [0.4, 0.1], "peak_memory_bytes": [57.5 * 2**20, 4000],
                          "memory_kind": ["rss", "rss"]}, index=["ROME", "FT-L"])
    cpu = plots.cost_figure(costs)
    assert [t.name for t in cpu.data] == ["wall time (s)"]  # RSS growth of a shared process: not shown
    assert cpu.layout.yaxis.title.text == "seconds" and cpu.data[0].hovertext
    gpu = plots.cost_figure(costs.assign(memory_kind="cuda"))
    assert [t.name for t in gpu.data] == ["wall time (s)", "peak GPU memory (MiB)"]
    assert list(gpu.data[1].y) == [57.5, 4000 / 2**20] and gpu.layout.yaxis2.title.text == "MiB"
    assert not plots.memory_is_comparable(["cuda", "rss"]) and not plots.memory_is_comparable([])


def test_batch_axes_tick_whole_numbers_only():
    curves = pd.DataFrame({"method": ["ROME"] * 2, "x": [1, 2], "reliability": [1.0, 0.5]})
    fig = plots.metric_curves(curves, "x", "batch size")
    assert list(fig.layout.xaxis.tickvals) == [1, 2] and list(fig.layout.xaxis.ticktext) == ["1", "2"]
    many = pd.DataFrame({"method": ["ROME"] * 40, "x": list(range(1, 41)), "reliability": [1.0] * 40})
    axis = plots.metric_curves(many, "x", "number of edits").layout.xaxis
    assert axis.tickmode == "linear" and axis.dtick == 4 and float(axis.dtick).is_integer()


def test_the_sidebar_offers_an_installed_pretrained_model_first():
    assert model_options("", ["smollm2-135m"], ["gpt2"])[:3] == ["smollm2-135m", "demo", "gpt2"]
    assert model_options("demo", ["smollm2-135m"], [])[:2] == ["demo", "smollm2-135m"]  # the tests' choice
    assert model_options("", [], [])[0] == "demo"
    assert model_options("", [], [])[-1].startswith("Other")


def test_sequential_curves_grow_while_the_run_goes_on(tmp_path):
    """The running job's curve has its finished steps before the job ends (a store that holds the run
    after its first step makes the moment deterministic)."""
    from eval.datasets import load_dataset
    from tests.helpers import held_run_store
    from ui.jobs import ExperimentJob, ExperimentPlan

    make_store, first_step, release = held_run_store(tmp_path / "runs.sqlite")
    handle = tiny_model("gpt2")
    cases = load_dataset("demo", limit=3)
    plan = ExperimentPlan(("FT-L",), "sequential", (3,), "demo", hparams={"FT-L": {"steps": 1}})
    job = ExperimentJob(handle, cases, plan, store=make_store()).start()
    try:
        assert first_step.wait(120), job.errors
        assert not job.done
        live = job.curves(partial=True)
        assert live["x"].tolist() == [1] and live["method"].tolist() == ["FT-L"]
        assert job.curves().empty  # the finished-only view has nothing yet
    finally:
        release.set()
    assert job.wait(240) and not job.errors, job.errors
    assert job.curves()["x"].tolist() == [1, 2, 3]
    assert len(job.results[0].result.summary) == 3

