"""GRACE: codebook of deferral radii, stacked edits sharing one codebook, exact revert, demo behaviour."""

from __future__ import annotations

import pytest
import torch

from editing.core.edit import handle_stack
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import get_method
from editing.methods.grace import GRACEHParams, GracePatch, active_grace_edits, count_codebook_entries, merged_codebook
from editing.methods.patching import module_inputs
from editing.train import edit_records
from tests.helpers import (
    assert_patch_changes_reverts_and_reloads,
    edit_figures,
    heldout_edits_and_neighbours,
    hit_rate,
    logits,
    neighbours,
    params_snapshot,
    single_edit_figures,
)

REQ = EditRequest("The capital of {} is", "France", "Berlin", "Paris")


# -- every family: shapes, finiteness, exact revert, persistence --------------------------------------
def test_codebook_on_every_family_is_finite_and_reverts_exactly(tiny_handle, tmp_path):
    before, out_before = params_snapshot(tiny_handle), logits(tiny_handle)
    edit = get_method("GRACE").apply(tiny_handle, [REQ], {"n_iter": 5})
    assert isinstance(edit, GracePatch) and edit.is_applied and edit.n_entries == 1
    assert edit.keys.shape == (1, tiny_handle.d_ff) and edit.values.shape == (1, tiny_handle.d_model)
    assert all(torch.isfinite(t).all() for t in edit.tensors().values())
    loaded = assert_patch_changes_reverts_and_reloads(tiny_handle, edit, before, out_before, tmp_path / "grace")
    assert loaded.uid == edit.uid and loaded.labels == ["Berlin"]


def test_default_layer_follows_the_paper_depth(tiny_handle):
    assert GRACEHParams.for_model(tiny_handle).layer == 3  # round(35/48 · 4), GPT2-XL's block 35 of 48


# -- the demo model ----------------------------------------------------------------------------------
def test_outside_the_radius_the_model_is_untouched_bit_for_bit(demo):
    """Deferral: a query outside every radius gets exactly the unedited output."""
    records = edit_records("heldout", seed=0)[:4]
    near = neighbours(records, per_record=5)
    base = {p: logits(demo, p) for p, _ in near}
    edit = get_method("GRACE").apply(demo, [r.request for r in records])
    try:
        untouched = sum(torch.equal(logits(demo, p), base[p]) for p, _ in near)
        reliability = hit_rate(demo, [(r.request.text, r.request.target_new) for r in records])
    finally:
        edit.revert(demo)
    print(f"GRACE batch of 4: reliability {reliability:.2f}, neighbours bit-identical {untouched}/{len(near)}")
    assert reliability == 1.0
    assert untouched == len(near)


def test_single_edits_are_reliable_and_local(demo):
    reliability, _generality, locality = single_edit_figures(demo, "GRACE", edit_records("heldout", seed=0)[:6])
    assert reliability == 1.0 and locality == 1.0


def test_same_input_relabelled_retires_the_old_entry_until_undone(demo):
    session = EditSession(demo)
    first = session.apply("GRACE", EditRequest("The capital of {} is", "France", "Tokyo", "Paris"))
    second = session.apply("GRACE", EditRequest("The capital of {} is", "France", "Cairo", "Paris"))
    assert second.info["actions"] == ["replace"] and second.overrides[0][:2] == [first.uid, 0]
    with session.active():
        assert hit_rate(demo, [("The capital of France is", "Cairo")]) == 1.0
        assert len(merged_codebook(active_grace_edits(demo, first.layer))) == 2
    session.undo()  # the override goes with the edit that made it
    with session.active():
        assert hit_rate(demo, [("The capital of France is", "Tokyo")]) == 1.0


def test_conflicting_neighbours_split_and_same_labels_expand(demo):
    """A close query with the same label expands the existing entry instead of adding one; a close
    query with another label splits the radius (the paper's Algorithm 1).

    The situation is constructed, not left to one model's hidden-state distances: ε_init is set from
    the measured distances between the three queries' keys, so "close" holds on any build of the model.
    """
    first_prompt, same_label, other_label = ("The capital of {} is", "{}'s capital is", "The capital city of {} is")
    prompts = [p.replace("{}", "France") for p in (first_prompt, same_label, other_label)]
    layer = GRACEHParams.for_model(demo).layer
    keys = module_inputs(demo, demo.arch.mlp_out_name(layer), prompts, last_only=True).double()
    to_first = (keys[1:] - keys[0]).norm(dim=-1)
    assert bool((to_first > 0).all()), "the three prompts must give three different keys"
    eps = float(to_first.max()) * 1.01  # both later queries lie within ε_init of the first key
    session = EditSession(demo)
    first = session.apply("GRACE", EditRequest(first_prompt, "France", "Tokyo", "Paris"), {"eps_init": eps})
    radius = float(first.radii[0])
    expand = session.apply("GRACE", EditRequest(same_label, "France", "Tokyo", "Paris"), {"eps_init": eps})
    split = session.apply("GRACE", EditRequest(other_label, "France", "Cairo", "Paris"), {"eps_init": eps})
    assert expand.info["actions"] == ["expand"] and expand.n_entries == 0
    assert split.info["actions"] == ["split"] and split.n_entries == 1
    with session.active():
        book = merged_codebook(active_grace_edits(demo, first.layer))
        assert len(book) == 2 and count_codebook_entries(session.edits) == 2
        # split: both radii become half the distance between the two keys, below ε_init
        half = float(to_first[1]) / 2
        assert float(book.radii[1]) == pytest.approx(half, rel=1e-3) and float(book.radii[1]) < radius
        assert float(book.radii[0]) == pytest.approx(half, rel=1e-3)
        assert hit_rate(demo, [(prompts[0], "Tokyo"), (prompts[2], "Cairo")]) == 1.0
    session.undo()  # without the split, the expanded entry covers the same-label query
    with session.active():
        book = merged_codebook(active_grace_edits(demo, first.layer))
        assert len(book) == 1 and float(book.radii[0]) >= float(to_first[0])
        assert hit_rate(demo, [(prompts[0], "Tokyo"), (prompts[1], "Tokyo")]) == 1.0
    assert float(first.radii[0]) == radius  # earlier edits are never mutated


def test_fifty_sequential_edits_keep_earlier_ones_and_neighbours(demo, tmp_path):
    """50 edits stacked one by one share one codebook; at the end the earlier edits still hold."""
    records, near, base = heldout_edits_and_neighbours(demo, 50, seed=1, near_from=20)
    session = EditSession(demo)
    for record in records:
        session.apply("GRACE", record.request)
    actions = [a for edit in session.edits for a in edit.info["actions"]]
    with session.active():
        reliability, generality, locality = edit_figures(demo, records, near, base)
        edited = logits(demo, records[0].request.text)
    print(f"GRACE after 50 sequential edits: reliability {reliability:.2f}, generality {generality:.2f}, "
          f"locality {locality:.3f}, codebook {count_codebook_entries(session.edits)} entries, "
          f"actions {({a: actions.count(a) for a in set(actions)})}")
    assert reliability >= 0.9 and locality >= 0.95
    assert count_codebook_entries(session.edits) == actions.count("add") + actions.count("split") \
        + actions.count("replace")
    session.save(tmp_path / "stack")
    reloaded = EditSession(demo)
    reloaded.load(tmp_path / "stack")
    with reloaded.active():
        assert torch.equal(logits(demo, records[0].request.text), edited)
    assert not handle_stack(demo)
