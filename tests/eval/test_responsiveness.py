"""eval.responsiveness times (b) only once the background run edits: its step counter (no timings asserted)."""

from __future__ import annotations

import pytest

from eval.datasets import load_dataset
from eval.responsiveness import StepCounter
from eval.runs import run_experiment


def test_the_step_counter_counts_edit_steps_and_none_while_the_run_predicts(demo, rank_one_method):
    counter = StepCounter()
    seen: list[tuple[str, int, bool]] = []  # (message, steps counted, first step flagged) at each progress report
    run_experiment(demo, rank_one_method, load_dataset("demo", limit=2), mode="sequential", store=counter,
                   progress=lambda _f, message: seen.append((message, counter.steps, counter.first_step.is_set())))
    predicting = [entry for entry in seen if entry[0] == "predicting before any edit"]
    assert predicting == [("predicting before any edit", 0, False)], seen
    judged = [(steps, flagged) for message, steps, flagged in seen if "judged" in message]
    assert judged == [(1, True), (2, True)], seen  # one count per finished step, whatever else is reported
    assert counter.steps == 2
    counter.wait_for_first_step(timeout=0)  # already there: returns at once


def test_waiting_for_a_first_step_that_cannot_come_raises_with_the_runs_error():
    def broken() -> None:
        raise ValueError("the method broke before its first step")

    counter = StepCounter()
    counter.run(broken)  # as the runner thread would; the error is kept, not raised
    assert counter.ended.is_set() and counter.steps == 0
    with pytest.raises(RuntimeError, match="ended before finishing an edit step") as caught:
        counter.wait_for_first_step(timeout=600)
    assert isinstance(caught.value.__cause__, ValueError)
