"""The dashboard's helpers without a browser: figures, input parsing, edit-stack files, actions, jobs."""

from __future__ import annotations

import io
import itertools
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from editing.core.edit import EditError, ParamDelta, WeightDelta
from editing.core.request import EditRequest
from editing.core.safety import UnsafeInput
from editing.core.session import EditSession
from editing.models.tiny import tiny_model
from tests.helpers import assert_params_equal, params_snapshot
from ui import plots
from ui.actions import describe_edit, load_stack_archive, stack_archive
from ui.jobs import ExperimentPlan, curves_from, parse_sizes
from ui.sidebar import default_method
from ui.widgets import parse_int_list

REQ = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")


def _figure_is_labelled(fig) -> None:
    """Axis titles on every axis, named traces for the legend, hover text on the data traces."""
    layout = fig.to_dict()["layout"]
    axes = [k for k in layout if k.startswith(("xaxis", "yaxis"))]
    for axis in axes:
        title = layout[axis].get("title", {})
        assert title.get("text"), f"{axis} has no title"
    data = [t for t in fig.data if t.hoverinfo != "skip" and (t.x is None or any(v is not None for v in t.x))]
    assert data and all(t.name for t in fig.data)
    assert all(t.hovertext is not None and len(t.hovertext) for t in data)


