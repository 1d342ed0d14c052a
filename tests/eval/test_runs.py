"""Experiment runs in the three modes, persisted in the run store."""

from __future__ import annotations

import contextlib
import threading

import pandas as pd
import pytest

from editing.core.edit import handle_stack
from eval.datasets import load_dataset
from eval.runs import run_experiment
from eval.store import RunStore
from tests.eval.conftest import RankOneTestMethod

SUMMARY_COLUMNS = ["step", "n_edits", "reliability", "generality", "locality", "portability", "efficacy_score",
                   "paraphrase_score", "neighborhood_score", "efficacy_magnitude", "paraphrase_magnitude",
                   "neighborhood_magnitude", "score", "wall_time_s", "peak_memory_bytes"]


@pytest.fixture(scope="module")
def cases():
    return load_dataset("demo", limit=4)


def test_single_mode(demo, rank_one_method, cases, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    seen: list[float] = []
    result = run_experiment(demo, rank_one_method, cases, mode="single", n=2, store=store,
                            progress=lambda f, _m: seen.append(f))
    assert set(SUMMARY_COLUMNS) <= set(result.summary.columns)
    assert result.summary["step"].tolist() == [1, 2] and result.summary["n_edits"].tolist() == [1, 1]
    assert (result.summary["reliability"] == 1.0).all() and (result.summary["reliability_before"] < 1.0).all()
    assert (result.summary["efficacy_score"] == 1.0).all() and (result.summary["efficacy_score_before"] == 0.0).all()
    assert (result.summary["wall_time_s"] > 0).all()
    assert set(result.probes["case_id"]) == {cases[0].case_id, cases[1].case_id}
    assert len(result.probes) == len(cases[0].probes) + len(cases[1].probes)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert not handle_stack(demo)
    # persisted: a new store object on the same file gives the same run back
    loaded = RunStore(tmp_path / "runs.sqlite").load_run(result.run_id)
    assert loaded.status == "done" and loaded.config["mode"] == "single"
    pd.testing.assert_frame_equal(loaded.summary[SUMMARY_COLUMNS], result.summary[SUMMARY_COLUMNS],
                                  check_dtype=False)
    assert loaded.probes["probe_id"].tolist() == result.probes["probe_id"].tolist()
    # each step also reports locality over the neighbours the model knew, the unrelated facts left unchanged and
    # edit success, all from the step's own probes
    for step, probes in result.probes.groupby("step"):
        row = result.summary.set_index("step").loc[step]
        neighbours = probes[probes["kind"] == "locality"]
        known = neighbours[neighbours["acc_before"] >= 1.0]
        assert row["n_locality"] == len(neighbours) and row["n_locality_known"] == len(known)
        if len(known):
            assert row["locality_known"] == pytest.approx(known["agreement"].mean())
        unrelated = probes[probes["kind"] == "unrelated"]
        assert row["unrelated_unchanged"] == pytest.approx((unrelated["agreement"] >= 1.0).mean())
        assert row["edit_success"] == 1.0 and row["n_efficacy_without_reliability"] == 0


def test_batch_mode(demo, rank_one_method, cases):
    result = run_experiment(demo, rank_one_method, cases, mode="batch", n=4, batch_size=2)
    assert result.run_id is None  # no store given
    assert result.summary["n_edits"].tolist() == [2, 2]
    assert result.summary["case_ids"].tolist() == [f"{cases[0].case_id},{cases[1].case_id}",
                                                   f"{cases[2].case_id},{cases[3].case_id}"]
    first_step = result.probes[result.probes["step"] == 1]
    assert set(first_step["case_id"]) == {cases[0].case_id, cases[1].case_id}
    assert first_step["probe_id"].str.match(r"e[01]-").all()
    assert (result.summary["reliability"] > 0.5).all()


def test_sequential_mode(demo, rank_one_method, cases, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_experiment(demo, rank_one_method, cases, mode="sequential", n=3, store=store, first_k=1)
    summary = result.summary
    assert summary["n_edits"].tolist() == [1, 2, 3]
    for step in (1, 2, 3):  # every edit so far is judged again at each step
        judged = result.probes[result.probes["step"] == step]
        assert list(dict.fromkeys(judged["case_id"])) == [c.case_id for c in cases[:step]]
        assert set(judged["kind"]) <= {"reliability", "generality", "locality", "portability"}
    # the first edit is tracked as later ones arrive
    assert summary.loc[0, "first_reliability"] == summary.loc[0, "reliability"] == 1.0
    probes = result.probes
    first_rows = probes[(probes["case_id"] == cases[0].case_id) & (probes["kind"] == "reliability")]
    assert summary["first_reliability"].tolist() == first_rows.groupby("step")["acc_after"].mean().tolist()
    # and whether it is still answered (edit success), with the edits efficacy alone would pass
    answered = first_rows.groupby("step")["acc_after"].apply(lambda acc: float((acc >= 1.0).mean()))
    assert summary["first_edit_success"].tolist() == answered.tolist()
    assert {"first_n_efficacy_without_reliability", "first_locality_known"} <= set(summary.columns)
    assert (summary["total_edit_time_s"].diff().dropna() > 0).all()
    assert not handle_stack(demo)
    assert RunStore(tmp_path / "runs.sqlite").list_runs().loc[0, "n_steps"] == 3


def test_cancel_keeps_what_is_done(demo, rank_one_method, cases, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    cancel = threading.Event()

    def progress(fraction: float, message: str) -> None:
        if "judged" in message:  # the first step has finished
            cancel.set()

    result = run_experiment(demo, rank_one_method, cases, mode="sequential", n=3, store=store, cancel=cancel,
                            progress=progress)
    assert result.cancelled and len(result.summary) == 1
    loaded = store.load_run(result.run_id)
    assert loaded.cancelled and loaded.status == "cancelled" and len(loaded.summary) == 1


def test_a_failing_step_marks_the_run_and_keeps_earlier_steps(demo, rank_one_method, cases, tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    real = RankOneTestMethod._execute
    calls = []

    def flaky(self, handle, requests, hparams, progress):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the method broke")
        return real(self, handle, requests, hparams, progress)

    monkeypatch.setattr(RankOneTestMethod, "_execute", flaky)
    with pytest.raises(RuntimeError, match="the method broke"):
        run_experiment(demo, rank_one_method, cases, mode="sequential", n=3, store=store)
    assert not handle_stack(demo)
    runs = store.list_runs()
    assert runs.loc[0, "status"] == "failed" and "the method broke" in runs.loc[0, "error"]
    assert len(store.load_run(int(runs.loc[0, "run_id"])).summary) == 1


def test_bad_arguments(demo, rank_one_method, cases):
    with pytest.raises(ValueError, match="Unknown mode"):
        run_experiment(demo, rank_one_method, cases, mode="parallel")
    with pytest.raises(KeyError, match="Unknown editing method"):
        run_experiment(demo, "NoSuchMethod", cases)
    with pytest.raises(ValueError, match="No cases"):
        run_experiment(demo, rank_one_method, [])


@pytest.fixture(scope="module")
def twelve_cases():
    return load_dataset("demo", limit=12)


def test_sequential_steps_do_constant_tensor_work_and_match_the_plain_path(demo, rank_one_method, twelve_cases,
                                                                           monkeypatch):
    """Each step of a sequential run applies two weight deltas (the new edit, then again for the
    judging) whatever the number of edits so far; the cached stack answers as the plain path does."""
    from editing.core.edit import WeightDelta
    from editing.core.session import EditSession

    applies: list[int] = [0]
    per_step: list[int] = []
    real = WeightDelta._apply

    def counting(self, handle):
        applies[0] += 1
        return real(self, handle)

    def progress(_fraction: float, message: str) -> None:
        if "judged" in message:  # a step has finished
            per_step.append(applies[0] - sum(per_step))

    monkeypatch.setattr(WeightDelta, "_apply", counting)
    cached = run_experiment(demo, rank_one_method, twelve_cases, mode="sequential", progress=progress)
    assert per_step == [2] * 12
    # the plain path (no cache): the same answers, bit for bit, at 2n applies per step
    per_step.clear()
    applies[0] = 0
    monkeypatch.setattr(EditSession, "stack_cache", lambda self: contextlib.nullcontext(self))
    plain = run_experiment(demo, rank_one_method, twelve_cases, mode="sequential", progress=progress)
    assert per_step == [2 * n for n in range(1, 13)]
    columns = ["step", "probe_id", "pred_after", "prob_after", "acc_after"]
    pd.testing.assert_frame_equal(cached.probes[columns], plain.probes[columns])


def test_a_run_cancelled_or_interrupted_mid_way_leaves_the_model_bit_identical(demo, rank_one_method, twelve_cases,
                                                                              tmp_path):
    from tests.helpers import assert_params_equal, params_snapshot

    before = params_snapshot(demo)
    store = RunStore(tmp_path / "runs.sqlite")
    cancel = threading.Event()

    def cancel_after_six(_fraction: float, message: str) -> None:
        if message.startswith("edit 6/12: judged"):
            cancel.set()

    result = run_experiment(demo, rank_one_method, twelve_cases, mode="sequential", store=store, cancel=cancel,
                            progress=cancel_after_six)
    assert result.cancelled and len(result.summary) == 6
    assert_params_equal(demo, before) and not handle_stack(demo)

    def interrupt_inside_step_nine(_fraction: float, message: str) -> None:
        if message.startswith("edit 9/12") and "closed-form" in message:  # inside the method, stack applied
            assert len(handle_stack(demo)) == 8  # the edits so far, from the cache
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(demo, rank_one_method, twelve_cases, mode="sequential", store=store,
                       progress=interrupt_inside_step_nine)
    assert_params_equal(demo, before) and not handle_stack(demo)
    runs = store.list_runs().set_index("run_id")
    assert sorted(runs["status"]) == ["cancelled", "interrupted"]
