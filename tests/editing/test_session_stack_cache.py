"""EditSession.stack_cache: constant re-application cost per step, with every guarantee of the plain path.

The plain path applies and reverts the whole stack at each ``active()``; the cached path must give
the very same weights inside the block (bit for bit), leave the shared model bit for bit original
after every block (also on error, and when the run stops half-way), and do an amount of tensor work
per step that does not grow with the number of edits (counted, not timed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import editing.core.session as session_module
from editing.core.edit import (
    EditError,
    InferenceWrapper,
    ModulePatch,
    ParamDelta,
    Route,
    WeightDelta,
    float_masters,
    handle_stack,
)
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods.base import EditMethod, HParams
from editing.models.tiny import tiny_model
from tests.helpers import assert_params_equal, params_snapshot, random_delta

REQ = EditRequest("The capital of {} is", "France", "Rome", "Paris")


@dataclass
class DriftHParams(HParams):
    layer: int = 1
    scale: float = 1e-3

    @classmethod
    def for_model(cls, handle) -> DriftHParams:
        return cls()


class DriftMethod(EditMethod):
    """A rank-one update computed from the weights as they are now: a stack reproduced inexactly
    (or in another order) gives different later edits, so equality below is a strong check."""

    name = "TestDrift"
    hparams_class = DriftHParams
    edit_kind = "weight_delta"
    summary = "test-only update that depends on the current weights"

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def _execute(self, handle, requests, hparams, progress):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("the method broke")
        name = handle.arch.mlp_out_name(hparams.layer) + ".weight"
        weight = handle.parameter(name).detach().float()
        left = hparams.scale * weight[:, :1].clone()
        right = torch.sin(7 * weight[:1, :] + len(handle_stack(handle)))
        return WeightDelta(method=self.name, requests=list(requests), hparams=hparams.to_dict(),
                           deltas={name: ParamDelta.low_rank(left, right)})


@dataclass(eq=False)
class ShiftPatch(ModulePatch):
    """Adds a constant to one block's MLP output (a minimal module patch)."""

    layer: int = 0
    shift: float = 0.01

    def hooks(self, handle):
        return [(handle.arch.mlp_name(self.layer), lambda _m, _a, out: out + self.shift)]

    def tensors(self):
        return {}

    @classmethod
    def from_parts(cls, common, config, tensors):  # pragma: no cover - not saved here
        return cls(**config, **common)


@dataclass(eq=False)
class PrefixWrapper(InferenceWrapper):
    prefix: str = ""
    kind: ClassVar[str] = "inference_wrapper"
    asked: list[str] = field(default_factory=list)

    def route(self, handle, route):
        self.asked.append(route.prompt)
        return Route(route.handle, self.prefix + route.prompt, route.prefix_chars + len(self.prefix), self.method)

    def tensors(self):
        return {}

    @classmethod
    def from_parts(cls, common, config, tensors):  # pragma: no cover - not saved here
        return cls(**config, **common)


def run_steps(session: EditSession, method: DriftMethod, steps: int, layers=(1, 2)) -> list[dict[str, torch.Tensor]]:
    """A sequential run in miniature: each step edits, then enters ``active()`` again to "judge";
    returns every parameter as seen while judging each step."""
    seen = []
    for step in range(steps):
        session.apply(method, REQ, {"layer": layers[step % len(layers)]})
        with session.active():
            seen.append(params_snapshot(session.handle))
    return seen


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_cached_run_sees_the_plain_runs_weights_and_leaves_the_model_original(family):
    handle = tiny_model(family)
    before = params_snapshot(handle)
    plain = run_steps(EditSession(handle), DriftMethod(), 30)
    assert_params_equal(handle, before)
    session = EditSession(handle)
    with session.stack_cache():
        cached = run_steps(session, DriftMethod(), 30)
        assert_params_equal(handle, before)  # at rest between steps, too
        assert session._cache is not None and len(session._cache.edits) == 30
    assert session._cache is None  # the block's end frees the cached weights
    assert_params_equal(handle, before)
    assert not handle_stack(handle) and float_masters(handle) == {}
    for step, (a, b) in enumerate(zip(plain, cached, strict=True)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step + 1}: {name} differs from the plain path"
    assert not torch.equal(cached[-1][handle.arch.mlp_out_name(1) + ".weight"],
                           before[handle.arch.mlp_out_name(1) + ".weight"])