def _points(n_in: int = 4, n_out: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    kinds = ["reliability"] + ["generality"] * (n_in - 1) + ["locality"] * (n_out // 2) + \
        ["unrelated"] * (n_out - n_out // 2)
    in_scope = [k in ("reliability", "generality") for k in kinds]
    flipped = [True, True, False, True] + [False] * (n_out - 1) + [True]
    return pd.DataFrame({
        "probe_id": [f"p{i}" for i in range(len(kinds))], "kind": kinds, "in_scope": in_scope,
        "prompt": [f"prompt {i}" for i in range(len(kinds))], "answer": ["a"] * len(kinds),
        "pred_before": ["b"] * len(kinds), "pred_after": ["c"] * len(kinds), "flipped": flipped,
        "answered": [True, True, False, False] + [False] * n_out,  # p3 changed, but not to its expected answer
        "wanted": [f == s for f, s in zip(flipped, in_scope, strict=True)], "prob_change": rng.normal(size=len(kinds)),
        "x_before": rng.normal(size=len(kinds)), "y_before": rng.normal(size=len(kinds)),
        "x_after": rng.normal(size=len(kinds)) + 3, "y_after": rng.normal(size=len(kinds)),
    })


def _inside(polygon: np.ndarray, point: np.ndarray) -> bool:
    """Ray casting: whether ``point`` lies inside the closed ``polygon``."""
    inside = False
    for (x1, y1), (x2, y2) in itertools.pairwise(polygon):
        if (y1 > point[1]) != (y2 > point[1]):
            cross = x1 + (point[1] - y1) * (x2 - x1) / (y2 - y1)
            if point[0] < cross:
                inside = not inside
    return inside


def test_scope_boundary_encloses_every_in_scope_point():
    points = _points()
    fig = plots.scope_map_figure(points, ("before", "after"))
    _figure_is_labelled(fig)
    outlines = [t for t in fig.data if t.line is not None and t.line.dash == "dash"]
    assert len(outlines) == 2  # one dashed outline per panel
    inside = points[points["in_scope"]]
    for outline, stage in zip(outlines, ("before", "after"), strict=True):
        polygon = np.stack([np.array(outline.x, float), np.array(outline.y, float)], axis=1)
        assert np.allclose(polygon[0], polygon[-1])  # closed
        for row in inside.itertuples():
            assert _inside(polygon, np.array([getattr(row, f"x_{stage}"), getattr(row, f"y_{stage}")]))


def test_scope_points_carry_probe_ids_and_outcome_colours():
    points = _points()
    fig = plots.scope_map_figure(points, ("after",))
    markers = [t for t in fig.data if t.mode == "markers" and t.customdata is not None]
    ids = sorted(i for t in markers for i in t.customdata)
    assert ids == sorted(points["probe_id"])
    by_name = {t.name: list(t.customdata) for t in markers}
    # p1 is in scope and now gives its answer; p3 changed to another; the last is out of scope and flipped
    assert "p1" in by_name["changed to the expected answer"]
    assert by_name["changed to something else"] == ["p3"]
    assert points["probe_id"].iloc[-1] in by_name["changed, not intended"]
    assert "p2" in by_name["unchanged, should have changed"]
    hover = " ".join(h for t in markers for h in t.hovertext)
    assert "prompt 0" in hover and "before: b → after: c" in hover


def test_selection_event_gives_probe_ids():
    event = {"selection": {"points": [{"customdata": "gen-1", "x": 1.0}, {"customdata": ["loc-2"]},
                                      {"customdata": "gen-1"}, {"x": 3}]}}
    assert plots.selected_probe_ids(event) == ["gen-1", "loc-2"]
    assert plots.selected_probe_ids(None) == []
    assert plots.selected_probe_ids({"selection": {"points": []}}) == []


def test_comparison_and_curve_figures_are_labelled():
    metrics = pd.DataFrame({"reliability": [1.0, 0.5], "generality": [0.8, 0.2], "locality": [0.9, 1.0],
                            "portability": [float("nan"), 0.1], "wall_time_s": [1.5, 0.2],
                            "peak_memory_bytes": [2**20, 3 * 2**20], "memory_kind": ["cuda", "cuda"]},
                           index=["ROME", "FT-L"])
    radar = plots.metrics_radar(metrics)
    assert [t.name for t in radar.data] == ["ROME", "FT-L"]
    assert radar.data[0].r[-1] == radar.data[0].r[0]  # closed polygon
    _figure_is_labelled(plots.metrics_bars(metrics, ["reliability", "generality"]))
    cost = plots.cost_figure(metrics)
    _figure_is_labelled(cost)
    assert list(cost.data[1].y) == [1.0, 3.0]  # MiB
    curves = pd.DataFrame({"method": ["ROME"] * 3 + ["FT-L"] * 3, "x": [1, 2, 4] * 2,
                           "reliability": [1, 0.9, 0.7, 1, 0.5, 0.2], "locality": [1, 1, 0.9, 0.8, 0.6, 0.3]})
    fig = plots.metric_curves(curves, "x", "batch size")
    _figure_is_labelled(fig)
    assert len(fig.data) == 4  # 2 methods × 2 metrics
    top = plots.top_predictions_figure([("France", 0.9), ("Paris", 0.05)], [("Italy", 0.7), ("France", 0.2)])
    _figure_is_labelled(top)
    assert list(top.data[0].y) == ["Italy", "France", "Paris"]
    assert list(top.data[1].x) == [0.7, 0.2, 0.0]


def test_trace_heatmap_marks_subject_tokens():
    from editing.analysis.trace import TraceResult

    result = TraceResult(scores=torch.rand(4, 3), tokens=["The", "Eiffel", "Tower", "is"], subject_range=(1, 3),
                         answer="France", base_score=0.9, low_score=0.1, kind="mlp")
    fig = plots.trace_heatmap(result)
    heat = fig.data[0]
    assert list(heat.y) == ["0: The", "1: Eiffel*", "2: Tower*", "3: is"]
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text
    assert "P(France)" in heat.colorbar.title.text and heat.hovertext


def test_parsing_numbers_lists():
    assert parse_int_list("3, 4 5", [1]) == [3, 4, 5]
    assert parse_int_list("2", (1,)) == (2,)
    with pytest.raises(ValueError, match="whole numbers"):
        parse_int_list("3, x", [1])
    assert parse_sizes("4, 1,2 2") == (1, 2, 4)
    for bad in ("", "0, 2", "a"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_experiment_plan_tasks_and_curves():
    batch = ExperimentPlan(("ROME", "FT-L"), "batch", (4, 1, 2), "demo")
    assert batch.tasks() == [("ROME", 1), ("ROME", 2), ("ROME", 4), ("FT-L", 1), ("FT-L", 2), ("FT-L", 4)]
    assert batch.n_cases == 4
    sequential = ExperimentPlan(("ROME",), "sequential", (8,), "demo")
    assert sequential.tasks() == [("ROME", 1)] and sequential.n_cases == 8
    with pytest.raises(ValueError):
        ExperimentPlan((), "batch", (1,), "demo")
    with pytest.raises(ValueError):
        ExperimentPlan(("ROME",), "parallel", (1,), "demo")
    steps = pd.DataFrame({"step": [1, 2], "n_edits": [2, 2], "reliability": [1.0, 0.5], "case_ids": ["a", "b"]})
    points = curves_from("batch", [("ROME", 2, steps)])
    assert points[["x", "reliability"]].to_dict("records") == [{"x": 2, "reliability": 0.75}]
    seq = pd.DataFrame({"step": [1, 2, 3], "n_edits": [1, 2, 3], "reliability": [1.0, 0.9, 0.8]})
    points = curves_from("sequential", [("ROME", 1, seq)])
    assert points["x"].tolist() == [1, 2, 3] and points["method"].unique().tolist() == ["ROME"]


def test_experiment_curves_fail_efficacy_without_reliability_and_add_up_counts():
    """A batch point pools its batches: rates are averaged, counts of failures and known neighbours summed; the
    curves draw edit success (answers the new target) beside the survey's four, and the tables name both
    localities."""
    steps = pd.DataFrame({"step": [1, 2], "n_edits": [2, 2], "reliability": [0.0, 0.5], "efficacy_score": [1.0, 0.5],
                          "edit_success": [0.0, 0.5], "n_efficacy_without_reliability": [2.0, 1.0],
                          "locality": [1.0, 1.0], "locality_known": [0.5, float("nan")],
                          "n_locality_known": [2.0, 0.0]})
    point = curves_from("batch", [("FT-L", 2, steps)]).iloc[0]
    assert point["edit_success"] == 0.25 and point["efficacy_score"] == 0.75
    assert point["n_efficacy_without_reliability"] == 3 and point["n_locality_known"] == 2
    assert point["locality_known"] == 0.5
    assert "edit_success" in plots.CURVE_METRICS
    fig = plots.metric_curves(curves_from("batch", [("FT-L", 2, steps)]), "x", "batch size", plots.CURVE_METRICS)
    assert "Edit success (answers the new target)" in [a.text for a in fig.layout.annotations]
    assert plots.TABLE_LABELS["locality"] == "Locality (agreement)"
    assert plots.known_neighbours_label([3.0, 3.0]) == "Locality (known neighbours, n=3)"
    assert plots.known_neighbours_label([3.0, 2.0]) == "Locality (known neighbours)"


def test_locality_and_efficacy_details_name_what_they_count():
    from eval.outcomes import efficacy_detail, locality_detail

    metrics = {"locality": 1.0, "locality_known": 0.5, "n_locality_known": 2.0, "n_locality": 5.0,
               "unrelated_unchanged": 0.8, "n_unrelated": 5.0, "edit_success": 0.0,
               "n_efficacy_without_reliability": 1.0}
    text = locality_detail(metrics)
    assert "Locality (known neighbours, n=2 of 5): 50%" in text and "3 neighbour(s) it never answered" in text
    assert "Unrelated facts (random other facts) unchanged: 80% of 5" in text
    assert "n/a" in locality_detail({**metrics, "n_locality_known": 0.0, "locality_known": float("nan")})
    assert locality_detail({}) == ""
    assert "1 edit prompt(s)" in efficacy_detail(metrics) and "edit success" in efficacy_detail(metrics)
    assert efficacy_detail({**metrics, "n_efficacy_without_reliability": 0.0}) == ""


def test_default_method_prefers_rome_then_ft_l():
    assert default_method(["FT", "FT-L", "ROME"]) == "ROME"
    assert default_method(["FT", "FT-L", "KN"]) == "FT-L"
    assert default_method(["KN", "MEND"]) == "KN"
    assert default_method([]) is None


def _delta(handle, seed: int) -> WeightDelta:
    name = handle.arch.mlp_out_name(1) + ".weight"
    gen = torch.Generator().manual_seed(seed)
    delta = ParamDelta(dense=0.1 * torch.randn(handle.parameter(name).shape, generator=gen))
    return WeightDelta(method="test", requests=[REQ], hparams={}, deltas={name: delta})


def test_edit_stack_saves_and_loads_as_a_zip():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(_delta(handle, 1))
    session.push(_delta(handle, 2))
    ids = torch.tensor([handle.tokenizer("Eiffel Tower is a famous landmark in")["input_ids"]])
    with session.active(), torch.no_grad():
        expected = handle.model(ids).logits
    before = params_snapshot(handle)
    data = stack_archive(session)
    assert zipfile.ZipFile(io.BytesIO(data)).namelist()[0] == "session.json"
    loaded = load_stack_archive(EditSession(handle), data)
    assert [describe_edit(e) for e in loaded.edits] == ["Eiffel Tower: France → Italy"] * 2
    with loaded.active(), torch.no_grad():
        assert torch.equal(handle.model(ids).logits, expected)
    assert_params_equal(handle, before)


def test_loading_refuses_other_models_and_bad_files():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(_delta(handle, 1))
    data = stack_archive(session)
    other = tiny_model("llama")
    with pytest.raises(EditError, match="saved for the model 'tiny-gpt2'"):
        load_stack_archive(EditSession(other), data)
    with pytest.raises(UnsafeInput):
        load_stack_archive(EditSession(handle), b"this is not a zip file")
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.json", "{}")
    with pytest.raises(UnsafeInput):
        load_stack_archive(EditSession(handle), evil.getvalue())
    # A stack for a same-named model of another shape fails when test-applied, not later.
    renamed = tiny_model("gpt2", d_model=32)
    with pytest.raises(EditError, match="do not fit"):
        load_stack_archive(EditSession(renamed), data)
    assert not getattr(renamed, "_applied_edits", [])


def test_background_task_reports_progress_and_is_shared():
    import threading

    from ui.jobs import find_shared_task, shared_task

    release = threading.Event()
    calls = []

    def work(progress):
        calls.append(1)
        progress(0.5, "half way")
        release.wait(30)
        return "checkpoint"

    key = "test|shared-task"
    task = shared_task(key, "training", work)
    assert shared_task(key, "training", work) is task  # a second session joins the same run
    deadline = time.time() + 30
    while task.message != "half way" and time.time() < deadline:
        release.wait(0.01)
    assert task.progress == 0.5 and not task.done
    release.set()
    assert task.wait(30) and task.result == "checkpoint" and task.error is None
    assert find_shared_task(key) is task and len(calls) == 1

    failing = shared_task("test|failing-task", "training", lambda progress: 1 / 0)
    assert failing.wait(30) and "division by zero" in failing.error
    again = shared_task("test|failing-task", "training", lambda progress: "ok")  # a failed run can be retried
    assert again is not failing and again.wait(30) and again.result == "ok"


def test_time_left_comes_from_the_runs_own_pace():
    from ui.jobs import time_left

    assert time_left(started_at=100.0, progress=0.01, now=110.0) == ""  # too early to tell
    assert time_left(started_at=100.0, progress=0.25, now=110.0) == " (about 30 s left)"
    assert time_left(started_at=0.0, progress=0.5, now=600.0) == " (about 10 min left)"
    assert time_left(started_at=0.0, progress=1.0, now=600.0) == ""


def test_example_fact_follows_the_model_until_the_person_types(monkeypatch):
    """A real model starts from a probe it can answer; the demo keeps its own phrasing; typed text stays."""
    import streamlit as st

    from ui.state import DEMO_FACT, REAL_MODEL_FACT, AppState, Context, ModelChoice
    from ui.widgets import fact_key, follow_model_default

    fake_session: dict = {}
    monkeypatch.setattr(st, "session_state", fake_session)
    state = AppState()
    state.context = Context(ModelChoice(spec="smollm2-135m"))
    follow_model_default(state)
    assert state.fact == REAL_MODEL_FACT
    assert fake_session[fact_key("pg", "prompt")] == REAL_MODEL_FACT.prompt
    assert fake_session[fact_key("cmp", "target_new")] == "Rome"

    state.context = Context(ModelChoice(spec="demo"))
    follow_model_default(state)
    assert state.fact == DEMO_FACT and fake_session[fact_key("loc", "prompt")] == DEMO_FACT.prompt

    fake_session[fact_key("pg", "target_new")] = "Germany"  # typed, not yet applied
    state.context = Context(ModelChoice(spec="smollm2-135m"))
    follow_model_default(state)
    assert fake_session[fact_key("pg", "target_new")] == "Germany"
    assert fake_session[fact_key("pg", "prompt")] == DEMO_FACT.prompt and state.fact == DEMO_FACT


def test_several_gpus_offer_a_model_spread_over_all_of_them(monkeypatch):
    from ui import models

    assert models.ALL_GPUS not in models.device_options()  # this machine: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.device_options()[-2:] == ["cuda", models.ALL_GPUS]
    seen = []
    monkeypatch.setattr(models, "load_model", lambda spec, **kwargs: seen.append((spec, kwargs)))
    models._shared_handle.__wrapped__("some-8b", models.ALL_GPUS, "bfloat16")
    models._shared_handle.__wrapped__("some-8b", "cuda", "bfloat16")
    assert seen == [("some-8b", {"dtype": "bfloat16", "device_map": "auto"}),
                    ("some-8b", {"device": "cuda", "dtype": "bfloat16"})]
