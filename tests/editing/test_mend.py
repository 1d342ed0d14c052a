"""MEND: the gradient transform, edits on every family, and held-out edit success on the demo model."""

from __future__ import annotations

import re

import pytest
import torch

from editing.analysis.scoring import score_targets, top_predictions
from editing.core.edit import EditError
from editing.core.session import EditSession
from editing.learning.learned import default_edit_layers, gradient_factors, mlp_weight_names
from editing.learning.targets import target_batch
from editing.methods import get_method
from editing.methods.mend import GradientTransform, RunningMoments, build_editor
from editing.train import TRAINERS, train_editor
from tests.helpers import (
    EDITOR_REQUESTS,
    assert_editor_built_on_requested_device_in_float32,
    assert_editor_raises_heldout_reliability,
    assert_learned_editor_edits_bfloat16,
    assert_params_equal,
    assert_saved_deltas_round_trip,
    batch_reliability_summing_singles,
    params_snapshot,
    train_test_editor,
)


@pytest.fixture(scope="module")
def mend_checkpoint(demo_handle) -> str:
    """MEND trained on the demo model with the reduced config (cached on disk by config)."""
    return train_test_editor(demo_handle, "MEND")


def test_untrained_transform_is_the_identity():
    transform = GradientTransform(in_dim=6, out_dim=4, n_modes=2, rank=8, n_hidden=1,
                                  generator=torch.Generator().manual_seed(0))
    u, delta = torch.randn(5, 6), torch.randn(5, 4)
    for mode in (0, 1):
        new_u, new_delta = transform(u, delta, mode)
        assert torch.equal(new_u, u) and torch.equal(new_delta, delta)


def test_running_moments_match_the_batch_statistics():
    moments = RunningMoments(3)
    rows = torch.randn(50, 3) * torch.tensor([1.0, 5.0, 0.1]) + 2.0
    for chunk in rows.split(7):
        moments.update(chunk)
    normalised = moments.normalise(rows)
    assert torch.allclose(normalised.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(normalised.std(0), torch.ones(3), atol=1e-4)


def test_mend_edits_every_family_as_low_rank_deltas_and_reverts_exactly(tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path))
    folder, _ = train_editor(tiny_handle, "MEND", TRAINERS["MEND"].quick)
    before = params_snapshot(tiny_handle)
    batch = target_batch(tiny_handle, [(r.text, r.target_new) for r in EDITOR_REQUESTS])
    nll_before = [s.mean_nll for s in score_targets(tiny_handle, [r.text for r in EDITOR_REQUESTS],
                                                    [r.target_new for r in EDITOR_REQUESTS])]
    names = mlp_weight_names(tiny_handle, default_edit_layers(tiny_handle.n_layers))
    factors, _ = gradient_factors(tiny_handle, names, batch)
    edit = get_method("MEND").apply(tiny_handle, EDITOR_REQUESTS, {"checkpoint": str(folder)})
    try:
        assert edit.kind == "weight_delta" and set(edit.deltas) == set(names)
        for name, delta in edit.deltas.items():
            # one rank-1 term per token that carries gradient, summed over both requests
            assert delta.rank == int(factors[name].mask.sum()) == edit.info["ranks"][name]
            assert delta.shape == tuple(tiny_handle.parameter(name).shape)
            assert torch.isfinite(delta.materialise()).all()
            assert not torch.equal(tiny_handle.parameter(name), before[name])
        nll_after = [s.mean_nll for s in score_targets(tiny_handle, [r.text for r in EDITOR_REQUESTS],
                                                       [r.target_new for r in EDITOR_REQUESTS])]
        assert nll_after != nll_before
    finally:
        edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    assert_saved_deltas_round_trip(edit, tmp_path / "mend_edit")


def test_missing_editor_fails_cleanly(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path))
    with pytest.raises(EditError, match=re.escape("python -m editing.train MEND --model demo")):
        get_method("MEND").apply(demo, EDITOR_REQUESTS[:1])
    with pytest.raises(EditError, match="no finished MEND editor"):
        get_method("MEND").apply(demo, EDITOR_REQUESTS[:1], {"checkpoint": str(tmp_path)})


def test_mend_raises_reliability_on_heldout_edits(demo, mend_checkpoint):
    assert_editor_raises_heldout_reliability(demo, "MEND", mend_checkpoint)


def test_mend_in_a_session_changes_the_answer_only_while_active(demo, mend_checkpoint):
    request = EDITOR_REQUESTS[0]
    before = params_snapshot(demo)
    session = EditSession(demo)
    edit = session.apply("MEND", request, {"checkpoint": mend_checkpoint})
    assert edit.stats.wall_time_s > 0 and edit.info["checkpoint"] == mend_checkpoint
    assert_params_equal(demo, before)
    with session.active():
        assert top_predictions(demo, [request.text], k=1)[0][0].token == request.target_new
    assert top_predictions(demo, [request.text], k=1)[0][0].token == request.target_true
    assert_params_equal(demo, before)


def test_mend_batch_edit_sums_the_per_request_updates(demo, mend_checkpoint):
    reliability = batch_reliability_summing_singles(demo, "MEND", {"checkpoint": mend_checkpoint})
    print("MEND batch-of-4 reliability:", reliability)
    assert reliability >= 0.8


def test_mend_editor_is_built_on_the_requested_device_in_float32():
    editor = assert_editor_built_on_requested_device_in_float32("MEND", build_editor)
    assert {b.dtype for b in editor.buffers()} == {torch.float64}  # the running moments


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mend_trains_and_edits_a_bfloat16_model(family, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path))
    assert_learned_editor_edits_bfloat16("MEND", build_editor, family, EDITOR_REQUESTS)