def counting(monkeypatch) -> Counter:
    """Counts each WeightDelta apply (one materialised delta added per parameter) and each
    parameter write of the cache."""
    counts: Counter = Counter()
    real_apply, real_write = WeightDelta._apply, session_module._write

    def apply(self, handle):
        counts["apply"] += 1
        return real_apply(self, handle)

    def write(param, value):
        counts["write"] += 1
        return real_write(param, value)

    monkeypatch.setattr(WeightDelta, "_apply", apply)
    monkeypatch.setattr(session_module, "_write", write)
    return counts


def per_step_counts(session: EditSession, counts: Counter, steps: int) -> list[tuple[int, int]]:
    method, out = DriftMethod(), []
    for step in range(steps):
        start = counts.copy()
        session.apply(method, REQ, {"layer": 1 + step % 2})
        with session.active():
            pass
        out.append((counts["apply"] - start["apply"], counts["write"] - start["write"]))
    return out


def test_the_tensor_work_of_a_step_does_not_grow_with_the_number_of_edits(monkeypatch):
    handle = tiny_model("gpt2")
    counts = counting(monkeypatch)
    session = EditSession(handle)
    with session.stack_cache():
        cached = per_step_counts(session, counts, 30)
    # from the third step on (both edited layers are cached): the method's own apply of the new edit,
    # its re-apply when the judge enters, and a write in and out per cached parameter (2 layers)
    assert set(cached[2:]) == {(2, 8)}, cached
    # the plain path, for contrast: applies grow with the stack (2n per step)
    plain = per_step_counts(EditSession(handle), counts, 6)
    assert [a for a, _ in plain] == [2 * n for n in range(1, 7)] and all(w == 0 for _, w in plain)


def test_module_patches_and_wrappers_keep_their_order_and_routes_ask_only_wrappers():
    handle = tiny_model("llama")
    before = params_snapshot(handle)
    wrapper = PrefixWrapper(method="test", requests=[REQ], hparams={}, prefix="Q: ")

    def build(session: EditSession) -> None:
        session.push(random_delta(handle, layer=1, rank=2, seed=1))
        session.push(ShiftPatch(method="test", requests=[REQ], hparams={}, layer=0))
        session.push(wrapper)
        session.push(random_delta(handle, layer=2, seed=2))

    plain = EditSession(handle)
    build(plain)
    with plain.active():
        expected = params_snapshot(handle), [type(e) for e in handle_stack(handle)]
        ids = torch.tensor([handle.tokenizer("The capital of France is")["input_ids"]])
        expected_out = handle.model(ids).logits.detach()
    session = EditSession(handle)
    build(session)
    with session.stack_cache():
        for _ in range(3):  # the first entry builds the cache, the others use it
            with session.active():
                assert [type(e) for e in handle_stack(handle)] == expected[1]  # methods read this order
                assert all(torch.equal(p, expected[0][n]) for n, p in handle.model.named_parameters())
                assert torch.equal(handle.model(ids).logits.detach(), expected_out)  # the hook is on
            assert_params_equal(handle, before)
        wrapper.asked.clear()
        assert [r.prompt for r in session.routes(["a", "b"])] == ["Q: a", "Q: b"]
        assert wrapper.asked == ["a", "b"]
    assert not handle.module(handle.arch.mlp_name(0))._forward_hooks


