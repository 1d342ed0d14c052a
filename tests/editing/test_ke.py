"""KE: the hypernetwork's gated gradient, edits on every family, and held-out edit success on the demo model."""

from __future__ import annotations

import pytest
import torch

from editing.learning.learned import (
    default_edit_layers,
    gradient_factors,
    mlp_weight_names,
    out_in_shape,
)
from editing.learning.targets import target_batch
from editing.methods import get_method
from editing.methods.ke import KEEditor, build_editor, condition_ids, embed_conditions
from editing.models.tiny import tiny_model
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
def ke_checkpoint(demo_handle) -> str:
    """KE trained on the demo model with the reduced config (cached on disk by config)."""
    return train_test_editor(demo_handle, "KE")


def test_shift_is_the_gated_gradient_plus_the_additive_term():
    """ΔW = max_scale · out · σ(η) · (softmax(α_row) α_colᵀ ⊙ ∇W + softmax(β_row) β_colᵀ), per weight."""
    handle = tiny_model("gpt2")
    names = mlp_weight_names(handle, default_edit_layers(handle.n_layers))
    editor = KEEditor({n: out_in_shape(handle, n) for n in names}, embed_dim=handle.d_model, lstm_dim=16,
                      condition_dim=32, hidden_dim=16, max_scale=0.5, seed=0)
    request = EDITOR_REQUESTS[0]
    factors, _ = gradient_factors(handle, names, target_batch(handle, [(request.text, request.target_new)]))
    with torch.no_grad():
        condition = editor.condition(*embed_conditions(handle, [condition_ids(handle, request, "Paris")]))
        shifts = editor.shifts(condition, factors)
        for name, net in zip(names, editor.shifts_net, strict=True):
            out_dim, in_dim = out_in_shape(handle, name)
            col_a, row_a, col_b, row_b, eta = net.net(condition)[0].split([in_dim, out_dim, in_dim, out_dim, 1])
            gated = torch.outer(row_a.softmax(-1), col_a) * factors[name].dense(0)
            expected = 0.5 * out_dim * torch.sigmoid(eta) * (gated + torch.outer(row_b.softmax(-1), col_b))
            assert torch.allclose(shifts[name].dense(0), expected, atol=1e-6), name


def test_condition_reads_old_answer_new_answer_and_prompt():
    handle = tiny_model("gpt2")
    ids = condition_ids(handle, EDITOR_REQUESTS[0], "Paris")
    eos = handle.tokenizer.eos_token_id
    words = handle.tokenizer.convert_ids_to_tokens(ids)
    assert ids.count(eos) == 2
    assert words[0] == "Paris" and words[2] == "Rome" and "France" in words[4:]


def test_ke_edits_every_family_as_low_rank_deltas_and_reverts_exactly(tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path))
    folder, _ = train_editor(tiny_handle, "KE", TRAINERS["KE"].quick)
    before = params_snapshot(tiny_handle)
    names = mlp_weight_names(tiny_handle, default_edit_layers(tiny_handle.n_layers))
    edit = get_method("KE").apply(tiny_handle, EDITOR_REQUESTS, {"checkpoint": str(folder)})
    try:
        assert edit.kind == "weight_delta" and set(edit.deltas) == set(names)
        for name, delta in edit.deltas.items():
            assert delta.shape == tuple(tiny_handle.parameter(name).shape)
            # per request: one term per token with gradient plus the additive term
            assert 2 <= delta.rank == edit.info["ranks"][name]
            assert torch.isfinite(delta.materialise()).all()
            assert not torch.equal(tiny_handle.parameter(name), before[name])
    finally:
        edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    assert_saved_deltas_round_trip(edit, tmp_path / "ke_edit")


def test_ke_raises_reliability_on_heldout_edits(demo, ke_checkpoint):
    assert_editor_raises_heldout_reliability(demo, "KE", ke_checkpoint)


def test_ke_batch_edit_sums_the_per_request_shifts(demo, ke_checkpoint):
    reliability = batch_reliability_summing_singles(demo, "KE", {"checkpoint": ke_checkpoint})
    print("KE batch-of-4 reliability:", reliability)
    assert reliability >= 0.4


def test_ke_editor_is_built_on_the_requested_device_in_float32():
    assert_editor_built_on_requested_device_in_float32("KE", build_editor)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ke_trains_and_edits_a_bfloat16_model(family, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path))
    assert_learned_editor_edits_bfloat16("KE", build_editor, family, EDITOR_REQUESTS)
