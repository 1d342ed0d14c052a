"""The model lock lets interactive work in before background steps; background threads run niced."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from editing.core.concurrency import PriorityLock, background_priority, configure_threads, is_background


def _wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def test_the_lock_is_reentrant_and_owned():
    lock = PriorityLock()
    with lock, lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


def test_a_waiting_interactive_thread_goes_before_the_background_run_takes_the_lock_back():
    lock = PriorityLock()
    order: list[str] = []
    holding, step_done = threading.Event(), threading.Event()

    def background_run() -> None:
        with background_priority():
            lock.acquire()
            holding.set()
            _wait_until(lambda: lock._interactive_waiting == 1)
            lock.release()  # end of one step ...
            order.append("background tries again")
            assert not lock.acquire(blocking=False)  # ... and the next step must not jump the queue
            with lock:  # blocks until the interactive edit is done
                order.append("background step 2")
            step_done.set()

    def interactive_edit() -> None:
        with lock:
            order.append("interactive edit")
            time.sleep(0.05)

    runner = threading.Thread(target=background_run)
    runner.start()
    assert holding.wait(10)
    person = threading.Thread(target=interactive_edit)
    person.start()
    person.join(10)
    assert step_done.wait(10)
    runner.join(10)
    assert order == ["background tries again", "interactive edit", "background step 2"]


def test_a_claimed_interactive_flow_keeps_background_steps_out_of_its_gaps():
    """Predictions, edit, predictions: three holds of the lock, and no background step between them."""
    lock = PriorityLock()
    order: list[str] = []
    claimed, flow_done = threading.Event(), threading.Event()

    def background_run() -> None:
        with background_priority():
            assert claimed.wait(10)
            while not flow_done.is_set():
                if lock.acquire(blocking=False):
                    order.append("background step")
                    lock.release()
                time.sleep(0.001)
            with lock:
                order.append("background step after the flow")
            with lock.claim():  # a claim in a background thread changes nothing
                assert lock.acquire(blocking=False)
                lock.release()

    runner = threading.Thread(target=background_run)
    runner.start()
    with lock.claim():
        claimed.set()
        for part in ("before", "edit", "after"):
            with lock:
                order.append(part)
            time.sleep(0.02)  # the gap in which an unclaimed flow lost the lock
    flow_done.set()
    runner.join(10)
    assert order[:3] == ["before", "edit", "after"]
    assert "background step" not in order[:3] and order[-1] == "background step after the flow"
    assert lock._claims == 0


def test_interactive_threads_do_not_wait_for_each_other_beyond_the_lock():
    lock = PriorityLock()
    assert lock.acquire(blocking=False)
    result = []
    thread = threading.Thread(target=lambda: result.append(lock.acquire(timeout=0.05)))
    thread.start()
    thread.join(10)
    assert result == [False] and lock._interactive_waiting == 0
    lock.release()


def test_background_work_runs_at_a_lower_os_priority():
    native = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, native)
    seen = []

    def work() -> None:
        me = threading.get_native_id()
        start = os.getpriority(os.PRIO_PROCESS, me)
        with background_priority():
            seen.append((is_background(), os.getpriority(os.PRIO_PROCESS, me) - start))
        seen.append((is_background(), None))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert seen[0][0] is True and seen[0][1] > 0
    assert seen[1][0] is False
    assert os.getpriority(os.PRIO_PROCESS, native) == before  # the calling thread is untouched


def test_thread_count_is_shared_out_or_taken_from_the_environment(monkeypatch):
    previous = torch.get_num_threads()
    try:
        monkeypatch.setenv("EDITSCOPE_THREADS", "3")
        assert configure_threads() == 3 == torch.get_num_threads()
        monkeypatch.delenv("EDITSCOPE_THREADS")
        cores = len(os.sched_getaffinity(0))
        assert configure_threads(concurrent_jobs=2) == max(1, cores // 2)
        assert configure_threads(concurrent_jobs=10 * cores) == 1
    finally:
        torch.set_num_threads(previous)
