"""How long a person's edit waits when the server is busy: the latency ratios of the benchmark.

Measured in one process, as the dashboard runs (one shared model handle, the server's thread
policy from :func:`editing.concurrency.configure_threads`), the median latency of single
interactive edits

* (a) on an otherwise idle process,
* (b) while a second session's sequential experiment runs in a background thread
  (:func:`editing.concurrency.background_priority`, as the dashboard's background jobs do), and
* (c) while two outside CPU-bound processes compete for the cores,

and the ratios (b)/(a) and (c)/(a), whose goals are ≤ 2 and ≤ 3. ``python -m eval.responsiveness``
prints them; :mod:`eval.bench` reports them beside its other figures.
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

from editing.concurrency import background_priority, configure_threads
from editing.models import ModelHandle
from editing.request import EditRequest
from editing.session import EditSession

#: goals of the issue "stays responsive": (b)/(a) and (c)/(a)
GOAL_BACKGROUND_RATIO = 2.0
GOAL_OUTSIDE_LOAD_RATIO = 3.0


@dataclass
class Responsiveness:
    """Median single-edit latencies (seconds) in the three situations, and their ratios."""

    method: str
    threads: int
    idle_s: float
    with_background_run_s: float
    with_outside_load_s: float
    background_steps_during: int  # steps the background run finished while (b) was measured

    @property
    def background_ratio(self) -> float:
        return self.with_background_run_s / self.idle_s

    @property
    def outside_load_ratio(self) -> float:
        return self.with_outside_load_s / self.idle_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "background_ratio": self.background_ratio,
                "outside_load_ratio": self.outside_load_ratio}


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
    over the demo data set's cases; it is cancelled once (b) is measured.
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
    cancel, steps, started = threading.Event(), [], threading.Event()

    def background() -> None:
        with background_priority():
            run_experiment(handle, background_method or method, cases, mode="sequential", cancel=cancel,
                           progress=lambda _f, message: (steps.append(message), started.set()))

    runner = threading.Thread(target=background, name="background-sequential-run", daemon=True)
    runner.start()
    started.wait(120)
    before = len(steps)
    try:
        busy = _median_edit_latency(handle, method, timed)
    finally:
        during = len(steps) - before
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
    from editing.models import load_model

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
