"""Every page through Streamlit's AppTest on the demo model: widgets driven, results asserted."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.app.conftest import app_state, assert_clean, click, new_app, preferred_method
from ui.widgets import fact_key

pytestmark = pytest.mark.usefixtures("app_handle")

SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def markdown_text(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def sidebar_text(at) -> str:
    return "\n".join(m.value for m in at.sidebar.markdown) + "\n" + "\n".join(c.value for c in at.sidebar.caption)


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def chart(at, key: str) -> dict:
    """The plotly figure (as JSON) drawn under ``key``."""
    for element in at.get("plotly_chart"):
        if getattr(element, "key", None) == key:
            return json.loads(element.proto.spec)
    raise AssertionError(f"no chart {key!r}; charts: {[getattr(e, 'key', None) for e in at.get('plotly_chart')]}")


def table_with(at, *columns: str):
    """The first table shown with all of ``columns`` (read-only tables carry no key in AppTest)."""
    for frame in at.dataframe:
        value = frame.value
        if all(c in value.columns for c in columns):
            return value
    raise AssertionError(f"no table with columns {columns}; tables: {[list(f.value.columns) for f in at.dataframe]}")


@pytest.fixture(scope="module")
def edited():
    """One AppTest session that applied the default edit (Eiffel Tower: France → Italy) in the Playground."""
    at = new_app().run()
    assert_clean(at)
    click(at, "Apply edit")
    assert_clean(at)
    return at


def test_playground_applies_the_edit_and_shows_what_changed(edited):
    at = edited
    assert not errors(at), errors(at)
    state = app_state(at)
    method = preferred_method()
    result = state.playground
    assert result is not None and result.method == method
    table = result.outcome.table
    reliability = table[table["kind"] == "reliability"].iloc[0]
    assert reliability["pred_before"] == "France" and reliability["pred_after"] == "Italy"
    # what the page shows is that table: tiles, the edit's prediction, the probe table
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Reliability"] == f"{result.outcome.metrics['reliability']:.0%}" == "100%"
    assert set(tiles) >= {"Generality", "Locality", "Portability", "Efficacy score", "Score (harmonic mean)"}
    # the locality tile is agreement; beside it, locality over the neighbours the model knew, and how many
    metrics = result.outcome.metrics
    known = (f"Locality (known neighbours, n={int(metrics['n_locality_known'])} of {int(metrics['n_locality'])}): "
             f"{metrics['locality_known']:.0%}")
    locality_tile = next(m for m in at.metric if m.label == "Locality")
    assert "Locality (agreement)" in locality_tile.proto.help and known in locality_tile.proto.help
    assert any(known in c.value for c in at.caption)
    assert "Top next token before the edit: **France** → after: **Italy**" in markdown_text(at)
    shown = table_with(at, "outcome")
    assert len(shown) == len(table) and {"generality", "locality", "portability", "unrelated"} <= set(shown["kind"])
    assert shown.loc[shown["kind"] == "reliability", "outcome"].iloc[0] == "changed to the expected answer"
    assert any(f"{method} edited Eiffel Tower" in s.value for s in at.success)  # shown once, after the edit
    top = chart(at, "pg_top_chart")
    assert top["data"][1]["y"][0] == "Italy"
    assert "Eiffel Tower is a famous landmark in" in top["layout"]["title"]["text"]
    generality = table[table["kind"] == "generality"].iloc[0]
    at.selectbox(key="pg_top_probe").set_value(generality["probe_id"]).run()
    assert generality["prompt"] in chart(at, "pg_top_chart")["layout"]["title"]["text"]
    assert any("Eiffel Tower: France → Italy" in m.value for m in at.sidebar.markdown)
    assert len(state.current_session().edits) == 1
    assert not any("edited Eiffel Tower" in s.value for s in at.success)  # the notice does not come back


def test_default_fact_takes_its_true_target_from_the_model(edited):
    result = app_state(edited).playground
    assert edited.text_input(key=fact_key("pg", "target_true")).value == ""  # nothing stands in for the fact
    assert result.true_target.source == "model" and result.request.target_true == "France"
    assert "True target: **France** — the model's own answer before the edit" in markdown_text(edited)


def _type_fact(at, prompt: str, subject: str, target_new: str, target_true: str | None = None) -> None:
    at.text_input(key=fact_key("pg", "prompt")).set_value(prompt)
    at.text_input(key=fact_key("pg", "subject")).set_value(subject)
    at.text_input(key=fact_key("pg", "target_new")).set_value(target_new)
    if target_true is not None:
        at.text_input(key=fact_key("pg", "target_true")).set_value(target_true)


def test_multi_token_target_shows_its_whole_probability_and_whether_the_model_says_it():
    from eval.metrics import generation_contains
    from eval.outcomes import format_prob, says_share

    at = new_app().run()
    _type_fact(at, "The Statue of Liberty is located in", "Statue of Liberty", "United Kingdom")
    click(at, "Apply edit")
    assert_clean(at)
    assert not errors(at), errors(at)
    result = app_state(at).playground
    new_b, new_a = result.breakdown.new_before, result.breakdown.new_after
    assert new_a.tokens == ("United", "Kingdom")
    reliability = result.outcome.table.set_index("probe_id").loc["rel-0"]
    assert new_a.whole == pytest.approx(reliability["prob_after"], rel=1e-4)
    assert new_a.whole == pytest.approx(new_a.probs[0] * new_a.probs[1])
    text = markdown_text(at)
    assert (f"P(“United Kingdom”), the whole target (product over its 2 tokens): **{format_prob(new_b.whole)} → "
            f"{format_prob(new_a.whole)}**") in text
    tokens = table_with(at, "token", "P before", "P after")
    new_rows = tokens[tokens["target"] == "new"]
    assert new_rows["token"].tolist() == ["United", "Kingdom", "per-token geometric mean", "whole target (product)"]
    assert new_rows["P after"].tolist() == pytest.approx([*new_a.probs, new_a.geometric_mean, new_a.whole])
    # the plain verdict: does the greedy continuation of the edit prompt contain the new target?
    generations = result.outcome.table
    edit_row = generations[generations["kind"] == "reliability"].iloc[0]
    says = generation_contains(edit_row["gen_after"], "United Kingdom")
    assert (edit_row["gen_hit_after"] == 1.0) == says
    boxes = [b.value for b in (at.success if says else at.warning)]
    assert any(f"Does the model now say “United Kingdom”? {'Yes' if says else 'No'}." in b for b in boxes), boxes
    tiles = {m.label: m for m in at.metric}
    assert tiles["Says the new target"].value == f"{says_share(generations):.0%}"
    assert "one of its two tokens" in tiles["Reliability"].proto.help
    assert "geometric mean" in tiles["Efficacy score"].proto.help
    assert "greedy continuation" in tiles["Says the new target"].proto.help
    written = table_with(at, "says it after", "before the edit", "after the edit")
    assert {"reliability", "generality", "locality", "portability"} <= set(written["kind"])
    assert all(len(t) > 0 for t in written["after the edit"])
    assert any("end exactly where the answer starts" in c.value for c in at.caption)
    # a later edit's chart starts from its own prompt, not from the probe picked for this one
    at.selectbox(key="pg_top_probe").set_value("gen-0").run()
    _type_fact(at, "The capital of Japan is", "Japan", "Berlin")
    click(at, "Apply edit")
    assert_clean(at)
    assert at.selectbox(key="pg_top_probe").value == "rel-0"
    assert "The capital of Japan is" in chart(at, "pg_top_chart")["layout"]["title"]["text"]


def test_unknown_subject_without_an_examples_true_target_explains_its_missing_probes(app_handle):
    from editing.core.session import EditSession
    from eval.outcomes import model_answer

    at = new_app().run()
    label = next(o for o in at.selectbox(key="pg_example").options if o.startswith("Japan — country capital"))
    at.selectbox(key="pg_example").set_value(label).run()
    assert at.text_input(key=fact_key("pg", "target_true")).value == "Tokyo"
    # a new fact typed over the example: "Tokyo" stays in the box but belongs to Japan, not to Einstein
    _type_fact(at, "Albert Einstein worked as a", "Albert Einstein", "painter")
    click(at, "Apply edit")
    assert_clean(at)
    assert not errors(at), errors(at)
    result = app_state(at).playground
    assert result.carried_over == "Tokyo" and result.request.target_true != "Tokyo"
    answer, _ = model_answer(EditSession(app_handle), "Albert Einstein worked as a")
    if answer and answer != "painter":
        assert result.true_target.source == "model" and result.request.target_true == answer
        assert f"True target: **{answer}** — the model's own answer" in markdown_text(at)
    else:
        assert result.true_target.source == "none" and result.request.target_true is None
    assert any("was left from the example you picked" in i.value for i in at.info)
    assert at.text_input(key=fact_key("pg", "target_true")).value == ""  # emptied, not carried to the next fact
    assert at.text_input(key=fact_key("pg", "prompt")).value == "Albert Einstein worked as a"
    assert at.selectbox(key="pg_example").value == "— type your own fact —"  # the picker no longer claims Japan
    # the fact base knows nothing about Einstein: the n/a tiles say why, and the probe box is right there
    warnings = [w.value for w in at.warning]
    assert any("no facts about “Albert Einstein”" in w and "Add your own probes below" in w for w in warnings), warnings
    tiles = {m.label: m for m in at.metric}
    for kind in ("Generality", "Locality", "Portability"):
        assert tiles[kind].value == "n/a"
        assert "no facts about “Albert Einstein”" in tiles[kind].proto.help
    # a probe without its answer is refused and what was typed stays
    at.text_input(key="pg_probe_prompt").set_value("Albert Einstein was by profession a")
    click(at, "Add probe")
    assert any("needs both a prompt and an expected answer" in e for e in errors(at))
    assert at.text_input(key="pg_probe_prompt").value == "Albert Einstein was by profession a"
    at.text_input(key="pg_probe_answer").set_value("painter")
    at.selectbox(key="pg_probe_kind").set_value("generality")
    click(at, "Add probe")
    assert_clean(at)
    tiles = {m.label: m for m in at.metric}
    assert tiles["Generality"].value != "n/a"  # answered with and without the edit, counted at once
    added = app_state(at).playground.added
    assert added is not None and added.iloc[0]["kind"] == "generality"
    assert at.text_input(key="pg_probe_prompt").value == ""  # kept as a probe, so the box empties
    warnings = [w.value for w in at.warning]
    assert any("no locality or portability probes" in w for w in warnings), warnings
    assert not any("no generality" in w for w in warnings)


def test_own_probe_is_answered_with_and_without_the_edit(edited):
    from eval.metrics import generation_contains

    at = edited
    at.text_input(key="pg_probe_prompt").set_value("The landmark known as Eiffel Tower is located in")
    at.text_input(key="pg_probe_answer").set_value("Italy")
    at.selectbox(key="pg_probe_kind").set_value("generality")
    click(at, "Add probe")
    assert_clean(at)
    added = app_state(at).playground.added
    assert added is not None and len(added) == 1
    row = added.iloc[0]
    assert row["source"] == "user" and row["pred_before"] == "France" and row["pred_after"] == "Italy"
    shown = table_with(at, "outcome")
    assert "The landmark known as Eiffel Tower is located in" in set(shown["prompt"])
    assert isinstance(row["gen_before"], str) and isinstance(row["gen_after"], str)  # continued too
    assert row["gen_hit_after"] == float(generation_contains(row["gen_after"], "Italy"))
    assert "The landmark known as Eiffel Tower is located in" in set(table_with(at, "says it after")["prompt"])
    assert app_state(at).user_probes[0].answer == "Italy"


def test_undo_redo_and_clear_in_the_sidebar(edited):
    at = edited
    session = app_state(at).current_session()
    at.sidebar.button(key="sb_undo").click().run()
    assert_clean(at)
    assert session.edits == () and session.can_redo
    assert any("no longer on your stack" in i.value for i in at.info)
    at.sidebar.button(key="sb_redo").click().run()
    assert len(session.edits) == 1
    assert "Eiffel Tower: France → Italy" in sidebar_text(at)


def test_bad_fact_input_shows_a_message_and_keeps_the_text():
    at = new_app().run()
    at.text_input(key=fact_key("pg", "subject")).set_value("Big Ben")
    click(at, "Apply edit")
    assert_clean(at)
    assert any("does not occur in the prompt" in e for e in errors(at)), errors(at)
    assert at.text_input(key=fact_key("pg", "subject")).value == "Big Ben"
    assert at.text_input(key=fact_key("pg", "prompt")).value == "Eiffel Tower is a famous landmark in"
    at.text_input(key=fact_key("pg", "target_new")).set_value("   ")
    at.text_input(key=fact_key("pg", "subject")).set_value("Eiffel Tower")
    click(at, "Apply edit")
    assert any("new target is empty" in e for e in errors(at)), errors(at)
    assert app_state(at).current_session().edits == ()
    assert app_state(at).playground is None


def test_example_picker_fills_the_form():
    at = new_app().run()
    label = next(o for o in at.selectbox(key="pg_example").options if o.startswith("Japan — country capital"))
    at.selectbox(key="pg_example").set_value(label).run()
    assert_clean(at)
    assert at.text_input(key=fact_key("pg", "prompt")).value == "The capital of Japan is"
    assert at.text_input(key=fact_key("pg", "target_true")).value == "Tokyo"
    new = at.text_input(key=fact_key("pg", "target_new")).value
    assert new and new != "Tokyo"
    case = at.selectbox(key="pg_case").options[1]
    at.selectbox(key="pg_case").set_value(case).run()
    picked = app_state(at).picked_case
    assert picked is not None and at.text_input(key=fact_key("pg", "subject")).value == picked.requests[0].subject


def test_unknown_model_is_reported_and_the_path_kept():
    from ui.sidebar import CUSTOM

    at = new_app(sb_model=CUSTOM, sb_model_custom="no-such-org/no-such-model").run()
    assert_clean(at)
    assert any("Could not find model 'no-such-org/no-such-model'" in e for e in errors(at)), errors(at)
    assert at.sidebar.text_input(key="sb_model_custom").value == "no-such-org/no-such-model"
    click(at, "Apply edit")
    assert any("Could not find model" in e for e in errors(at))
    assert app_state(at).playground is None


def test_unsupported_architecture_is_reported(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from editing.models.tiny import demo_tokenizer
    from ui.sidebar import CUSTOM

    folder = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             max_position_embeddings=32, word_embed_proj_dim=16)).save_pretrained(folder)
    demo_tokenizer().save_pretrained(folder)
    at = new_app(sb_model=CUSTOM, sb_model_custom=str(folder)).run()
    assert_clean(at)
    assert any("is a 'opt' model; EditScope supports GPT-2" in e for e in errors(at)), errors(at)


def test_method_unsupported_for_the_architecture_is_refused():
    """A method limited to other families says so in the sidebar, and Apply refuses with that message."""
    from dataclasses import dataclass
    from typing import ClassVar

    from editing.methods.base import METHODS, EditMethod, HParams

    @dataclass
    class NoHParams(HParams):
        pass

    class LlamaOnly(EditMethod):
        name: ClassVar[str] = "Llama-only test method"
        hparams_class = NoHParams
        edit_kind = "weight_delta"
        summary = "A method that supports LLaMA-style models only."
        families: ClassVar[tuple[str, ...]] = ("llama",)

        def _execute(self, handle, requests, hparams, progress):
            raise AssertionError("must never run on GPT-2")

    METHODS[LlamaOnly.name] = LlamaOnly
    try:
        at = new_app(method=LlamaOnly.name).run()
        assert any("does not support gpt2 models" in w.value for w in at.sidebar.warning)
        click(at, "Apply edit")
        assert_clean(at)
        assert any("does not support gpt2 models" in e for e in errors(at)), errors(at)
        assert app_state(at).current_session().edits == ()
    finally:
        METHODS.pop(LlamaOnly.name)


def test_saved_stack_loads_in_another_session_and_bad_uploads_are_refused(edited):
    from ui.actions import stack_archive

    data = stack_archive(app_state(edited).current_session())
    at = new_app().run()
    at.sidebar.file_uploader(key="sb_upload").set_value(("stack.zip", b"not a zip at all", "application/zip")).run()
    at.sidebar.button(key="sb_load").click().run()
    assert_clean(at)
    assert any("not a readable zip" in e.value for e in at.sidebar.error), [e.value for e in at.sidebar.error]
    assert app_state(at).current_session().edits == ()
    at.sidebar.file_uploader(key="sb_upload").set_value(("stack.zip", data, "application/zip")).run()
    at.sidebar.button(key="sb_load").click().run()
    assert_clean(at)
    assert len(app_state(at).current_session().edits) == 1
    assert "Eiffel Tower: France → Italy" in sidebar_text(at)
    assert any("Loaded 1 edit(s) from stack.zip" in s.value for s in at.success)


def test_scope_map_page_places_every_probe(edited):
    at = edited
    at.switch_page("pages/scope_map.py")
    at.session_state["scope_projection"] = "pca"  # UMAP's first compile is exercised by the browser test
    at.run()
    assert_clean(at)
    assert not errors(at), errors(at)
    result = app_state(at).playground
    points = table_with(at, "outcome", "in_scope")
    assert sorted(points["probe_id"]) == sorted(p.id for p in result.probeset.probes)
    assert points.loc[points["probe_id"] == "rel-0", "outcome"].iloc[0] == "changed to the expected answer"
    # three outcomes in scope: only the expected answer (every token of it, as the Playground's table says) counts
    table = pd.concat([result.outcome.table, result.added]) if result.added is not None else result.outcome.table
    answered = {pid: acc == 1.0 for pid, acc in zip(table["probe_id"], table["acc_after"], strict=True)}
    for row in points[points["in_scope"]].itertuples():
        expected = ("changed to the expected answer" if answered[row.probe_id] else
                    "changed to something else" if row.pred_before != row.pred_after else
                    "unchanged, should have changed")
        assert row.outcome == expected, row
    tiles = {m.label: m.value for m in at.metric}
    inside, outside = points[points["in_scope"]], points[~points["in_scope"]]
    for label, outcome in (("In scope: expected", "changed to the expected answer"),
                           ("In scope: other answer", "changed to something else"),
                           ("In scope: unchanged", "unchanged, should have changed")):
        assert tiles[label] == f"{(inside['outcome'] == outcome).sum()} / {len(inside)}"
    kept = (outside["outcome"] == "unchanged, as intended").sum()
    assert tiles["Out of scope: kept"] == f"{kept} / {len(outside)}"
    intended = points["outcome"].isin(["changed to the expected answer", "unchanged, as intended"]).mean()
    assert tiles["As intended"] == f"{intended:.0%}"
    figure = chart(at, "scope_chart")
    plotted = sorted(i for trace in figure["data"] if trace.get("customdata") for i in trace["customdata"])
    assert plotted == sorted(list(points["probe_id"]) * 2)  # every probe, before and after
    assert sum(trace.get("line", {}).get("dash") == "dash" for trace in figure["data"]) == 2
    at.segmented_control(key="scope_view").set_value("After the edit").run()
    assert_clean(at)
    figure = chart(at, "scope_chart")
    assert sorted(i for t in figure["data"] if t.get("customdata") for i in t["customdata"]) == \
        sorted(points["probe_id"])


def test_compare_page_runs_each_method(edited):
    from editing.methods import available_methods

    at = edited
    methods = [m for m in (preferred_method(), "FT-L", "FT", "KN") if m in available_methods()]
    methods = list(dict.fromkeys(methods))[:2]
    at.switch_page("pages/compare.py").run()
    assert_clean(at)
    at.multiselect(key="cmp_methods").set_value(methods)
    click(at, "Compare")
    assert_clean(at)
    result = app_state(at).compare
    assert set(result.outcomes) | set(result.errors) == set(methods)
    assert result.outcomes, result.errors
    metrics = table_with(at, "time (s)")
    assert list(metrics.index) == list(result.outcomes)
    # both localities named, unrelated facts and edit success beside them, from each method's own metrics
    named = {"Locality (agreement)", "Locality (same-relation neighbours)", "Edit success (answers the new target)",
             "Efficacy without reliability (n)", "Unrelated facts unchanged (random other facts)"}
    assert named <= set(metrics.columns)
    n_known = {int(o.metrics["n_locality_known"]) for o in result.outcomes.values()}
    assert f"Locality (known neighbours, n={n_known.pop()})" in metrics.columns and not n_known
    for method, outcome in result.outcomes.items():
        assert metrics.loc[method, "Edit success (answers the new target)"] == outcome.metrics["edit_success"]
    predictions = table_with(at, "pred_before", "kind", "prompt")
    for method in result.outcomes:
        assert method in predictions.columns
    reliability = predictions[predictions["kind"] == "reliability"].iloc[0]
    assert reliability["pred_before"] == "France"
    assert [t["name"] for t in chart(at, "cmp_radar")["data"]] == list(result.outcomes)
    cost = chart(at, "cmp_cost")["data"]
    assert cost[0]["x"] == list(result.outcomes) and all(v > 0 for v in cost[0]["y"])
    if app_state(at).context.handle.device.type == "cpu":  # RSS growth of one process does not compare methods
        assert [t["name"] for t in cost] == ["wall time (s)"] and "peak GPU memory (MiB)" not in metrics.columns
        assert any("Peak memory is not shown" in c.value for c in at.caption)
    assert result.request.target_true == "France" and result.true_target.source == "model"
    # the person's own stack is untouched by a comparison
    assert len(app_state(at).current_session().edits) == 1


def test_batch_page_runs_cancels_and_lists_runs(run_store_path):
    if "FT-L" not in _methods():
        pytest.skip("FT-L is not registered")
    # FT-L with few steps keeps the runs short; the sidebar's hyper-parameters apply to the runs.
    at = new_app(method="FT-L", **{"hp|demo|auto|float32|FT-L|steps": 5}).run()
    at.switch_page("pages/batch.py").run()
    assert_clean(at)
    at.number_input(key="batch_limit").set_value(4)
    at.button(key="batch_load").click().run()
    assert any("Loaded 4 case(s)" in s.value for s in at.success)
    assert app_state(at).context.hparams == {"steps": 5}
    at.multiselect(key="batch_methods").set_value(["FT-L"])
    at.radio(key="batch_mode").set_value("batch")
    at.text_input(key="batch_sizes").set_value("1, 2")
    click(at, "Run")
    assert_clean(at)
    job = app_state(at).job
    assert job is not None and job.wait(240)
    at.run()
    assert_clean(at)
    assert not job.errors, job.errors
    curves = table_with(at, "batch size")
    assert curves["batch size"].tolist() == [1, 2]
    figure = chart(at, "batch_curves")
    lines = figure["data"]
    assert lines and all(t["x"] == [1, 2] and t["name"] == "FT-L" for t in lines)
    assert figure["layout"]["xaxis"]["tickvals"] == [1, 2]  # whole batch sizes, no tick at 1.5
    assert any("methods of your last run (FT-L)" in c.value for c in at.caption)
    assert all(0.0 <= v <= 1.0 for v in curves["Reliability"])
    # an edit counts as a success only where the model answers the new target: curve and table
    assert {"Edit success (answers the new target)", "Efficacy without reliability (n)",
            "Locality (agreement)"} <= set(curves.columns)
    assert "Edit success (answers the new target)" in [a["text"] for a in figure["layout"]["annotations"]]
    runs = table_with(at, "run_id", "status")
    assert len(runs) == 2 and set(runs["batch_size"]) == {1, 2} and set(runs["status"]) == {"done"}
    # a sequential run cancelled right away keeps what it did and says so
    at.radio(key="batch_mode").set_value("sequential")
    at.text_input(key="batch_sizes").set_value("4")
    click(at, "Run")
    job = app_state(at).job
    at.button(key="batch_cancel").click()
    at.run()
    assert job.cancelled
    deadline = time.time() + 240
    while not job.done and time.time() < deadline:
        time.sleep(0.5)
    at.run()
    assert_clean(at)
    assert any("cancelled" in w.value for w in at.warning)
    stored = table_with(at, "run_id", "status")
    assert len(stored) == 3 and stored.iloc[0]["status"] in ("cancelled", "done")
    # past runs: plot two batch runs together, then delete one
    at.multiselect(key="past_runs_pick").set_value([int(r) for r in runs["run_id"]]).run()
    assert_clean(at)
    at.selectbox(key="past_run_one").set_value(int(stored.iloc[0]["run_id"]))
    at.button(key="past_run_delete").click().run()
    assert len(table_with(at, "run_id", "status")) == 2


def test_sequential_curves_are_drawn_as_steps_land(run_store_path, monkeypatch):
    """While a sequential run goes on, the page draws the steps already judged (a store that holds the
    run after its first step makes the moment deterministic)."""
    import ui.jobs
    from tests.helpers import held_run_store

    if "FT-L" not in _methods():
        pytest.skip("FT-L is not registered")
    make_store, first_step, release = held_run_store(run_store_path)
    monkeypatch.setattr(ui.jobs, "run_store", make_store)
    at = new_app(method="FT-L", **{"hp|demo|auto|float32|FT-L|steps": 2}).run()
    at.switch_page("pages/batch.py").run()
    at.number_input(key="batch_limit").set_value(3)
    at.button(key="batch_load").click().run()
    at.multiselect(key="batch_methods").set_value(["FT-L"])
    at.radio(key="batch_mode").set_value("sequential")
    at.text_input(key="batch_sizes").set_value("3")
    try:
        click(at, "Run")
        job = app_state(at).job
        assert first_step.wait(120), job.errors
        at.run()
        assert_clean(at)
        assert not job.done
        live = chart(at, "batch_curves_live")
        assert "so far" in live["layout"]["title"]["text"]
        assert all(t["x"] == [1] for t in live["data"]) and live["layout"]["xaxis"]["tickvals"] == [1]
    finally:
        release.set()
    assert job.wait(240) and not job.errors, job.errors
    at.run()
    assert all(t["x"] == [1, 2, 3] for t in chart(at, "batch_curves")["data"])


def _methods() -> list[str]:
    from editing.methods import available_methods

    return available_methods()


def test_batch_page_reports_malformed_uploads_and_reads_published_formats(run_store_path):
    at = new_app().run()
    at.switch_page("pages/batch.py").run()
    at.radio(key="batch_source").set_value("Upload a file").run()
    at.file_uploader(key="batch_upload").set_value(("broken.json", b'[{"requested_rewrite": ', "application/json"))
    at.run()
    at.button(key="batch_load").click().run()
    assert_clean(at)
    assert any("broken.json" in e and "not valid JSON" in e for e in errors(at)), errors(at)
    assert app_state(at).dataset is None
    at.radio(key="batch_source").set_value("A file on this machine").run()
    at.text_input(key="batch_path").set_value("/etc/passwd").run()
    at.button(key="batch_load").click().run()
    assert any("Path refused" in e and "outside the folders" in e for e in errors(at)), errors(at)
    assert at.text_input(key="batch_path").value == "/etc/passwd" and app_state(at).dataset is None
    at.radio(key="batch_source").set_value("Upload a file").run()
    sample = SHARED_DATASETS / "counterfact.sample.json"
    if not sample.is_file():
        pytest.skip(f"no shared CounterFact sample at {sample}")
    at.file_uploader(key="batch_upload").set_value(("counterfact.json", sample.read_bytes(), "application/json"))
    at.run()
    at.button(key="batch_load").click().run()
    assert_clean(at)
    dataset = app_state(at).dataset
    assert dataset is not None and dataset.label == "counterfact.json" and dataset.cases[0].source == "counterfact"


def test_locate_page_draws_a_heatmap_per_kind():
    at = new_app().run()
    at.switch_page("pages/locate.py").run()
    assert_clean(at)
    at.multiselect(key="loc_kinds").set_value(["block", "mlp"])
    at.number_input(key="loc_samples").set_value(2)
    assert at.number_input(key="loc_window").value == 1  # a quarter of the demo's 4 layers
    click(at, "Trace")
    assert_clean(at)
    assert not errors(at), errors(at)
    view = app_state(at).trace
    assert set(view.results) == {"block", "mlp"}
    block = view.results["block"]
    assert block.answer == "France" and block.scores.shape[0] == len(block.tokens)
    assert view.results["mlp"].answer == block.answer
    assert math.isfinite(block.base_score) and block.base_score > block.low_score
    assert any(f"→ {block.answer}" in h.value for h in at.subheader)
    heat = chart(at, "loc_heatmap_block")["data"][0]
    assert len(heat["z"]) == len(block.tokens) and len(heat["z"][0]) == 4  # tokens × the demo's 4 layers
    at.text_input(key=fact_key("loc", "subject")).set_value("Big Ben")
    click(at, "Trace")
    assert any("does not occur in the prompt" in e for e in errors(at)), errors(at)
    assert at.text_input(key=fact_key("loc", "subject")).value == "Big Ben"


def test_the_sidebar_offers_editors_trained_with_other_settings(demo_handle, tmp_path, monkeypatch):
    if "KE" not in _methods():
        pytest.skip("KE is not registered")
    from editing.train import EDITORS_ENV, train_editor

    monkeypatch.setenv(EDITORS_ENV, str(tmp_path))  # no editor with the default config here
    folder, _ = train_editor(demo_handle, "KE", {"steps": 2, "batch_size": 2, "n_eval": 0})
    at = new_app(method="KE").run()
    assert any("needs an editor trained" in w.value for w in at.sidebar.warning)
    choice = at.sidebar.selectbox(key="hp|demo|auto|float32|KE|checkpoint")
    assert choice.options[1].startswith(f"{folder.name}: ") and "steps=2" in choice.options[1]
    choice.set_value(str(folder)).run()
    assert_clean(at)
    assert not any("needs an editor trained" in w.value for w in at.sidebar.warning)
    click(at, "Apply edit")
    assert_clean(at)
    session = app_state(at).current_session()
    assert len(session.edits) == 1 and session.edits[0].info["checkpoint"] == str(folder)


def test_bad_hyper_parameter_is_reported_and_blocks_the_edit():
    if "FT-L" not in _methods():
        pytest.skip("FT-L is not registered")
    at = new_app(method="FT-L").run()
    key = "hp|demo|auto|float32|FT-L|layers"
    at.sidebar.text_input(key=key).set_value("2, 9").run()
    assert any("Layers must lie between 0 and 3" in e.value for e in at.sidebar.error)
    click(at, "Apply edit")
    assert_clean(at)
    assert any("Fix the hyper-parameters" in e for e in errors(at)), errors(at)
    assert at.sidebar.text_input(key=key).value == "2, 9"
    assert app_state(at).current_session().edits == ()


def test_untrained_editor_trains_in_the_background(monkeypatch):
    """A learned method that is not trained yet: the sidebar says so, Apply refuses, and 'Train' starts a
    background run whose progress the sidebar shows; once trained, the method is ready."""
    import threading
    from dataclasses import dataclass
    from pathlib import Path
    from typing import ClassVar

    import editing.train
    from editing.methods.base import METHODS, EditMethod, HParams
    from editing.train import TRAINERS, Trainer
    from ui.jobs import find_shared_task

    trained, release = threading.Event(), threading.Event()

    @dataclass
    class NoHParams(HParams):
        pass

    class NeedsTraining(EditMethod):
        name: ClassVar[str] = "Learned test method"
        hparams_class = NoHParams
        edit_kind = "weight_delta"
        requires_training: ClassVar[bool] = True

        def readiness(self, handle, hparams=None):
            return None if trained.is_set() else f"{self.name} needs a trained editor."

        def _execute(self, handle, requests, hparams, progress):
            raise AssertionError("not part of this test")

    def fake_training(handle, name, overrides=None, progress=None):
        progress(0.25, "step 25 of 100")
        release.wait(60)
        trained.set()
        return Path("checkpoint"), {}

    method = NeedsTraining.name
    monkeypatch.setitem(METHODS, method, NeedsTraining)
    monkeypatch.setitem(TRAINERS, method, Trainer(method, lambda handle: {}, lambda *args: {}))
    monkeypatch.setattr(editing.train, "train_editor", fake_training)
    at = new_app(method=method).run()
    assert any("needs a trained editor" in w.value for w in at.sidebar.warning)
    click(at, "Apply edit")
    assert any("needs a trained editor" in e for e in errors(at)) and app_state(at).current_session().edits == ()
    at.sidebar.button(key=f"sb_train_{method}").click().run()
    assert_clean(at)
    try:
        deadline = time.time() + 30
        while not any("step 25 of 100" in p.proto.text for p in at.sidebar.get("progress")):
            assert time.time() < deadline, "no training progress shown"
            time.sleep(0.2)
            at.run()
        assert not [b for b in at.sidebar.button if b.key == f"sb_train_{method}"]  # no second run offered
        at.switch_page("pages/compare.py").run()  # the rest of the app stays usable meanwhile
        assert_clean(at)
    finally:
        release.set()
    assert find_shared_task(f"train|demo|auto|float32|{method}").wait(30)
    at.run()
    assert_clean(at)
    assert not any("needs a trained editor" in w.value for w in at.sidebar.warning)
