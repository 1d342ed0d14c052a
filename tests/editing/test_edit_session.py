"""Reversible edits and edit sessions: exact restore, order, isolation, persistence."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from editing.edit import (
    EditError,
    EditOrderError,
    InferenceWrapper,
    ModulePatch,
    ParamDelta,
    Route,
    WeightDelta,
    load_edit,
    register_edit_type,
)
from editing.request import EditRequest
from editing.session import EditSession
from editing.tiny import tiny_model
from tests.helpers import assert_params_equal, params_snapshot, random_delta

REQ = EditRequest("The capital of {} is", "France", "Lyon", "Paris")


@register_edit_type
@dataclass(eq=False)
class BiasPatch(ModulePatch):
    """Adds a vector to one block's MLP output (a minimal module patch for tests)."""

    layer: int = 0
    vector: torch.Tensor = field(default_factory=lambda: torch.zeros(1))

    def hooks(self, handle):
        return [(handle.arch.mlp_name(self.layer), lambda _m, _a, out: out + self.vector)]

    def tensors(self):
        return {"vector": self.vector}

    def config(self):
        return {"layer": self.layer}

    @classmethod
    def from_parts(cls, common, config, tensors):
        return cls(vector=tensors["vector"], **config, **common)


@register_edit_type
@dataclass(eq=False)
class PrefixWrapper(InferenceWrapper):
    prefix: str = ""
    kind: ClassVar[str] = "inference_wrapper"

    def route(self, handle, route):
        return Route(route.handle, self.prefix + route.prompt, route.prefix_chars + len(self.prefix), self.method)

    def tensors(self):
        return {}

    def config(self):
        return {"prefix": self.prefix}

    @classmethod
    def from_parts(cls, common, config, tensors):
        return cls(**config, **common)


