"""CaliNET: a calibration FFN per batch of facts, exact revert, batch and sequential behaviour on the demo model."""

from __future__ import annotations

import time

import pytest
import torch

from editing.core.edit import handle_stack
from editing.core.hooks import capture
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.learning.targets import target_batch
from editing.methods import get_method
from editing.methods.calinet import CalibrationFFN, CaliNETHParams
from editing.methods.patching import ffn_activation, last_block_readout, training_prompts
from editing.models.tiny import tiny_model
from editing.storage.factbase import load_factbase
from tests.helpers import (
    agreement,
    assert_params_equal,
    assert_patch_changes_reverts_and_reloads,
    edit_figures,
    heldout_edits_and_neighbours,
    hit_rate,
    logits,
    params_snapshot,
    predictions,
)

REQ = EditRequest("The capital of {} is", "France", "Berlin", "Paris")


# -- every family: shapes, finiteness, exact revert, persistence --------------------------------------
def test_calibration_ffn_on_every_family_is_finite_and_reverts_exactly(tiny_handle, tmp_path):
    before, out_before = params_snapshot(tiny_handle), logits(tiny_handle)
    edit = get_method("CaliNET").apply(tiny_handle, [REQ], {"max_steps": 5, "locality_facts": 20, "n_slots": 8})
    assert isinstance(edit, CalibrationFFN) and edit.is_applied and edit.n_slots == 8
    layer = tiny_handle.n_layers - 1
    gated = tiny_handle.arch.family in ("llama", "mistral", "qwen2")
    assert set(edit.weights) == {f"{layer}.keys", f"{layer}.values"} | ({f"{layer}.gates"} if gated else set())
    assert all(t.shape == (8, tiny_handle.d_model) for t in edit.weights.values())
    assert all(torch.isfinite(t).all() for t in edit.tensors().values())
    assert all(p.grad is None and not p.requires_grad for p in tiny_handle.model.parameters())
    assert_patch_changes_reverts_and_reloads(tiny_handle, edit, before, out_before, tmp_path / "calinet")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_middle_layers_train_through_full_forward_passes(family):
    """Away from the last block the readout shortcut does not apply: the hooked model trains it."""
    handle = tiny_model(family)
    before = params_snapshot(handle)
    edit = get_method("CaliNET").apply(handle, [REQ], {"layers": (1, 2), "max_steps": 3, "locality_facts": 10})
    assert edit.layers == (1, 2) and edit.info["steps"] >= 1
    edit.revert(handle)
    assert_params_equal(handle, before)


def test_last_block_readout_matches_the_hooked_model():
    """The shortcut used on the last block gives the logits the hooked model gives."""
    handle = tiny_model("gpt2")
    layer = handle.n_layers - 1
    gen = torch.Generator().manual_seed(0)
    weights = {f"{layer}.keys": torch.randn(8, handle.d_model, generator=gen),
               f"{layer}.values": torch.randn(8, handle.d_model, generator=gen)}
    patch = CalibrationFFN(method="CaliNET", requests=[REQ], hparams={}, layers=(layer,), weights=weights)
    batch = target_batch(handle, [("The capital of France is", "Paris"), ("Lyon is a city in", "France")])
    name = handle.arch.mlp_name(layer)
    with capture(handle.model, [name], inputs=True) as store:
        readout = last_block_readout(handle, batch.model_inputs())
    shortcut = readout.logits(patch.contribution(layer, store[name], ffn_activation(handle)))
    patch.apply(handle)
    with torch.no_grad():
        hooked = handle.model(**batch.model_inputs()).logits
    patch.revert(handle)
    assert torch.allclose(shortcut, hooked, atol=1e-5)


def test_training_prompts_use_the_relations_training_templates():
    prompts = training_prompts(REQ, 4)
    relation = load_factbase().relations["country_capital"]
    assert prompts[0] == "The capital of France is" and len(prompts) == 4
    assert all(any(t.replace("{}", "France") == p for t in relation.train_templates) for p in prompts)
    free_form = EditRequest("My favourite city in {} is", "France", "Nice")
    assert training_prompts(free_form, 4) == ["My favourite city in France is"]


def test_defaults_calibrate_the_last_layer(tiny_handle):
    assert CaliNETHParams.for_model(tiny_handle).layers == (tiny_handle.n_layers - 1,)


# -- the demo model ----------------------------------------------------------------------------------
def test_batch_of_100_facts_is_learnt_locally(demo):
    """One calibration FFN of 64 slots for 100 counterfacts (the paper's main setting).

    Locality is measured on neighbours outside CaliNET's training memory, as the evaluation draws
    them: measured 0.81 (deterministic; printed with ``pytest -s``). Before issue 13 this test
    measured it on neighbours its KL term had been trained to keep.
    """
    records, near, base = heldout_edits_and_neighbours(demo, 100, seed=2, near_from=30)
    start = time.perf_counter()
    edit = get_method("CaliNET").apply(demo, [r.request for r in records])
    seconds = time.perf_counter() - start  # printed, not asserted
    try:
        reliability, generality, locality = edit_figures(demo, records, near, base)
    finally:
        edit.revert(demo)
    print(f"CaliNET batch of 100: reliability {reliability:.2f}, generality (held-out templates) {generality:.2f}, "
          f"locality {locality:.3f}, edit took {seconds:.2f} s, {edit.info}")
    assert reliability >= 0.98 and generality >= 0.6 and locality >= 0.75
    assert edit.n_slots == 64 and edit.size_bytes == 2 * 64 * demo.d_model * 4


def test_sequential_batches_keep_earlier_facts(demo):
    """Five batches of 10 facts stacked in a session: each adds one 64-slot calibration FFN, and
    the facts of the earlier batches still hold at the end. Locality on neighbours outside the
    training memory drops with every batch: 0.66 after five (0.96 when measured, before issue 13, on
    neighbours the KL term trained on)."""
    records, near, base = heldout_edits_and_neighbours(demo, 50, seed=1, near_from=20)
    session = EditSession(demo)
    for start in range(0, 50, 10):
        session.apply("CaliNET", [r.request for r in records[start: start + 10]])
    assert [edit.n_slots for edit in session.edits] == [64] * 5
    with session.active():
        reliability = hit_rate(demo, [(r.request.text, r.request.target_new) for r in records])
        first_batch = hit_rate(demo, [(r.request.text, r.request.target_new) for r in records[:10]])
        locality = agreement(predictions(demo, near), base)
    print(f"CaliNET after 5 sequential batches of 10: reliability {reliability:.2f} (first batch "
          f"{first_batch:.2f}), locality {locality:.3f}")
    assert reliability >= 0.9 and first_batch >= 0.9 and locality >= 0.6
    assert not handle_stack(demo)
