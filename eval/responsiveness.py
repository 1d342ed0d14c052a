"""How long a person's edit waits when the server is busy: the latency ratios of the benchmark.

Measured in one process, as the dashboard runs (one shared model handle, the server's thread
policy from :func:`editing.core.concurrency.configure_threads`), the median latency of single
interactive edits

* (a) on an otherwise idle process,
* (b) while a second session's sequential experiment runs in a background thread
  (:func:`editing.core.concurrency.background_priority`, as the dashboard's background jobs do) and is
  editing: timing starts once that run has finished its first edit step, not during the
  predictions it makes before any edit (a far lighter load), and
* (c) while two outside CPU-bound processes compete for the cores,

and the ratios (b)/(a) and (c)/(a), whose goals are ≤ 2 and ≤ 3. ``python -m eval.responsiveness``
prints them (a benchmark of its own beside :mod:`eval.bench`: it starts CPU-bound processes to
compete with).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from editing.core.concurrency import background_priority, configure_threads
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.models.loader import ModelHandle

#: goals of the issue "stays responsive": (b)/(a) and (c)/(a)
GOAL_BACKGROUND_RATIO = 2.0
GOAL_OUTSIDE_LOAD_RATIO = 3.0
#: how long (b) waits for the background run's first edit step (its predictions come before it)
BACKGROUND_START_TIMEOUT_S = 600.0


@dataclass
class Responsiveness:
    """Median single-edit latencies (seconds) in the three situations, and their ratios."""

    method: str
    threads: int
    idle_s: float
    with_background_run_s: float
    with_outside_load_s: float
    background_steps_during: int  # edit steps the background run finished while (b) was measured

    @property
    def background_ratio(self) -> float:
        return self.with_background_run_s / self.idle_s

    @property
    def outside_load_ratio(self) -> float:
        return self.with_outside_load_s / self.idle_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "background_ratio": self.background_ratio,
                "outside_load_ratio": self.outside_load_ratio}


class StepCounter:
    """Stands in for the run store of a background run (``run_experiment(store=...)``): counts the
    steps it finishes. A step is stored only once it was edited and judged, so the count is exact,
    unlike the progress messages, which also come before any edit and inside each step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps = 0
        self.first_step = threading.Event()  # set once the run has finished an edit step
        self.ended = threading.Event()  # set when the run is over, whatever the reason
        self.error: BaseException | None = None

    @property
    def steps(self) -> int:
        """Edit steps finished so far."""
        with self._lock:
            return self._steps

    def create_run(self, config: dict[str, Any]) -> int:
        return -1  # nothing is stored

    def add_step(self, run_id: int, summary_row: dict[str, Any], probe_rows: Any) -> None:
        with self._lock:
            self._steps += 1
        self.first_step.set()

    def finish_run(self, run_id: int, status: str = "done", error: str | None = None,
                   final: dict[str, Any] | None = None) -> None:
        pass  # the runner's thread ends right after; :meth:`run` marks it

    def run(self, work: Any) -> None:
        """Call ``work()`` (the background run), keeping its error and marking the end, so a waiter never
        waits for a step that cannot come."""
        try:
            work()
        except BaseException as err:  # reported by wait_for_first_step, not lost in a thread
            self.error = err
        finally:
            self.ended.set()

    def wait_for_first_step(self, timeout: float) -> None:
        """Return once the run has finished an edit step; raise ``RuntimeError`` if it ended without one
        (with its error) or ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while not self.first_step.wait(0.1):
            if self.ended.is_set() and not self.first_step.is_set():
                raise RuntimeError("the background run ended before finishing an edit step") from self.error
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the background run finished no edit step in {timeout:g} s")


def _median_edit_latency(handle: ModelHandle, method: str, requests: list[EditRequest]) -> float:
    """Median wall time of applying each request as a fresh session's single edit."""
    times = []
    for request in requests:
        session = EditSession(handle)
        started = time.perf_counter()
        session.apply(method, request)
        times.append(time.perf_counter() - started)
        session.clear()
    return statistics.median(times)


def _burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"], start_new_session=True)
            for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def measure_responsiveness(handle: ModelHandle, method: str = "ROME", n_edits: int = 5,
                           background_method: str | None = None, n_background_cases: int = 200) -> Responsiveness:
    """Measure (a), (b) and (c) (see the module docstring) with ``n_edits`` timed edits each.

    The background run is a sequential experiment of ``background_method`` (default: ``method``)
    over the demo data set's cases; (b) is timed from the end of its first edit step, and the run is
    cancelled once (b) is measured.
    """
    from editing.train import edit_records
    from eval.datasets import load_dataset
    from eval.runs import run_experiment

    threads = configure_threads(concurrent_jobs=2)
    requests = [record.request for record in edit_records("train", seed=7)[: n_edits + 1]]
    warm, timed = requests[0], requests[1:]
    EditSession(handle).apply(method, warm)  # fills the method's caches (statistics, templates)
    idle = _median_edit_latency(handle, method, timed)

    cases = load_dataset("demo", limit=n_background_cases)
    cancel, counter = threading.Event(), StepCounter()

    def background() -> None:
        with background_priority():
            run_experiment(handle, background_method or method, cases, mode="sequential", cancel=cancel,
                           store=counter)

    runner = threading.Thread(target=counter.run, args=(background,), name="background-sequential-run",
                              daemon=True)
    runner.start()
    try:
        # Before its first edit the run only predicts the probes of all its cases; an edit timed then
        # competes with a lighter load than the editing steps that follow (the first figure did so).
        counter.wait_for_first_step(BACKGROUND_START_TIMEOUT_S)
        before = counter.steps
        busy = _median_edit_latency(handle, method, timed)
        during = counter.steps - before
    finally:
        cancel.set()
        runner.join(600)

    burners = _burners(2)
    try:
        time.sleep(0.5)  # let the burners reach full speed
        loaded = _median_edit_latency(handle, method, timed)
    finally:
        _stop(burners)
    return Responsiveness(method=method, threads=threads, idle_s=idle, with_background_run_s=busy,
                          with_outside_load_s=loaded, background_steps_during=during)


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.responsiveness [--model demo] [--method ROME] [--n 5]`: print the three latencies."""
    parser = argparse.ArgumentParser(prog="python -m eval.responsiveness", description=main.__doc__)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--method", default="ROME")
    parser.add_argument("--n", type=int, default=5, help="timed edits per situation")
    args = parser.parse_args(argv)
    from editing.models.loader import load_model

    result = measure_responsiveness(load_model(args.model), args.method, args.n)
    print(f"{args.method} single edit on {args.model}, {result.threads} intra-op thread(s), median of {args.n}:")
    print(f"  (a) idle                               {result.idle_s:7.3f} s")
    print(f"  (b) beside a background sequential run {result.with_background_run_s:7.3f} s  "
          f"ratio {result.background_ratio:.2f} (goal ≤ {GOAL_BACKGROUND_RATIO:g}; "
          f"{result.background_steps_during} background steps ran meanwhile)")
    print(f"  (c) beside two CPU-bound processes     {result.with_outside_load_s:7.3f} s  "
          f"ratio {result.outside_load_ratio:.2f} (goal ≤ {GOAL_OUTSIDE_LOAD_RATIO:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
