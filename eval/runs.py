"""Experiments: many edits, applied one case at a time, in batches, or in sequence.

* ``single`` — each case is edited alone on the unedited model and judged;
* ``batch`` — ``batch_size`` cases are edited together in one call of the method (the survey's
  Figure 6: metrics against batch size);
* ``sequential`` — cases are edited one after another into one session; after each step every
  edit so far is judged again (reliability, generality, locality and portability, batched), and
  the first edits are tracked as later ones arrive (the survey's Figure 7).

Every step is written to the :class:`~eval.store.RunStore` as it finishes (when one is given), so
a crashed or cancelled run keeps what it computed. The shared model never keeps an edit: every
edit lives in a run-local :class:`~editing.core.session.EditSession`.

A sequential run holds its session's :meth:`~editing.core.session.EditSession.stack_cache`, so
re-applying the stack for each step's edit and judgement is constant tensor work, not one apply
per edit so far; the stack is still reverted (bit for bit) and the model's lock released after
each of them, so an interactive edit waits for at most one step. Judging every edit so far at each
step is O(n) by definition of the mode.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from editing.core.request import InvalidEditRequest
from editing.core.session import EditSession
from eval.datasets import EditCase
from eval.evaluate import ProbeOutcome, evaluate_edit, outcome_table, predict
from eval.metrics import summarize
from eval.probes import PROBE_KINDS, ProbeSet, merge_probesets, without_conflicts
from eval.store import RunResult, RunStore, final_metrics

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

__all__ = ["MODES", "RunResult", "run_experiment"]

MODES = ("single", "batch", "sequential")
ProgressFn = Callable[[float, str], None]

#: kinds judged at every step of a sequential run (unrelated probes only when asked for, to keep it affordable)
SEQUENTIAL_KINDS = ("reliability", "generality", "locality", "portability")
#: summary columns restricted to the first edits of a sequential run
FIRST_METRICS = ("reliability", "generality", "locality", "portability", "efficacy_score", "score",
                 # efficacy alone counted FT-L's first edits 0.8 after 50 edits while none was answered: the
                 # first edits' edit success (greedy answer = new target) and those failures are tracked too
                 "edit_success", "n_efficacy_without_reliability", "locality_known", "n_locality_known")


def run_experiment(handle: ModelHandle, method: str, cases: Sequence[EditCase], mode: str = "single",
                   n: int | None = None, batch_size: int = 1, hparams: dict[str, Any] | None = None,
                   progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                   store: RunStore | None = None, *, dataset: str | None = None, k: int = 0,
                   generations: bool = False, first_k: int = 5,
                   sequential_kinds: Sequence[str] = SEQUENTIAL_KINDS) -> RunResult:
    """Edit the first ``n`` cases with ``method`` in ``mode`` and judge every step.

    Returns the per-step summary (``step, n_edits, reliability, ..., wall_time_s,
    peak_memory_bytes``) and the per-probe results. ``cancel`` stops between steps (what is done
    is kept); ``store`` persists each step as it finishes. ``k`` > 0 also records the top-k next
    tokens of every probe; ``generations`` adds fluency of greedy continuations (single/batch).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    unknown = set(sequential_kinds) - set(PROBE_KINDS)
    if unknown:
        raise ValueError(f"Unknown probe kinds {sorted(unknown)}.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        # cases[:-1] would silently run all cases but the last
        raise ValueError(f"n (the number of cases) must be a whole number of at least 1, or None for all; got {n!r}.")
    cases = list(cases[:n] if n is not None else cases)
    if not cases:
        raise ValueError("No cases to run.")
    from editing.methods import get_method
    from editing.methods.base import check_fits_context, check_spelled

    method_obj = get_method(method)  # fails early, with the list of methods, on a typo
    method_name = method_obj.name
    # What the method would refuse at some step is refused now, before a run is stored: a bad
    # hyper-parameter or an edit the model cannot read or spell would leave a "failed" run behind.
    method_obj.resolve_hparams(handle, hparams).validate(handle)
    for case in cases:
        try:
            check_fits_context(handle, case.requests)
            check_spelled(handle, case.requests)
        except InvalidEditRequest as err:
            raise InvalidEditRequest(f"Case {case.case_id}: {err}") from err
    config = {"model": handle.name, "method": method_name, "mode": mode, "n": len(cases),
              "batch_size": batch_size if mode == "batch" else 1, "hparams": hparams or {},
              "dataset": dataset or (cases[0].source if cases else None), "k": k,
              "case_ids": [c.case_id for c in cases]}
    run_id = store.create_run(config) if store is not None else None
    runner = _Run(handle, method_name, cases, hparams, progress, cancel, store, run_id, k)
    try:
        if mode == "sequential":
            runner.sequential(first_k, tuple(sequential_kinds))
        else:
            runner.grouped(batch_size if mode == "batch" else 1, generations)
    except BaseException as err:
        if store is not None and run_id is not None:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            message = "".join(traceback.format_exception_only(type(err), err)).strip()
            store.finish_run(run_id, status, error=message, final=final_metrics(runner.summary_frame(), mode))
        raise
    summary = runner.summary_frame()
    status = "cancelled" if runner.cancelled else "done"
    if store is not None and run_id is not None:
        store.finish_run(run_id, status, final=final_metrics(summary, mode))
    return RunResult(run_id=run_id, summary=summary, probes=runner.probes_frame(), cancelled=runner.cancelled,
                     status=status, config=config)


class _Run:
    """The state of one experiment while it runs."""

    def __init__(self, handle: ModelHandle, method: str, cases: list[EditCase], hparams: dict[str, Any] | None,
                 progress: ProgressFn | None, cancel: threading.Event | None, store: RunStore | None,
                 run_id: int | None, k: int) -> None:
        self.handle, self.method, self.cases, self.hparams = handle, method, cases, hparams
        self.progress = progress or (lambda _f, _m: None)
        self.cancel, self.store, self.run_id, self.k = cancel, store, run_id, k
        self.rows: list[dict[str, Any]] = []
        self.probe_rows: list[dict[str, Any]] = []
        self.cancelled = False
        # Neighbours of one case may be subjects another case edits: drop those probes up front.
        self.probesets = without_conflicts([c.probes for c in cases])

    # -- bookkeeping ---------------------------------------------------------------------------
    def _stopped(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
        return self.cancelled

    def _record(self, row: dict[str, Any], table: pd.DataFrame, case_of_probe: Sequence[int]) -> None:
        table = table.copy()
        table.insert(0, "case_id", [self.cases[i].case_id for i in case_of_probe])
        table.insert(0, "step", row["step"])
        rows = table.to_dict(orient="records")
        if self.store is not None and self.run_id is not None:
            self.store.add_step(self.run_id, row, rows)
        self.rows.append(row)
        self.probe_rows.extend(rows)

    def _report(self, done: float, total: int, message: str) -> Callable[[float, str], None]:
        def report(fraction: float, detail: str) -> None:
            self.progress(min(1.0, (done + fraction) / total), f"{message}: {detail}")

        return report

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def probes_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.probe_rows)

    # -- single and batch ----------------------------------------------------------------------
    def grouped(self, size: int, generations: bool) -> None:
        groups = [list(range(i, min(i + size, len(self.cases)))) for i in range(0, len(self.cases), size)]
        for step, indices in enumerate(groups, start=1):
            if self._stopped():
                return
            session = EditSession(self.handle)
            probeset = merge_probesets([self.probesets[i] for i in indices])
            requests = probeset.requests
            prompts = _generation_prompts([self.cases[i] for i in indices], probeset) if generations else None
            label = f"step {step}/{len(groups)} ({len(requests)} edit{'s' if len(requests) > 1 else ''})"
            try:
                outcome = evaluate_edit(session, self.method, requests, probeset, self.hparams,
                                        progress=self._report(step - 1, len(groups), label), k=self.k,
                                        generation_prompts=prompts)
            finally:
                session.clear()
            case_of_request = [i for i in indices for _ in self.cases[i].requests]
            case_of_probe = [case_of_request[p.request_index] for p in probeset.probes]
            row = {"step": step, "n_edits": len(requests), "case_ids": ",".join(self.cases[i].case_id for i in indices),
                   **outcome.metrics, "wall_time_s": outcome.wall_time_s,
                   "peak_memory_bytes": outcome.peak_memory_bytes, "memory_kind": outcome.memory_kind,
                   "eval_time_s": outcome.eval_time_s}
            self._record(row, outcome.table, case_of_probe)

    # -- sequential ----------------------------------------------------------------------------
    def sequential(self, first_k: int, kinds: tuple[str, ...]) -> None:
        session = EditSession(self.handle)
        per_case = [ProbeSet(s.requests, [p for p in s.probes if p.kind in kinds]) for s in self.probesets]
        with session.stack_cache():  # step n re-applies the stack in constant time (module docstring)
            self._sequential(session, per_case, first_k)

    def _sequential(self, session: EditSession, per_case: list[ProbeSet], first_k: int) -> None:
        total = len(self.cases)
        try:
            self.progress(0.0, "predicting before any edit")
            flat = [p for s in per_case for p in s.probes]
            before_flat = predict(session, flat, self.k)
            before: list[list[ProbeOutcome]] = []
            offset = 0
            for s in per_case:
                before.append(before_flat[offset: offset + len(s.probes)])
                offset += len(s.probes)
            edit_time = 0.0
            for step, case in enumerate(self.cases, start=1):
                if self._stopped():
                    return
                label = f"edit {step}/{total}"
                edit = session.apply(self.method, case.requests, self.hparams,
                                     progress=self._report(step - 1, total, label))
                edit_time += edit.stats.wall_time_s
                started = time.perf_counter()
                seen = range(step)
                after_flat = predict(session, [p for i in seen for p in per_case[i].probes], self.k)
                table = outcome_table([o for i in seen for o in before[i]], after_flat)
                case_of_probe = [i for i in seen for _ in per_case[i].probes]
                metrics = summarize(table)
                first = table[[i < min(first_k, step) for i in case_of_probe]]
                first_metrics = summarize(first)
                row = {"step": step, "n_edits": sum(len(c.requests) for c in self.cases[:step]),
                       "case_ids": case.case_id, **metrics,
                       **{f"first_{key}": first_metrics[key] for key in FIRST_METRICS},
                       "wall_time_s": edit.stats.wall_time_s, "peak_memory_bytes": edit.stats.peak_memory_bytes,
                       "memory_kind": edit.stats.memory_kind, "eval_time_s": time.perf_counter() - started,
                       "total_edit_time_s": edit_time}
                self._record(row, table, case_of_probe)
                self.progress(step / total, f"{label}: judged {len(table)} probes")
        finally:
            session.clear()


def _generation_prompts(cases: Sequence[EditCase], probeset: ProbeSet) -> list[str]:
    """The cases' own generation prompts (CounterFact), else the in-scope request/paraphrase prompts."""
    prompts = [p for c in cases for p in c.meta.get("generation_prompts", [])]
    if not prompts:
        prompts = [p.prompt for p in probeset.probes if p.kind in ("reliability", "generality")]
    return prompts
