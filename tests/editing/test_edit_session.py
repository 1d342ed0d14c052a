"""Reversible edits and edit sessions: exact restore, order, isolation, persistence."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from editing.core.edit import (
    EditError,
    EditOrderError,
    InferenceWrapper,
    ModulePatch,
    ParamDelta,
    Route,
    WeightDelta,
    float_masters,
    load_edit,
    register_edit_type,
)
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.models.tiny import tiny_model
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


# -- precision and devices ------------------------------------------------------------------------
#: the spacing of bfloat16 values in [1, 2): 8 significant bits
BF16_STEP = 2.0**-7


def bf16_handle(family: str = "llama"):
    handle = tiny_model(family)
    handle.model.to(torch.bfloat16)
    return handle


def weight_in_one_to_two(handle, layer: int = 1) -> tuple[str, torch.nn.Parameter]:
    """One MLP output weight set to bfloat16 values in [1, 1.9], where the resolution is BF16_STEP
    (and stays so after adding a few steps)."""
    name = handle.arch.mlp_out_name(layer) + ".weight"
    param = handle.parameter(name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        param.copy_(1 + 0.9 * torch.rand(param.shape, generator=gen))
    return name, param


def constant_delta(name: str, shape, value: float) -> WeightDelta:
    return WeightDelta(method="test", requests=[REQ], hparams={},
                       deltas={name: ParamDelta(dense=torch.full(shape, value))})


def test_bf16_deltas_below_resolution_add_up_over_a_stack_and_revert_exactly():
    handle = bf16_handle()
    name, param = weight_in_one_to_two(handle)
    before = params_snapshot(handle)
    original = param.detach().clone()
    small = 0.4 * BF16_STEP  # rounds away on its own: below half a step
    edits = [constant_delta(name, param.shape, small) for _ in range(3)]
    with pytest.warns(UserWarning, match="below torch.bfloat16 resolution"):
        edits[0].apply(handle)
    assert torch.equal(param, original)  # one edit alone cannot show in bfloat16 ...
    edits[1].apply(handle)
    # ... but the float32 master sums both: 0.8 of a step rounds up by one step everywhere
    assert torch.equal(param.float() - original.float(), torch.full(param.shape, BF16_STEP))
    assert torch.equal(param, ((original.float() + small) + small).to(torch.bfloat16))  # rounded once
    with pytest.warns(UserWarning, match="below"):  # 1.2 steps round to the same one step
        edits[2].apply(handle)
    after_three = param.detach().clone()
    assert torch.equal(after_three, (((original.float() + small) + small) + small).to(torch.bfloat16))
    assert float_masters(handle)[name].dtype == torch.float32
    for edit in reversed(edits):
        edit.revert(handle)
    assert_params_equal(handle, before)
    assert float_masters(handle) == {}
    with pytest.warns(UserWarning, match="below"):
        for edit in edits:  # apply / revert / apply: the very same weights again
            edit.apply(handle)
    assert torch.equal(param, after_three)
    for edit in reversed(edits):
        edit.revert(handle)
    assert_params_equal(handle, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_stacks_of_edits_revert_bit_for_bit_and_reapply_identically(family):
    handle = bf16_handle(family)
    before = params_snapshot(handle)
    edits = [random_delta(handle, layer=1, rank=2, scale=1e-3, seed=1),
             random_delta(handle, layer=1, scale=1e-4, seed=2),
             random_delta(handle, layer=2, rank=1, scale=0.05, seed=3),
             random_delta(handle, layer=1, rank=3, seed=4)]
    name = next(iter(edits[0].deltas))
    session = EditSession(handle)
    for edit in edits:
        session.push(edit)
    with session.active():
        first = params_snapshot(handle)
        # the weight is the float32 sum of the original and every delta, rounded once
        expected = before[name].float()
        for edit in edits:
            if name in edit.deltas:
                expected = expected + edit.deltas[name].materialise("cpu")
        assert torch.equal(handle.parameter(name), expected.to(torch.bfloat16))
        assert torch.equal(float_masters(handle)[name], expected)
    assert_params_equal(handle, before)
    assert float_masters(handle) == {}
    with session.active():
        assert all(torch.equal(p, first[n]) for n, p in handle.model.named_parameters())
    assert_params_equal(handle, before)


def test_bf16_weight_written_outside_the_edits_restarts_its_master():
    handle = bf16_handle()
    name, param = weight_in_one_to_two(handle)
    original = param.detach().clone()
    first, second = constant_delta(name, param.shape, 3 * BF16_STEP), constant_delta(name, param.shape, BF16_STEP)
    first.apply(handle)
    with torch.no_grad():
        param.mul_(-1)  # not through an edit: the master no longer describes the weight
    written = param.detach().clone()
    second.apply(handle)
    assert torch.equal(param, (written.float() + BF16_STEP).to(torch.bfloat16))
    second.revert(handle)
    assert torch.equal(param, written)
    first.revert(handle)
    assert torch.equal(param, original) and float_masters(handle) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_weights_add_deltas_in_their_own_precision(dtype):
    handle = tiny_model("llama")
    handle.model.to(dtype)
    edit = random_delta(handle, rank=2, scale=1e-3)
    name, delta = next(iter(edit.deltas.items()))
    weight = handle.parameter(name).detach().clone()
    edit.apply(handle)
    assert torch.equal(handle.parameter(name), (weight + delta.materialise().to(dtype)).to(dtype))
    assert float_masters(handle) == {}  # no master copies: the weight holds the sum itself
    edit.revert(handle)
    assert torch.equal(handle.parameter(name), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_is_applied_on_its_parameters_device(dtype):
    """A delta stored on the CPU is moved to the weight's device (simulated with the ``meta``
    device: mixing it with CPU tensors fails, as CPU with CUDA does)."""
    handle = tiny_model("llama")
    handle.model.to(dtype)
    edit = random_delta(handle, layer=1, rank=2)
    dense = random_delta(handle, layer=2, seed=5)
    name = next(iter(edit.deltas))
    handle.module(name.rsplit(".", 1)[0]).to("meta")  # that layer "lives on another device"
    before = params_snapshot(handle)  # meta tensors compare by identity only: check the others
    edit.apply(handle)
    dense.apply(handle)
    assert handle.parameter(name).is_meta and handle.parameter(name).dtype == dtype
    dense.revert(handle)
    edit.revert(handle)
    assert float_masters(handle) == {}
    for other, param in handle.model.named_parameters():
        if not param.is_meta:
            assert torch.equal(param, before[other]), other


def test_materialise_on_a_device_is_float32_there():
    low_rank = ParamDelta.low_rank(torch.ones(4, 2, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16))
    dense = ParamDelta(dense=torch.ones(4, 3, dtype=torch.float64))
    for delta in (low_rank, dense):
        on_meta = delta.materialise("meta")
        assert on_meta.is_meta and on_meta.dtype == torch.float32 and on_meta.shape == (4, 3)
        assert torch.equal(delta.materialise("cpu"), torch.full((4, 3), 2.0 if delta is low_rank else 1.0))
