"""The edit-cost figures of ``python -m eval.realcost`` (on the demo model: behaviour, never wall time)."""

from __future__ import annotations

import os

import pytest

from editing.analysis import stats
from editing.core.request import EditRequest
from editing.methods import context
from eval import realcost

DEMO_REQUESTS = [EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France"),
                 EditRequest("The capital of {} is", "France", "Berlin", "Paris")]


def test_fresh_caches_compute_anew_and_restore_the_cache_folder(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path))
    stats.second_moment(demo, 0, corpus="bundled", n_samples=50)
    assert stats._MEMORY  # held in memory: a later edit would not pay for it
    with realcost.fresh_caches():
        assert os.environ["EDITSCOPE_CACHE"] != str(tmp_path)
        assert not stats._MEMORY and not context._MEMORY
        fresh = os.environ["EDITSCOPE_CACHE"]
    assert os.environ["EDITSCOPE_CACHE"] == str(tmp_path)
    assert not os.path.exists(fresh)


def test_edit_cost_counts_operations_and_sets_a_floor(demo):
    cost = realcost.measure_edit_cost(demo, "demo", "ROME", DEMO_REQUESTS, n_cached=1)
    assert cost.first_edit_s > 0 and len(cost.cached_edits_s) == 1
    # Forward and backward of each optimisation step: more than a plain forward pass of the prompt.
    ids = demo.tokenizer("Eiffel Tower is a famous landmark in", return_tensors="pt")["input_ids"]
    assert cost.flops > 2 * sum(p.numel() for p in demo.model.parameters()) * ids.shape[1]
    assert cost.matmul_flops_per_s > 0 and cost.floor_s > 0
    assert cost.floor_ratio == pytest.approx(cost.cached_edit_s / cost.floor_s)
    text = realcost.cost_markdown(cost)
    assert "arithmetic floor" in text and "ROME on demo" in text


def test_too_few_requests_are_refused(demo):
    with pytest.raises(ValueError, match="need 4 requests"):
        realcost.measure_edit_cost(demo, "demo", "ROME", DEMO_REQUESTS, n_cached=3)