def test_an_error_inside_a_step_or_in_the_method_restores_the_model_and_the_run_goes_on():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    plain = run_steps(EditSession(handle), DriftMethod(), 12)
    session, method = EditSession(handle), DriftMethod(fail_at=6)
    seen = []
    with session.stack_cache():
        for step in range(12):
            if step == 5:  # the method fails half-way through the run
                with pytest.raises(RuntimeError, match="the method broke"):
                    session.apply(method, REQ, {"layer": 1 + step % 2})
                assert_params_equal(handle, before)
                assert len(session.edits) == 5 and not handle_stack(handle)
            session.apply(method, REQ, {"layer": 1 + step % 2})
            with pytest.raises(RuntimeError, match="judging broke"), session.active():
                raise RuntimeError("judging broke")  # fails with the cached stack written
            assert_params_equal(handle, before)
            with session.active():
                seen.append(params_snapshot(handle))
    assert_params_equal(handle, before)
    assert float_masters(handle) == {} and not handle_stack(handle)
    for a, b in zip(plain, seen, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_an_edit_failing_to_apply_on_top_of_the_cached_stack_leaves_the_model_original():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    session = EditSession(handle)
    with session.stack_cache():
        run_steps(session, DriftMethod(), 5)
        name = handle.arch.mlp_out_name(1) + ".weight"
        wrong = WeightDelta(method="test", requests=[REQ], hparams={},
                            deltas={name: ParamDelta(dense=torch.zeros(3, 3))})
        session.push(wrong)
        with pytest.raises(EditError, match="shape"), session.active():
            pass  # pragma: no cover - entering fails
        assert_params_equal(handle, before)
        assert not handle_stack(handle) and float_masters(handle) == {}
        session.undo()
        with session.active():  # the cache still serves the stack that remains
            assert not torch.equal(handle.parameter(name), before[name])
    assert_params_equal(handle, before)


def test_a_run_stopped_by_an_interrupt_mid_step_leaves_the_model_original():
    handle = tiny_model("llama")
    before = params_snapshot(handle)
    session = EditSession(handle)
    with pytest.raises(KeyboardInterrupt), session.stack_cache():
        for step in range(20):
            session.apply(DriftMethod(), REQ, {"layer": 1 + step % 2})
            with session.active():
                if step == 13:
                    raise KeyboardInterrupt  # what a cancelled thread or Ctrl-C raises inside a step
    assert_params_equal(handle, before)
    assert not handle_stack(handle) and float_masters(handle) == {} and session._cache is None


def test_other_sessions_between_steps_see_only_their_own_edits_and_undo_push_rebuild_the_cache():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    other = EditSession(handle)
    other.push(random_delta(handle, layer=1, seed=9))
    with other.active():
        other_weights = params_snapshot(handle)
    run, reference = EditSession(handle), EditSession(handle)
    method = DriftMethod()
    with run.stack_cache():
        for step in range(8):
            edit = run.apply(method, REQ, {"layer": 1 + step % 2})
            reference.push(edit)
            with other.active():  # an interactive edit between two steps of the run
                assert all(torch.equal(p, other_weights[n]) for n, p in handle.model.named_parameters())
            with run.active():
                got = params_snapshot(handle)
            with reference.active():  # the plain path with the same edits
                assert all(torch.equal(p, got[n]) for n, p in handle.model.named_parameters())
        for change in (run.undo, run.redo, lambda: run.push(random_delta(handle, layer=3, seed=4))):
            change()
            plain = EditSession(handle)
            for edit in run.edits:
                plain.push(edit)
            with plain.active():
                expected = params_snapshot(handle)
            with run.active():
                assert all(torch.equal(p, expected[n]) for n, p in handle.model.named_parameters())
    assert_params_equal(handle, before)


def test_a_base_weight_changed_behind_the_cache_is_noticed():
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    name = handle.arch.mlp_out_name(1) + ".weight"
    with session.stack_cache():
        run_steps(session, DriftMethod(), 3, layers=(1,))
        with torch.no_grad():
            handle.parameter(name).mul_(0.5)  # not through an edit (a bug elsewhere)
        changed = params_snapshot(handle)
        plain = EditSession(handle)
        for edit in session.edits:
            plain.push(edit)
        with plain.active():
            expected = handle.parameter(name).detach().clone()
        with session.active():  # rebuilt on the weights as they are, never a stale stack
            assert torch.equal(handle.parameter(name), expected)
        assert_params_equal(handle, changed)


@pytest.mark.filterwarnings("ignore:.*below torch.bfloat16 resolution")
def test_half_precision_weights_keep_their_float32_masters_through_the_cache():
    handle = tiny_model("llama")
    handle.model.to(torch.bfloat16)
    before = params_snapshot(handle)
    name = handle.arch.mlp_out_name(1) + ".weight"
    # deltas mostly below bfloat16's resolution: only the float32 master adds them up
    edits = [random_delta(handle, layer=1, rank=1, scale=1e-4, seed=s) for s in range(12)]
    plain, session = EditSession(handle), EditSession(handle)
    with session.stack_cache():
        for edit in edits:
            plain.push(edit)
            with plain.active():
                expected = handle.parameter(name).detach().clone(), float_masters(handle)[name].clone()
            session.push(edit)
            for _ in range(2):
                with session.active():
                    assert torch.equal(handle.parameter(name), expected[0])
                    assert torch.equal(float_masters(handle)[name], expected[1])
                assert_params_equal(handle, before)
                assert float_masters(handle) == {}
    assert not torch.equal(expected[1], before[name].float())  # the small deltas did add up
