"""evaluate_edit and predict on the demo model, with a closed-form test method."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest

from editing.core.edit import InferenceWrapper, Route, register_edit_type
from editing.core.request import EditRequest
from editing.core.session import EditSession
from eval import evaluate as evaluate_module
from eval.datasets import load_dataset
from eval.evaluate import TABLE_COLUMNS, evaluate_edit, predict
from eval.metrics import METRIC_KEYS
from eval.probes import merge_probesets, probes_for_request
from tests.helpers import assert_params_equal, params_snapshot

EIFFEL = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")


def test_evaluate_edit_round_trip(demo, rank_one_method):
    session = EditSession(demo)
    base = params_snapshot(demo)
    probes = probes_for_request(EIFFEL)
    outcome = evaluate_edit(session, rank_one_method, [EIFFEL], probes)
    assert session.edits == (outcome.edit,) and outcome.edit.method == rank_one_method
    assert_params_equal(demo, base)  # the shared model holds no edit at rest

    table = outcome.table
    assert list(table.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert table["probe_id"].tolist() == [p.id for p in probes]
    rel = table.set_index("probe_id").loc["rel-0"]
    # the demo model knows the fact; the edit writes the new one
    assert rel.pred_before == "France" and rel.acc_before == 0.0
    assert rel.pred_after == "Italy" and rel.acc_after == 1.0 and rel.changed
    assert rel.prob_after > rel.prob_before
    assert rel.top_after[0][0] == "Italy" and len(rel.top_after) == 5
    assert all(table["changed"] == (table["pred_before"] != table["pred_after"]))
    assert set(METRIC_KEYS) <= set(outcome.metrics)
    assert outcome.metrics["reliability"] == 1.0 and outcome.metrics["reliability_before"] == 0.0
    assert outcome.metrics["efficacy_score"] == 1.0 and outcome.metrics["efficacy_score_before"] == 0.0
    assert 0.0 <= outcome.metrics["locality"] <= 1.0
    loc = table[table.kind == "locality"]
    assert outcome.metrics["locality"] == pytest.approx(loc["agreement"].mean())
    # the edit's own measurement, not the evaluation's (editing.core.measure is tested on its own)
    assert outcome.wall_time_s == outcome.edit.stats.wall_time_s > 0
    assert outcome.peak_memory_bytes == outcome.edit.stats.peak_memory_bytes
    assert outcome.memory_kind == outcome.edit.stats.memory_kind == ("cuda" if demo.device.type == "cuda" else "rss")

    with session.active():  # the session's edit is there when asked for
        again = predict(session, probes.by_kind("reliability"))
    assert again[0].pred == "Italy"
    assert_params_equal(demo, base)

    # a second edit is judged against the session as it is (the first edit active "before")
    second = EditRequest("{} is a famous landmark in", "Colosseum", "Japan", "Italy")
    follow_up = evaluate_edit(session, rank_one_method, second, probes_for_request(second))
    assert len(session.edits) == 2
    assert follow_up.table.set_index("probe_id").loc["rel-0", "pred_after"] == "Japan"
    assert_params_equal(demo, base)


def test_a_zero_edit_changes_nothing(demo, rank_one_method):
    session = EditSession(demo)
    outcome = evaluate_edit(session, rank_one_method, [EIFFEL], hparams={"strength": 0.0}, k=0)
    table = outcome.table
    assert not table["changed"].any() and (table["agreement"] == 1.0).all()
    assert outcome.metrics["locality"] == 1.0 and outcome.metrics["unrelated"] == 1.0
    assert outcome.metrics["reliability"] == outcome.metrics["reliability_before"]
    assert table["top_before"].map(len).eq(0).all()  # k=0: no top-k lists
    assert table["prob_before"].tolist() == pytest.approx(table["prob_after"].tolist(), rel=1e-5)


def test_errors_push_nothing(demo, rank_one_method, monkeypatch):
    session = EditSession(demo)
    with pytest.raises(ValueError, match="Unknown hyper-parameters"):
        evaluate_edit(session, rank_one_method, [EIFFEL], hparams={"nonsense": 1})
    assert session.edits == ()
    undone = evaluate_edit(session, rank_one_method, [EIFFEL], k=0).edit
    session.undo()  # on the redo list now: a failed evaluation must not lose it
    calls = []
    real_predict = evaluate_module.predict

    def failing_after(session, probes, k=5):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scoring failed")
        return real_predict(session, probes, k)

    monkeypatch.setattr(evaluate_module, "predict", failing_after)
    with pytest.raises(RuntimeError, match="scoring failed"):
        evaluate_edit(session, rank_one_method, [EIFFEL])
    assert session.edits == () and session.redo() is undone


@register_edit_type
@dataclass(eq=False)
class ContextWrapper(InferenceWrapper):
    """Puts a fixed context before every query (an IKE-like wrapper for routing tests)."""

    context: str = ""
    kind: ClassVar[str] = "inference_wrapper"

    def route(self, handle, route):
        return Route(route.handle, f"{self.context} {route.prompt}", route.prefix_chars + len(self.context) + 1,
                     self.method)

    def tensors(self):
        return {}

    def config(self):
        return {"context": self.context}

    @classmethod
    def from_parts(cls, common, config, tensors):
        return cls(**config, **common)


def test_predict_routes_through_inference_wrappers(demo):
    session = EditSession(demo)
    probes = probes_for_request(EIFFEL).probes[:3]
    plain = predict(session, probes)
    session.push(ContextWrapper(method="context", requests=[EIFFEL], hparams={},
                                context="Eiffel Tower is a famous landmark in Italy ."))
    routed = predict(session, probes)
    assert all(o.routed_by == "context" and o.routed_prompt.startswith("Eiffel Tower is a famous landmark in Italy .")
               for o in routed)
    assert all(o.routed_by is None for o in plain)
    assert [o.answer_prob for o in routed] != [o.answer_prob for o in plain]


def test_generations_give_fluency_and_consistency(demo, rank_one_method):
    session = EditSession(demo)
    prompts = ["Eiffel Tower is a famous landmark in", "The capital of the country where Eiffel Tower is located is"]
    outcome = evaluate_edit(session, rank_one_method, [EIFFEL], generation_prompts=prompts, max_new_tokens=8)
    assert len(outcome.generations["after"]) == 2 and len(outcome.generations["before"]) == 2
    assert outcome.generations["after"][0].startswith("Italy")
    for key in ("fluency", "fluency_before", "consistency", "consistency_before"):
        assert math.isfinite(outcome.metrics[key]) and outcome.metrics[key] >= 0


def test_one_hundred_probes_before_and_after(demo, rank_one_method):
    """The bench's throughput case (timed in ``python -m eval.bench``), checked for results."""
    cases = load_dataset("demo", limit=8)
    probes = merge_probesets([c.probes for c in cases]).probes[:100]
    assert len(probes) == 100
    session = EditSession(demo)
    before = predict(session, probes)
    session.apply(rank_one_method, cases[0].requests)
    after = predict(session, probes)
    assert [p.probe.id for p in before] == [p.probe.id for p in after] == [p.id for p in probes]
    assert any(b.pred != a.pred for b, a in zip(before, after, strict=True))  # the edit shows in them