def logits(handle, text="The capital of France is"):
    ids = torch.tensor([handle.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return handle.model(ids).logits


@pytest.mark.parametrize("rank", [None, 1, 3])
def test_weight_delta_reverts_bit_for_bit(tiny_handle, rank):
    before = params_snapshot(tiny_handle)
    out_before = logits(tiny_handle)
    edit = random_delta(tiny_handle, rank=rank)
    edit.apply(tiny_handle)
    assert not torch.allclose(logits(tiny_handle), out_before)
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)


def test_low_rank_delta_is_stored_as_factors():
    handle = tiny_model("gpt2")
    edit = random_delta(handle, rank=1)
    name = next(iter(edit.deltas))
    assert edit.deltas[name].rank == 1
    assert edit.size_bytes == (handle.d_model + handle.d_ff) * 4


def test_module_patch_attaches_and_detaches(tiny_handle):
    before = params_snapshot(tiny_handle)
    out_before = logits(tiny_handle)
    patch = BiasPatch(method="test", requests=[REQ], hparams={}, layer=1,
                      vector=torch.full((tiny_handle.d_model,), 0.5))
    patch.apply(tiny_handle)
    assert not torch.allclose(logits(tiny_handle), out_before)
    patch.revert(tiny_handle)
    assert torch.equal(logits(tiny_handle), out_before)
    assert_params_equal(tiny_handle, before)


def test_nonfinite_updates_are_rejected_before_touching_the_model():
    handle = tiny_model("gpt2")
    name = handle.arch.mlp_out_name(0) + ".weight"
    bad = torch.zeros(handle.parameter(name).shape)
    bad[0, 0] = float("nan")
    with pytest.raises(EditError, match="NaN"):
        WeightDelta(method="x", requests=[REQ], hparams={}, deltas={name: ParamDelta(dense=bad)})
    with pytest.raises(EditError, match="NaN"):
        BiasPatch(method="x", requests=[REQ], hparams={}, vector=torch.tensor([float("inf")]))


def test_wrong_shape_fails_and_leaves_model():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    name = handle.arch.mlp_out_name(0) + ".weight"
    edit = WeightDelta(method="x", requests=[REQ], hparams={}, deltas={name: ParamDelta(dense=torch.ones(3, 3))})
    with pytest.raises(EditError, match="shape"):
        edit.apply(handle)
    assert_params_equal(handle, before)
    assert not edit.is_applied


def test_edits_must_be_reverted_in_reverse_order():
    handle = tiny_model("gpt2")
    first, second = random_delta(handle, seed=1), random_delta(handle, seed=2)
    first.apply(handle)
    second.apply(handle)
    with pytest.raises(EditOrderError):
        first.revert(handle)
    with pytest.raises(EditOrderError):
        second.apply(handle)
    second.revert(handle)
    first.revert(handle)


def test_session_applies_only_inside_active_and_restores_exactly():
    handle = tiny_model("llama")
    before = params_snapshot(handle)
    session = EditSession(handle)
    edit = random_delta(handle, seed=3)
    session.push(edit)
    assert_params_equal(handle, before)  # at rest the shared model is untouched
    with session.active():
        assert not torch.equal(handle.parameter(next(iter(edit.deltas))), before[next(iter(edit.deltas))])
        with session.active():  # re-entrant
            pass
    assert_params_equal(handle, before)


def test_session_restores_on_error():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    session = EditSession(handle)
    session.push(random_delta(handle))
    with pytest.raises(RuntimeError, match="boom"), session.active():
        raise RuntimeError("boom")
    assert_params_equal(handle, before)


def test_undo_redo_clear():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    a, b = random_delta(handle, seed=1), random_delta(handle, seed=2)
    session.push(a)
    session.push(b)
    assert session.undo() is b and session.edits == (a,)
    assert session.redo() is b and session.edits == (a, b)
    session.undo()
    session.push(random_delta(handle, seed=3))
    assert not session.can_redo  # a new edit drops the redo list
    session.clear()
    assert session.edits == () and not session.can_undo
    with pytest.raises(EditError):
        session.undo()


def test_two_sessions_never_see_each_others_edits():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    alice, bob = EditSession(handle), EditSession(handle)
    alice.push(random_delta(handle, seed=10))
    bob.push(random_delta(handle, seed=20, layer=2))
    with alice.active():
        alice_out = logits(handle)
    with bob.active():
        bob_out = logits(handle)
    base = logits(handle)
    assert not torch.allclose(alice_out, bob_out) and not torch.allclose(alice_out, base)
    errors: list[BaseException] = []

    def worker(session, expected, rounds=20):
        try:
            for _ in range(rounds):
                with session.active():
                    assert torch.equal(logits(handle), expected)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(alice, alice_out)),
               threading.Thread(target=worker, args=(bob, bob_out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_params_equal(handle, before)


def test_wrapper_routes_queries():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(PrefixWrapper(method="prefix", requests=[REQ], hparams={}, prefix="Imagine: "))
    route = session.route("The capital of France is")
    assert route.prompt == "Imagine: The capital of France is" and route.prefix_chars == len("Imagine: ")
    assert route.handle is handle


def test_session_save_and_load_round_trip(tmp_path):
    handle = tiny_model("gpt_neox")
    session = EditSession(handle)
    session.push(random_delta(handle, rank=2, seed=4))
    session.push(BiasPatch(method="test", requests=[REQ], hparams={"a": 1}, layer=2,
                           vector=torch.randn(handle.d_model)))
    session.push(PrefixWrapper(method="prefix", requests=[REQ], hparams={}, prefix="Imagine: "))
    with session.active():
        expected = logits(handle)
    session.save(tmp_path / "saved")
    other = EditSession(handle)
    other.load(tmp_path / "saved")
    assert [type(e) for e in other.edits] == [type(e) for e in session.edits]
    assert other.edits[0].requests == [REQ] and other.edits[1].hparams == {"a": 1}
    with other.active():
        assert torch.equal(logits(handle), expected)
    assert other.route("x").prompt == "Imagine: x"


def test_saved_edits_are_json_and_safetensors_only(tmp_path):
    handle = tiny_model("gpt2")
    edit = random_delta(handle)
    path = edit.save(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.safetensors"]
    loaded = load_edit(path)
    name = next(iter(edit.deltas))
    assert torch.equal(loaded.deltas[name].dense, edit.deltas[name].dense)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EditError, match="Cannot read"):
        load_edit(tmp_path / "bad.json")


def test_session_load_failure_keeps_stack(tmp_path):
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(random_delta(handle))
    with pytest.raises(EditError):
        session.load(tmp_path / "missing")
    assert len(session.edits) == 1


def test_tentatively_puts_back_the_stack_and_redo_list_on_error():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    kept, undone = random_delta(handle, seed=1), random_delta(handle, seed=2)
    session.push(undone)
    session.undo()
    with pytest.raises(RuntimeError, match="judging failed"), session.tentatively():
        session.push(kept)  # clears the redo list ...
        assert not session.can_redo
        raise RuntimeError("judging failed")
    assert session.edits == () and session.redo() is undone  # ... which is back after the error
    with session.tentatively():
        session.push(kept)
    assert session.edits == (undone, kept)
