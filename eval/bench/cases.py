"""The benchmark's measurements on one model: edit latency, batch and sequential scaling, the long
sequential run, evaluation throughput and the scope map's cost."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import get_method
from editing.models.loader import ModelHandle
from eval.bench.common import Log, is_oom, mib, print_line, reason_of, timed
from eval.bench.rows import LatencyRow, ScalingRow, SequentialLongRow

#: methods that edit many facts in one batch; they get the large batch sizes
BATCH_METHODS = ("MEMIT", "AlphaEdit")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def request_pool(n: int, seed: int = 0) -> list[EditRequest]:
    """``n`` counterfactual edit requests from the fact base (distinct facts, shuffled)."""
    from editing.train import edit_records

    records = edit_records("train", seed=seed) + edit_records("heldout", seed=seed)
    requests = [r.request for r in records]
    random.Random(seed).shuffle(requests)
    if n > len(requests):
        raise ValueError(f"The fact base yields {len(requests)} edit requests; {n} were asked for.")
    return requests[:n]


def probe_set(request: EditRequest, n: int, seed: int = 0):
    """Exactly ``n`` probes for ``request`` (its own probes, then neighbours and unrelated facts)."""
    from eval.probes import ProbeSet, probes_for_request

    probes = probes_for_request(request, n_neighbours=n // 2, n_unrelated=n, seed=seed)
    return ProbeSet(probes.requests, probes.probes[:n])



def ensure_ready(handle: ModelHandle, method: str, train: bool, log: Log,
                 quick: bool = False) -> tuple[str | None, dict[str, Any], float]:
    """``(None, hparams, train_s)`` when ``method`` can edit ``handle`` with ``hparams``; else
    ``(why not, {}, train_s)``. ``train_s`` is the wall time of training its editor in this call
    (NaN when nothing was trained: a ready method, or an editor found in the cache).

    A learned method without an editor is trained first: with ``train`` in its default config;
    with ``quick`` (tiny random models, where only the cost is measured) in its trainer's few-step
    ``quick`` config, whose checkpoint the returned hyper-parameters then name.
    """
    method_obj = get_method(method)
    problem = method_obj.readiness(handle)
    from editing.train import TRAINERS, train_editor

    if problem is None or method not in TRAINERS or not (train or quick):
        return problem, {}, math.nan
    overrides = TRAINERS[method].quick if quick else None  # tiny models: only the cost is measured
    log(f"  training {method} on {handle.name}{' (a few steps, to time it)' if overrides else ''} ...")
    started = time.perf_counter()
    try:
        folder, _ = train_editor(handle, method, overrides, progress=lambda f, m: None)
    except Exception as err:  # a failed training is reported like any other skip
        return f"training failed: {reason_of(err)}", {}, time.perf_counter() - started
    train_s = time.perf_counter() - started
    log(f"  trained {method} in {train_s:.0f} s")
    hparams: dict[str, Any] = {"checkpoint": str(folder)} if overrides else {}
    return method_obj.readiness(handle, hparams), hparams, train_s


def bench_latency(handle: ModelHandle, model: str, method: str, requests: Sequence[EditRequest],
                  n_probes: int = 0, seed: int = 0, hparams: dict[str, Any] | None = None) -> LatencyRow:
    """One warm-up edit, then ``len(requests) - 1`` timed single edits, each on the unedited model.

    With ``n_probes`` it also measures evaluation throughput with the last edit active.
    """
    method_obj = get_method(method)
    row = LatencyRow(model=model, method=method, status="ok", edit_kind=method_obj.edit_kind)
    session = EditSession(handle)
    times: list[float] = []
    cpu_times: list[float] = []
    peaks: list[int] = []
    for index, request in enumerate(requests):
        session.clear()
        edit, _, cpu = timed(lambda request=request: session.apply(method_obj, request, hparams or None))
        if index == 0:
            row.cold_s = edit.stats.wall_time_s
            row.cold_peak_memory_bytes = edit.stats.peak_memory_bytes
        else:
            times.append(edit.stats.wall_time_s)
            cpu_times.append(cpu)
            peaks.append(edit.stats.peak_memory_bytes)
        row.memory_kind = edit.stats.memory_kind
        row.edit_size_bytes = edit.size_bytes
    if times:
        row.n_edits = len(times)
        row.median_s = statistics.median(times)
        row.median_cpu_s = statistics.median(cpu_times)
        row.min_s, row.max_s = min(times), max(times)
    row.peak_memory_bytes = max(peaks, default=row.cold_peak_memory_bytes)
    if n_probes:
        from eval.evaluate import predict

        probes = probe_set(requests[-1], n_probes, seed).probes
        predict(session, probes[:4])  # warm-up of the routed path (e.g. a wrapper's retriever)
        _, elapsed, _ = timed(lambda: predict(session, probes))
        row.eval_probes = len(probes)
        row.eval_probes_per_s = len(probes) / elapsed if elapsed > 0 else math.nan
    session.clear()
    return row


def bench_batch(handle: ModelHandle, model: str, method: str, requests: Sequence[EditRequest],
                sizes: Sequence[int], log: Log) -> list[ScalingRow]:
    """One edit of ``size`` requests for each size (fresh session each time), smallest first."""
    rows = []
    for size in sizes:
        row = ScalingRow(model=model, method=method, mode="batch", n=size, status="ok")
        session = EditSession(handle)
        try:
            batch = list(requests[:size])
            edit, _, row.cpu_s = timed(lambda session=session, batch=batch: session.apply(method, batch))
            row.wall_s = edit.stats.wall_time_s
            row.per_edit_s = row.wall_s / size
            row.peak_memory_bytes = edit.stats.peak_memory_bytes
            row.memory_kind = edit.stats.memory_kind
        except Exception as err:
            row.status, row.reason = ("oom" if is_oom(err) else "error"), reason_of(err)
        finally:
            session.clear()
        rows.append(row)
        log(f"  {method} batch of {size}: " + (f"{row.wall_s:.2f} s, peak {mib(row.peak_memory_bytes)}"
                                               if row.status == "ok" else f"{row.status}: {row.reason}"))
        if row.status != "ok":
            break  # larger batches fail the same way, only slower
    return rows


def bench_sequential(handle: ModelHandle, model: str, method: str, requests: Sequence[EditRequest],
                     log: Log) -> list[ScalingRow]:
    """Edits applied one after another in one session; the cost of each as the stack grows."""
    rows = []
    session = EditSession(handle)
    try:
        for step, request in enumerate(requests, start=1):
            row = ScalingRow(model=model, method=method, mode="sequential", n=step, status="ok")
            try:
                edit, _, row.cpu_s = timed(lambda request=request: session.apply(method, request))
            except Exception as err:
                row.status, row.reason = ("oom" if is_oom(err) else "error"), reason_of(err)
                rows.append(row)
                break
            row.wall_s = row.per_edit_s = edit.stats.wall_time_s
            row.peak_memory_bytes = edit.stats.peak_memory_bytes
            row.memory_kind = edit.stats.memory_kind
            rows.append(row)
    finally:
        session.clear()
    done = [r for r in rows if r.status == "ok"]
    if done:
        log(f"  {method} sequential: edit 1 {done[0].wall_s:.2f} s ... edit {done[-1].n} {done[-1].wall_s:.2f} s")
    return rows


def _window(steps: list[dict[str, Any]], start: int, stop: int, key: str) -> float:
    """Median of ``key`` over steps ``start..stop`` (1-based, inclusive)."""
    values = [row[key] for row in steps if start <= row["step"] <= stop]
    return statistics.median(values) if values else math.nan


def bench_sequential_long(handle: ModelHandle, model: str, n: int, method: str = "ROME", seed: int = 0,
                          log: Log = print_line, early: int = 10, window: int = 10,
                          hparams: dict[str, Any] | None = None) -> tuple[SequentialLongRow, list[dict[str, Any]]]:
    """``n`` edits one after another into one session, as a sequential run does them: each step edits,
    then enters the session again to judge the new edit (one probe, so judging costs the same at every
    step; judging every edit so far, as ``eval.runs`` does, grows with n by definition).

    Returns the summary — median step time around step ``early`` and over the last ``window`` steps,
    their ratio, the same for the time outside the method's own computation, peak memory over the run,
    and the final stack re-applied through the cache and edit by edit — and one row per step.
    """
    from editing.core.measure import current_rss_bytes, measure
    from eval.evaluate import predict
    from eval.probes import Probe

    row = SequentialLongRow(model=model, method=method, n=n, status="ok")
    try:
        requests = request_pool(n, seed)
    except ValueError as err:  # more edits asked for than the fact base holds
        row.status, row.reason = "error", reason_of(err)
        log(f"  {method} sequential-long: {row.reason}")
        return row, []
    judge = [Probe(id=f"step{i}", prompt=r.text, answer=r.target_new, kind="reliability")
             for i, r in enumerate(requests)]
    original = {name: p.detach().clone() for name, p in handle.model.named_parameters()}
    steps: list[dict[str, Any]] = []
    session = EditSession(handle)
    every = max(1, n // 20)
    started = time.perf_counter()
    try:
        with session.stack_cache():
            with measure(handle.devices) as cost:
                for step, (request, probe) in enumerate(zip(requests, judge, strict=True), start=1):
                    def one_step(request: EditRequest = request, probe: Any = probe) -> Any:
                        edit = session.apply(method, request, hparams or None)
                        predict(session, [probe], k=0)
                        return edit

                    edit, wall, cpu = timed(one_step)
                    steps.append({"model": model, "method": method, "step": step, "step_s": wall, "step_cpu_s": cpu,
                                  "edit_s": edit.stats.wall_time_s, "overhead_s": wall - edit.stats.wall_time_s,
                                  "rss_bytes": current_rss_bytes()})  # flat when memory does not grow with n
                    if step % every == 0 or step == n:
                        log(f"  {method} sequential-long: step {step}/{n}, {wall:.2f} s this step "
                            f"({wall - edit.stats.wall_time_s:.3f} s outside the edit), "
                            f"{time.perf_counter() - started:.0f} s so far")
            row.peak_memory_bytes, row.memory_kind = cost.peak_memory_bytes, cost.memory_kind
            row.total_s = time.perf_counter() - started

            def enter(s: EditSession) -> None:
                with s.active():
                    pass

            enter(session)  # warm: the last step's edit joins the cache
            row.restack_cached_s = statistics.median(timed(lambda: enter(session))[1] for _ in range(3))
            plain = EditSession(handle)
            for edit in session.edits:
                plain.push(edit)
            with measure(handle.devices) as plain_cost:
                _, row.restack_plain_s, _ = timed(lambda: enter(plain))
            row.restack_plain_peak_bytes = plain_cost.peak_memory_bytes
    except Exception as err:
        row.status, row.reason = ("oom" if is_oom(err) else "error"), reason_of(err)
    finally:
        session.clear()
    row.bit_identical = all(torch.equal(p, original[name]) for name, p in handle.model.named_parameters())
    if steps:
        last = steps[-1]["step"]
        hi = min(last, early + window // 2)  # steps 6-15 for early=10: past the cold first edit
        lo = max(1, min(early - window // 2 + 1, hi - window + 1))
        late_lo = max(hi + 1, last - window + 1) if last > hi else lo
        row.early_steps, row.late_steps = f"{lo}-{hi}", f"{late_lo}-{last}"
        row.early_step_s, row.late_step_s = _window(steps, lo, hi, "step_s"), _window(steps, late_lo, last, "step_s")
        row.early_overhead_s = _window(steps, lo, hi, "overhead_s")
        row.late_overhead_s = _window(steps, late_lo, last, "overhead_s")
        row.ratio = row.late_step_s / row.early_step_s if row.early_step_s > 0 else math.nan
        row.overhead_ratio = row.late_overhead_s / row.early_overhead_s if row.early_overhead_s > 0 else math.nan
    log(f"  {method} sequential-long ({n} edits): " + (
        f"step {row.early_steps} {row.early_step_s:.3f} s, step {row.late_steps} {row.late_step_s:.3f} s "
        f"(ratio {row.ratio:.2f}; outside the edit {row.early_overhead_s:.4f} → {row.late_overhead_s:.4f} s), "
        f"peak {mib(row.peak_memory_bytes)} {row.memory_kind}; re-applying all {n}: cached "
        f"{row.restack_cached_s * 1e3:.2f} ms, one by one {row.restack_plain_s * 1e3:.1f} ms; "
        f"weights restored bit for bit: {row.bit_identical}"
        if row.status == "ok" else f"{row.status}: {row.reason}"))
    return row, steps


def bench_eval_before_after(handle: ModelHandle, method: str, request: EditRequest, n_probes: int,
                            seed: int = 0) -> tuple[float, float]:
    """Wall and CPU seconds to answer ``n_probes`` probes before and after an edit (the edit itself
    excluded)."""
    from eval.evaluate import predict

    probes = probe_set(request, n_probes, seed).probes
    session = EditSession(handle)
    try:
        predict(session, probes[:4])  # warm-up
        _, before, cpu_before = timed(lambda: predict(session, probes))
        session.apply(method, request)
        predict(session, probes[:4])
        _, after, cpu_after = timed(lambda: predict(session, probes))
    finally:
        session.clear()
    return before + after, cpu_before + cpu_after


def bench_scope_map(handle: ModelHandle, method: str, request: EditRequest, n_points: int,
                    seed: int = 0) -> tuple[float, float]:
    """Wall and CPU seconds for the scope map of ``n_points`` probes, after one warm-up map (UMAP's
    compilation)."""
    from eval.scope import scope_map

    probes = probe_set(request, n_points, seed)
    session = EditSession(handle)
    try:
        session.apply(method, request)
        scope_map(session, probes, seed=seed)  # warm-up: numba compiles UMAP on first use
        _, elapsed, cpu = timed(lambda: scope_map(session, probes, seed=seed))
    finally:
        session.clear()
    return elapsed, cpu

