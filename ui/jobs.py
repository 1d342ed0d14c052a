"""Experiments that run in a background thread, so the page stays responsive and can cancel them.

A job runs ``eval.runs.run_experiment`` for each (method, size) of its plan, one after another,
records progress for the page to poll, and stops at the next step when cancelled. Every run is
persisted by the run store as it goes, so a refresh loses nothing. No streamlit here.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from editing.core.concurrency import background_priority
from editing.models.loader import ModelHandle
from eval.metrics import COUNT_KEYS

MODES = ("batch", "sequential")
#: background runs and trainings at once: each uses one core, the rest stay free for interactive edits
MAX_BACKGROUND = max(1, (os.cpu_count() or 2) // 2)
_BACKGROUND_SLOTS = threading.BoundedSemaphore(MAX_BACKGROUND)


def time_left(started_at: float, progress: float, now: float | None = None) -> str:
    """The time left, as " (about 40 s left)", from the run's own pace on this machine so far; empty
    until a few percent are done (a fixed estimate was off by 9x on a busy machine)."""
    if progress < 0.03 or progress >= 1.0:
        return ""
    elapsed = (now if now is not None else time.time()) - started_at
    left = elapsed * (1.0 - progress) / progress
    return f" (about {left:.0f} s left)" if left < 120 else f" (about {left / 60:.0f} min left)"


def _in_background(job: Any, work: Any) -> Any:
    """``work`` as a background thread's target: a bounded number run at once (the rest say they are
    queued), each at a lower OS priority, and yielding the model's lock to interactive edits between
    its steps (:func:`editing.core.concurrency.background_priority`)."""

    def run() -> None:
        with background_priority():
            if not _BACKGROUND_SLOTS.acquire(blocking=False):
                job.message = "queued: waiting for another background run or training to finish"
                _BACKGROUND_SLOTS.acquire()
            try:
                work()
            finally:
                _BACKGROUND_SLOTS.release()

    return run
#: overrides the run store's file (tests, deployments that keep runs elsewhere)
RUN_STORE_ENV = "EDITSCOPE_RUN_STORE"


def run_store() -> Any:
    """The run store the dashboard reads and writes (``$EDITSCOPE_RUN_STORE`` or the default file)."""
    from eval.store import RunStore

    path = os.environ.get(RUN_STORE_ENV, "").strip()
    return RunStore(path or None)


@dataclass(frozen=True)
class ExperimentPlan:
    """What to run: each method in ``mode`` at each size.

    ``batch``: one run per batch size b over the same max(sizes) cases, edited b at a time; each
    size's point is the mean over its batches (the survey's Figure 6);
    ``sequential``: one run per method over max(sizes) cases edited one after another, with the
    metrics over all edits so far recorded after each (Figure 7).
    """

    methods: tuple[str, ...]
    mode: str
    sizes: tuple[int, ...]
    dataset: str
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if not self.methods:
            raise ValueError("Pick at least one method.")
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError("Sizes must be whole numbers of at least 1, e.g. '1, 2, 4, 8'.")

    @property
    def n_cases(self) -> int:
        return max(self.sizes)

    def tasks(self) -> list[tuple[str, int]]:
        """(method, batch size) for every run, in order (batch size 1 for sequential runs)."""
        if self.mode == "sequential":
            return [(m, 1) for m in self.methods]
        return [(m, s) for m in self.methods for s in sorted(set(self.sizes))]


def parse_sizes(text: str) -> tuple[int, ...]:
    """'1, 2, 4, 8' -> (1, 2, 4, 8); raises ValueError saying what is wrong."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        sizes = tuple(sorted({int(p) for p in parts}))
    except ValueError as err:
        raise ValueError(f"'{text}' is not a list of whole numbers, e.g. '1, 2, 4, 8'.") from err
    if not sizes or sizes[0] < 1:
        raise ValueError("Sizes must be whole numbers of at least 1, e.g. '1, 2, 4, 8'.")
    return sizes


@dataclass
class TaskResult:
    method: str
    size: int
    result: Any  # eval.store.RunResult


class _StepRecorder:
    """Stands in for the run store during one task: keeps each step's summary row as it lands (for
    curves drawn while the run goes on) and passes everything on to the real store, if any."""

    def __init__(self, store: Any, rows: list[dict[str, Any]]) -> None:
        self._store = store
        self._rows = rows
        self._next_id = 0

    def create_run(self, config: dict[str, Any]) -> int:
        if self._store is not None:
            return self._store.create_run(config)
        self._next_id -= 1  # no store: a local id, never written anywhere
        return self._next_id

    def add_step(self, run_id: int, summary_row: dict[str, Any], probe_rows: Any) -> None:
        self._rows.append(dict(summary_row))  # drawn at once, while the store writes
        if self._store is not None:
            self._store.add_step(run_id, summary_row, probe_rows)

    def finish_run(self, run_id: int, status: str = "done", error: str | None = None,
                   final: dict[str, Any] | None = None) -> None:
        if self._store is not None:
            self._store.finish_run(run_id, status, error=error, final=final)


