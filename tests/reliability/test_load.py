"""Load: eight sessions on threads share the demo model, applying, undoing and redoing different
edits for a bounded time. No session may ever see another's edit, nothing may raise, and the
base weights must be bit-identical afterwards."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from editing.core.edit import handle_stack
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.train import edit_records
from tests.helpers import assert_params_equal, params_snapshot
from tests.reliability.common import few_steps, first_ready, last_logprobs

N_SESSIONS = 8
DURATION_S = 10.0  # after every session has computed its first edit
MIN_CYCLES = 2  # every session recomputes its edit at least once while the others run
JOIN_TIMEOUT_S = 600.0


def distinct_requests(n: int) -> list[EditRequest]:
    """``n`` counterfactual requests about ``n`` different subjects."""
    chosen: dict[str, EditRequest] = {}
    for record in edit_records("heldout", seed=0):
        chosen.setdefault(record.request.subject, record.request)
        if len(chosen) == n:
            break
    return list(chosen.values())


@dataclass
class Worker:
    """One user: a session that keeps applying, checking, undoing and redoing its own edit."""

    index: int
    method: str
    hparams: dict
    request: EditRequest
    session: EditSession
    prompts: list[str]
    base: torch.Tensor
    reference: torch.Tensor | None = None  # what this session's edit gives, seen alone
    cycles: int = 0
    recomputed: int = 0
    errors: list[BaseException] = field(default_factory=list)

    def observe(self) -> torch.Tensor:
        with self.session.active():
            return last_logprobs(self.session.handle, self.prompts)

    def check(self, expected: torch.Tensor, state: str) -> None:
        seen = self.observe()
        if not torch.equal(seen, expected):
            worst = (seen - expected).abs().max().item()
            raise AssertionError(f"session {self.index} ({self.method}, {state}) saw other weights: "
                                 f"max |Δ log p| = {worst:.3g}")

    def run(self, start: threading.Barrier, deadline: list[float]) -> None:
        try:
            start.wait()
            self.session.apply(self.method, self.request, self.hparams)  # all compute at once
            self.reference = self.observe()
            while self.cycles < MIN_CYCLES or time.monotonic() < deadline[0]:
                self.check(self.reference, "edited")
                self.session.undo()
                self.check(self.base, "undone")
                self.session.redo()
                self.check(self.reference, "redone")
                if self.cycles % 2 == 1:  # recompute the edit while the other sessions work
                    self.session.clear()
                    self.session.apply(self.method, self.request, self.hparams)
                    seen = self.observe()
                    own = self.prompts.index(self.request.text)
                    assert torch.allclose(seen, self.reference, atol=1e-4), \
                        f"session {self.index}: recomputing its edit gave other predictions"
                    assert seen[own].argmax() == self.reference[own].argmax()
                    self.reference = seen
                    self.recomputed += 1
                self.cycles += 1
        except BaseException as err:  # collected and reported by the test
            self.errors.append(err)


def test_eight_sessions_share_the_demo_model_without_seeing_each_other(demo):
    weight_method = first_ready(demo, ("ROME", "FT-L"), kind="weight_delta")
    if weight_method is None:
        pytest.skip("no weight-editing method is registered and ready on the demo model")
    patch_method = first_ready(demo, ("GRACE", "T-Patcher", "CaliNET"), kind="module_patch")
    methods = [weight_method if i % 2 == 0 or patch_method is None else patch_method for i in range(N_SESSIONS)]
    requests = distinct_requests(N_SESSIONS)
    prompts = [r.text for r in requests] + ["The capital of France is", "Eiffel Tower is located in the country of"]
    before = params_snapshot(demo)
    base = last_logprobs(demo, prompts)
    workers = [Worker(i, m, few_steps(demo, m), r, EditSession(demo), prompts, base)
               for i, (m, r) in enumerate(zip(methods, requests, strict=True))]
    start = threading.Barrier(N_SESSIONS + 1)
    deadline = [float("inf")]
    threads = [threading.Thread(target=w.run, args=(start, deadline), name=f"session-{w.index}", daemon=True)
               for w in workers]
    for thread in threads:
        thread.start()
    start.wait()
    deadline[0] = time.monotonic() + DURATION_S
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a session hung (deadlock?)"
    errors = [(w.index, w.method, e) for w in workers for e in w.errors]
    assert not errors, "\n".join(f"session {i} ({m}): {type(e).__name__}: {e}" for i, m, e in errors)
    for worker in workers:
        assert worker.cycles >= MIN_CYCLES and worker.recomputed >= 1, f"session {worker.index} barely ran"
        own = prompts.index(worker.request.text)
        # Each session's edit changed what its own prompt predicts, and only that session saw it.
        assert not torch.equal(worker.reference[own], base[own]), f"session {worker.index}'s edit changed nothing"
        others = [w.reference for w in workers if w is not worker and w.method == worker.method]
        assert all(not torch.equal(worker.reference, other) for other in others)
    assert not handle_stack(demo)
    assert_params_equal(demo, before)
    assert torch.equal(last_logprobs(demo, prompts), base)
