"""The scope map: hidden states before and after an edit, projected to 2-D."""

from __future__ import annotations

import numpy as np
import pytest

from editing.core.request import EditRequest
from editing.core.session import EditSession
from eval.datasets import load_dataset
from eval.probes import ProbeSet, merge_probesets, probes_for_request
from eval.scope import POINT_COLUMNS, edited_layer, hidden_states, scope_map, warm_up_umap

EIFFEL = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")


@pytest.fixture
def edited(demo, rank_one_method):
    session = EditSession(demo)
    session.apply(rank_one_method, EIFFEL)
    return session


def check_points(scope, probes):
    points = scope.points
    assert list(points.columns[: len(POINT_COLUMNS)]) == list(POINT_COLUMNS)
    assert points["probe_id"].tolist() == [p.id for p in probes]
    assert np.isfinite(points[["x_before", "y_before", "x_after", "y_after"]].to_numpy()).all()
    assert (points["flipped"] == (points["pred_before"] != points["pred_after"])).all()
    assert (points["wanted"] == np.where(points["in_scope"], points["flipped"], ~points["flipped"])).all()
    assert points["in_scope"].tolist() == [p.in_scope for p in probes]


def test_pca_for_small_sets(edited):
    probes = ProbeSet([EIFFEL], probes_for_request(EIFFEL).probes[:10])
    scope = scope_map(edited, probes)  # auto: PCA below 15 probes
    assert scope.projection == "pca" and scope.layer == edited.edits[-1].hparams["layer"]
    check_points(scope, probes.probes)
    rel = scope.points.set_index("probe_id").loc["rel-0"]
    assert rel.pred_before == "France" and rel.pred_after == "Italy" and rel.flipped and rel.wanted
    assert rel.prob_change > 0
    assert scope.hidden_before.shape == (10, edited.handle.d_model)
    # the edit moves the edited prompt's last-token state, not the state of an unrelated fact
    moved = scope.points.set_index("probe_id")["moved"]
    assert moved["rel-0"] > 0
    subject = scope_map(edited, probes, position="subject", method="pca")
    check_points(subject, probes.probes)


def test_umap_for_larger_sets(edited):
    probes = probes_for_request(EIFFEL)
    assert len(probes) >= 15
    scope = scope_map(edited, probes, layer=1)
    assert scope.projection == "umap" and scope.layer == 1
    check_points(scope, probes.probes)


def test_without_edits_before_and_after_coincide(demo):
    session = EditSession(demo)
    probes = ProbeSet([EIFFEL], probes_for_request(EIFFEL).probes[:8])
    scope = scope_map(session, probes, method="pca")
    assert scope.layer == demo.n_layers // 2
    points = scope.points
    assert np.allclose(points[["x_before", "y_before"]].to_numpy(), points[["x_after", "y_after"]].to_numpy())
    assert not points["flipped"].any() and (points["prob_change"] == 0).all()
    assert (points["wanted"] == ~points["in_scope"]).all()  # nothing flipped: right only outside the scope


def test_hidden_states_are_the_block_outputs(demo):
    session = EditSession(demo)
    probes = probes_for_request(EIFFEL).probes[:3]
    states = hidden_states(session, probes, layer=2, position="last")
    import torch

    for probe, row in zip(probes, states, strict=True):
        ids = torch.tensor([demo.tokenizer(probe.prompt)["input_ids"]])
        with torch.no_grad():
            hidden = demo.model(ids, output_hidden_states=True).hidden_states[3][0, -1]  # after block 2
        assert np.allclose(row, hidden.numpy(), atol=1e-4)


def test_edited_layer_defaults():
    import torch

    from editing.core.edit import ParamDelta, WeightDelta

    def delta(hparams, info=None):
        return WeightDelta(method="x", requests=[EIFFEL], hparams=hparams, info=info or {},
                           deltas={"transformer.h.2.mlp.c_proj.weight": ParamDelta(dense=torch.zeros(2, 2))})

    assert edited_layer(delta({"layer": 1}), 12) == 1
    assert edited_layer(delta({"layers": [2, 3, 5]}), 12) == 5  # MEMIT: the last layer of the set
    assert edited_layer(delta({}, {"layer": 4}), 12) == 4
    assert edited_layer(delta({}), 12) == 2  # from the parameter it changes
    assert edited_layer(None, 12) == 6


def test_one_hundred_points_after_warm_up(demo, rank_one_method):
    """The bench's scope-map case (timed in ``python -m eval.bench``; no time is asserted on a shared
    machine): after the warm-up the 100-point map is a UMAP of every probe, in order, with the
    edit's own probe flipped to the new target, and the map the bench times (a second one, warm) is
    the same map, not a cheaper or different one."""
    warm_up_umap()
    cases = load_dataset("demo", limit=8)
    probes = merge_probesets([c.probes for c in cases])
    probes = ProbeSet(probes.requests, probes.probes[:100])
    session = EditSession(demo)
    session.apply(rank_one_method, cases[0].requests)
    scope = scope_map(session, probes)
    assert scope.projection == "umap" and len(scope.points) == 100
    check_points(scope, probes.probes)
    rel = scope.points.set_index("probe_id").loc["e0-rel-0"]
    assert rel.pred_after == cases[0].requests[0].target_new and rel.flipped and rel.wanted
    again = scope_map(session, probes)
    assert np.allclose(again.points[["x_after", "y_after"]].to_numpy(), scope.points[["x_after", "y_after"]].to_numpy())