class ExperimentJob:
    """A plan running in a daemon thread; the page polls :attr:`progress` and :attr:`message`."""

    def __init__(self, handle: ModelHandle, cases: list[Any], plan: ExperimentPlan, store: Any = None) -> None:
        self.handle = handle
        self.cases = cases
        self.plan = plan
        self.store = store
        self.cancel_event = threading.Event()
        self.progress = 0.0
        self.message = "queued"
        self.results: list[TaskResult] = []
        self.live: tuple[str, int, list[dict[str, Any]]] | None = None  # (method, size, steps) of the running task
        self.errors: list[str] = []
        self.done = False
        self.started_at = time.time()
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=_in_background(self, self._run), name="editscope-experiment",
                                        daemon=True)

    def start(self) -> ExperimentJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the run to stop after its current step (the steps done so far are kept)."""
        self.cancel_event.set()
        self.message = "cancelling after the current step…"

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (tests, scripts); returns whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        from eval.runs import run_experiment

        tasks = self.plan.tasks()
        try:
            for index, (method, size) in enumerate(tasks):
                if self.cancelled:
                    break

                def report(fraction: float, message: str, index: int = index, method: str = method) -> None:
                    self.progress = min(1.0, (index + max(0.0, min(1.0, fraction))) / len(tasks))
                    self.message = f"{method} ({index + 1}/{len(tasks)}): {message}"

                report(0.0, "starting")
                steps: list[dict[str, Any]] = []
                self.live = (method, size, steps)
                try:
                    result = run_experiment(self.handle, method, self.cases, self.plan.mode, n=self.plan.n_cases,
                                            batch_size=size, hparams=self.plan.hparams.get(method) or None,
                                            progress=report, cancel=self.cancel_event,
                                            store=_StepRecorder(self.store, steps), dataset=self.plan.dataset)
                except Exception as err:  # one failing method must not stop the others
                    self.errors.append(f"{method} (size {size}): {err}")
                    continue
                finally:
                    self.live = None
                if self.store is None:
                    result.run_id = None  # the recorder's local id was never stored
                self.results.append(TaskResult(method, size, result))
        finally:
            self.progress = 1.0 if not self.cancelled else self.progress
            self.message = "cancelled" if self.cancelled else "finished"
            self.finished_at = time.time()
            self.done = True

    def curves(self, partial: bool = False) -> pd.DataFrame:
        """Rows (method, x, metrics...) to plot against the batch size or the number of edits.

        With ``partial`` a running sequential task adds the steps it has finished so far, so its
        curve grows as the edits land (a batch size's point is only drawn once all its batches ran).
        """
        summaries = [(r.method, r.size, r.result.summary) for r in list(self.results)]
        live = self.live
        if partial and live is not None and self.plan.mode == "sequential":
            method, size, steps = live
            if steps:
                summaries.append((method, size, pd.DataFrame(list(steps))))
        return curves_from(self.plan.mode, summaries)


def curves_from(mode: str, summaries: list[tuple[str, int, pd.DataFrame]]) -> pd.DataFrame:
    """Curve points (columns ``method``, ``x`` and the metrics) from run summaries.

    A batch run gives one point at x = its batch size: the mean over its batches (counts such as
    ``n_efficacy_without_reliability`` are summed). A sequential run gives one point per step at
    x = the number of edits so far (metrics over all of them).
    """
    frames = []
    for method, size, summary in summaries:
        if summary is None or summary.empty:
            continue
        if mode == "sequential":
            part = summary.select_dtypes("number").copy()
            part["x"] = summary["n_edits"]
        else:
            numeric = summary.select_dtypes("number")
            part = numeric.mean().to_frame().T
            for key in (k for k in COUNT_KEYS if k in numeric.columns):
                part[key] = numeric[key].sum(min_count=1)
            part["x"] = size
        part.insert(0, "method", method)
        frames.append(part)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["method", "x"])


class BackgroundTask:
    """One function run in a daemon thread, reporting progress (e.g. training a learned editor).

    The function receives a ``progress(fraction, message)`` callback; its result or error is kept.
    """

    def __init__(self, label: str, work: Any) -> None:
        self.label = label
        self._work = work
        self.progress = 0.0
        self.message = "starting"
        self.started_at = time.time()
        self.result: Any = None
        self.error: str | None = None
        self.done = False
        self._thread = threading.Thread(target=_in_background(self, self._run), name=f"editscope-{label}",
                                        daemon=True)

    def start(self) -> BackgroundTask:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _report(self, fraction: float, message: str) -> None:
        self.progress = min(1.0, max(0.0, fraction))
        self.message = message

    def _run(self) -> None:
        try:
            self.result = self._work(self._report)
        except Exception as err:  # shown to whoever looks at the task
            self.error = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        finally:
            self.done = True


_SHARED_TASKS: dict[str, BackgroundTask] = {}
_SHARED_TASKS_LOCK = threading.Lock()


def shared_task(key: str, label: str, work: Any) -> BackgroundTask:
    """The process-wide task under ``key``, started on first request (or again after a failure).

    Training a learned editor produces one cached checkpoint per model, so every browser session
    asking for it shares one run instead of starting its own.
    """
    with _SHARED_TASKS_LOCK:
        task = _SHARED_TASKS.get(key)
        if task is None or (task.done and task.error is not None):
            task = BackgroundTask(label, work).start()
            _SHARED_TASKS[key] = task
        return task


def find_shared_task(key: str) -> BackgroundTask | None:
    """The task started under ``key`` in this process, if any."""
    with _SHARED_TASKS_LOCK:
        return _SHARED_TASKS.get(key)
