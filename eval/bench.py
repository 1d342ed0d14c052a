"""The benchmark: what editing and evaluating cost, per method and model.

``python -m eval.bench [--quick] [--methods ROME,MEMIT] [--models demo,tiny] [--out DIR]
[--skip-server] [--train] [--device cpu|cuda] [--markdown PATH] [--sequential-long N]``

For every registered method (methods that are not ready, e.g. untrained editors, are skipped
with the reason, or trained first with ``--train``) on the demo model and on a tiny random model
of each supported architecture it measures:

* **edit latency** — the median over several single edits (after one warm-up edit, which pays
  for caches such as ROME's second-moment statistics; reported separately as "cold"), and the
  peak memory of an edit (CUDA allocator peak on a GPU, process RSS growth on the CPU, see
  :mod:`editing.measure`);
* **evaluation throughput** — probes answered per second with the edit active (routed through
  the session, so inference wrappers pay for their longer prompts);
* **batch scaling** — one edit of 1, 10, 100 and 1000 requests for the batch editors (MEMIT,
  AlphaEdit), 1 and 10 for the others;
* **sequential scaling** — the cost of the k-th of n edits applied one after another;
* **a long sequential run** (``--sequential-long N``, off unless asked for: 1,000 ROME edits take
  about half an hour on a 2-core CPU) — N ROME edits into one session, each step editing and then
  entering the session again to judge the new edit, as ``eval.runs`` does: the time of a step
  around step 10 against the last steps (the ratio shows whether a step's cost grows with the
  number of edits), the part of it outside ROME's own computation, the process's peak memory, and
  re-applying the final stack through the session's cache against applying it edit by edit;
* **time to first result** — from starting ``streamlit run app.py`` to the Playground showing an
  edit's result, driven by Playwright in a headless Chromium;
* the **performance targets** of the issue, each with its measured value and its ratio to the
  target: a ROME edit with cached statistics under 1 s, 100 probes evaluated before and after
  under 1 s, the scope map of 100 points under 3 s after warm-up, MEMIT with 1000 edits in one
  batch within 24 GiB.

Results go to ``DIR`` (default ``out/bench``): one CSV per table, ``machine.json``, a plot
(PNG through plotly's static export when kaleido is installed, else matplotlib when installed,
else a self-contained HTML file) and ``benchmark.md``, the Markdown tables the README shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from editing.methods import available_methods, get_method
from editing.models import ModelHandle, load_model
from editing.request import EditRequest
from editing.session import EditSession
from editing.tiny import TINY_FAMILIES, tiny_model
from eval.browser import CHROMIUM, IDLE, RESULT, free_port, server_unavailable_reason, streamlit_server, wait_healthy
from eval.realcost import EditCost, cost_markdown, measure_edit_cost

GIB = 1024 ** 3
ROOT = Path(__file__).resolve().parent.parent
#: methods that edit many facts in one batch; they get the large batch sizes
BATCH_METHODS = ("MEMIT", "AlphaEdit")
#: the issue's performance targets: name -> (what, limit, unit); all measured on the demo model
TARGETS = {
    "rome_edit_s": ("ROME edit with cached statistics (median)", 1.0, "s"),
    "eval_100_probes_s": ("100 probes evaluated before and after an edit", 1.0, "s"),
    "scope_map_100_s": ("scope map of 100 points after warm-up", 3.0, "s"),
    "memit_1000_peak_gib": ("MEMIT, 1000 edits in one batch: peak memory", 24.0, "GiB"),
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What to run; :func:`config_from_args` fills it from the command line."""

    models: tuple[str, ...] = ("demo", "tiny")
    methods: tuple[str, ...] | None = None  # None: every registered method
    n_edits: int = 5  # timed single edits per method on the demo model (after one warm-up)
    n_edits_tiny: int = 3
    n_sequential: int = 10
    batch_sizes: tuple[int, ...] = (1, 10, 100, 1000)  # for BATCH_METHODS
    batch_sizes_other: tuple[int, ...] = (1, 10)
    n_probes: int = 100
    n_scope_points: int = 100
    server: bool = True
    server_timeout_s: float = 240.0
    train: bool = False
    device: str | None = None
    seed: int = 0
    quick: bool = False
    #: pretrained models whose ROME edit cost (first, later, peak memory, arithmetic floor) is measured
    real_models: tuple[str, ...] = ()
    #: length of the long sequential ROME run on the demo model (0: not run; it takes minutes)
    n_sequential_long: int = 0


def quick_config(**changes: Any) -> BenchConfig:
    """Few edits and small sizes: the whole run takes about two minutes on a laptop CPU."""
    base = BenchConfig(n_edits=2, n_edits_tiny=1, n_sequential=3, batch_sizes=(1, 10), batch_sizes_other=(),
                       quick=True)
    return BenchConfig(**{**asdict(base), **changes})


# ---------------------------------------------------------------------------------------------
# Result rows
# ---------------------------------------------------------------------------------------------
@dataclass
class LatencyRow:
    model: str
    method: str
    status: str  # "ok", "skipped", "error"
    reason: str = ""
    edit_kind: str = ""
    n_edits: int = 0
    median_s: float = math.nan
    median_cpu_s: float = math.nan  # process CPU time of the same edits: robust to other work on the machine
    min_s: float = math.nan
    max_s: float = math.nan
    cold_s: float = math.nan  # the first (warm-up) edit, which fills the method's caches
    peak_memory_bytes: int = 0  # the largest of the timed (warm) edits
    cold_peak_memory_bytes: int = 0
    memory_kind: str = ""
    eval_probes: int = 0
    eval_probes_per_s: float = math.nan
    edit_size_bytes: int = 0


@dataclass
class ScalingRow:
    model: str
    method: str
    mode: str  # "batch" (one edit of n requests) or "sequential" (the n-th edit on top of n-1)
    n: int
    status: str
    reason: str = ""
    wall_s: float = math.nan
    per_edit_s: float = math.nan
    cpu_s: float = math.nan
    peak_memory_bytes: int = 0
    memory_kind: str = ""


@dataclass
class SequentialLongRow:
    """A long sequential run (:func:`bench_sequential_long`): does a step's cost grow with n?"""

    model: str
    method: str
    n: int
    status: str
    reason: str = ""
    early_steps: str = ""  # the steps the early figures are the median of, e.g. "6-15"
    late_steps: str = ""
    early_step_s: float = math.nan  # one step: the edit, then entering the session again to judge it
    late_step_s: float = math.nan
    ratio: float = math.nan  # late / early: 1 when a step's cost does not grow with the number of edits
    early_overhead_s: float = math.nan  # the step's time outside the method's own computation
    late_overhead_s: float = math.nan
    overhead_ratio: float = math.nan
    total_s: float = math.nan
    peak_memory_bytes: int = 0  # over the whole run, above the level at its start
    memory_kind: str = ""
    restack_cached_s: float = math.nan  # entering and leaving the session with all n edits, through the cache
    restack_plain_s: float = math.nan  # the same, applying and reverting the edits one by one
    restack_plain_peak_bytes: int = 0
    bit_identical: bool = False  # the model's weights after the run are the original ones, bit for bit


@dataclass
class TargetRow:
    target: str
    description: str
    measured: float
    limit: float
    unit: str
    ratio: float  # measured / limit: below 1 meets the target
    status: str  # "met", "missed", "not run"
    note: str = ""
    cpu_s: float = math.nan  # process CPU seconds of the measured work (time targets)


@dataclass
class BenchResults:
    machine: dict[str, Any]
    config: dict[str, Any]
    latency: list[LatencyRow] = field(default_factory=list)
    scaling: list[ScalingRow] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # raw figures for the targets
    real_costs: list[EditCost] = field(default_factory=list)  # eval.realcost, one per real model
    sequential_long: list[SequentialLongRow] = field(default_factory=list)
    sequential_long_steps: list[dict[str, Any]] = field(default_factory=list)  # one row per step

    def frames(self) -> dict[str, pd.DataFrame]:
        return {
            "latency": pd.DataFrame([asdict(r) for r in self.latency], columns=_columns(LatencyRow)),
            "scaling": pd.DataFrame([asdict(r) for r in self.scaling], columns=_columns(ScalingRow)),
            "targets": pd.DataFrame([asdict(r) for r in self.targets], columns=_columns(TargetRow)),
            "server": pd.DataFrame([self.server]) if self.server else pd.DataFrame(columns=["status"]),
            "real_cost": pd.DataFrame([c.as_dict() for c in self.real_costs]),
            "sequential_long": pd.DataFrame([asdict(r) for r in self.sequential_long],
                                            columns=_columns(SequentialLongRow)),
            "sequential_long_steps": pd.DataFrame(self.sequential_long_steps,
                                                  columns=["model", "method", "step", "step_s", "step_cpu_s",
                                                           "edit_s", "overhead_s", "rss_bytes"]),
        }


def _columns(cls: type) -> list[str]:
    return list(cls.__dataclass_fields__)


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 240 else text[:237] + "..."


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, RAM, accelerator and library versions of this machine."""
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / GIB, 1),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        # other work on the machine slows every figure: record how busy it was
        "load_avg_1m": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
    }
    return info


def describe_machine(machine: dict[str, Any]) -> str:
    """One line naming the machine a run was measured on."""
    accel = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    load = machine.get("load_avg_1m")
    busy = f", load average {load} at the start" if load is not None else ""
    return (f"{machine['cpu']}, {machine['cores_available']} of {machine['cores']} cores available "
            f"({machine['torch_threads']} torch threads{busy}), {machine['ram_gib']} GiB RAM{accel}; "
            f"device {machine['device']}; Python {machine['python']}, torch {machine['torch']}, "
            f"transformers {machine['transformers']}; {machine['date']}")


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


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()`` with its wall time and this process's CPU time (all threads).

    On a shared machine the wall time grows with other people's work; the CPU time does not, so
    both are reported.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def ensure_ready(handle: ModelHandle, method: str, train: bool, log: Log,
                 quick: bool = False) -> tuple[str | None, dict[str, Any]]:
    """``(None, hparams)`` when ``method`` can edit ``handle`` with ``hparams``; else ``(why not, {})``.

    A learned method without an editor is trained first: with ``train`` in its default config;
    with ``quick`` (tiny random models, where only the cost is measured) in its trainer's few-step
    ``quick`` config, whose checkpoint the returned hyper-parameters then name.
    """
    method_obj = get_method(method)
    problem = method_obj.readiness(handle)
    from editing.train import TRAINERS, train_editor

    if problem is None or method not in TRAINERS or not (train or quick):
        return problem, {}
    overrides = None if train else TRAINERS[method].quick
    log(f"  training {method} on {handle.name}{' (a few steps, to time it)' if overrides else ''} ...")
    try:
        folder, _ = train_editor(handle, method, overrides, progress=lambda f, m: None)
    except Exception as err:  # a failed training is reported like any other skip
        return f"training failed: {_reason(err)}", {}
    hparams: dict[str, Any] = {"checkpoint": str(folder)} if overrides else {}
    return method_obj.readiness(handle, hparams), hparams


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
        edit, _, cpu = _timed(lambda request=request: session.apply(method_obj, request, hparams or None))
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
        _, elapsed, _ = _timed(lambda: predict(session, probes))
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
            edit, _, row.cpu_s = _timed(lambda session=session, batch=batch: session.apply(method, batch))
            row.wall_s = edit.stats.wall_time_s
            row.per_edit_s = row.wall_s / size
            row.peak_memory_bytes = edit.stats.peak_memory_bytes
            row.memory_kind = edit.stats.memory_kind
        except Exception as err:
            row.status, row.reason = ("oom" if _is_oom(err) else "error"), _reason(err)
        finally:
            session.clear()
        rows.append(row)
        log(f"  {method} batch of {size}: " + (f"{row.wall_s:.2f} s, peak {_mib(row.peak_memory_bytes)}"
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
                edit, _, row.cpu_s = _timed(lambda request=request: session.apply(method, request))
            except Exception as err:
                row.status, row.reason = ("oom" if _is_oom(err) else "error"), _reason(err)
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
                          log: Log = _print, early: int = 10, window: int = 10,
                          hparams: dict[str, Any] | None = None) -> tuple[SequentialLongRow, list[dict[str, Any]]]:
    """``n`` edits one after another into one session, as a sequential run does them: each step edits,
    then enters the session again to judge the new edit (one probe, so judging costs the same at every
    step; judging every edit so far, as ``eval.runs`` does, grows with n by definition).

    Returns the summary — median step time around step ``early`` and over the last ``window`` steps,
    their ratio, the same for the time outside the method's own computation, peak memory over the run,
    and the final stack re-applied through the cache and edit by edit — and one row per step.
    """
    from editing.measure import current_rss_bytes, measure
    from eval.evaluate import predict
    from eval.probes import Probe

    row = SequentialLongRow(model=model, method=method, n=n, status="ok")
    try:
        requests = request_pool(n, seed)
    except ValueError as err:  # more edits asked for than the fact base holds
        row.status, row.reason = "error", _reason(err)
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
            with measure(handle.device) as cost:
                for step, (request, probe) in enumerate(zip(requests, judge, strict=True), start=1):
                    def one_step(request: EditRequest = request, probe: Any = probe) -> Any:
                        edit = session.apply(method, request, hparams or None)
                        predict(session, [probe], k=0)
                        return edit

                    edit, wall, cpu = _timed(one_step)
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
            row.restack_cached_s = statistics.median(_timed(lambda: enter(session))[1] for _ in range(3))
            plain = EditSession(handle)
            for edit in session.edits:
                plain.push(edit)
            with measure(handle.device) as plain_cost:
                _, row.restack_plain_s, _ = _timed(lambda: enter(plain))
            row.restack_plain_peak_bytes = plain_cost.peak_memory_bytes
    except Exception as err:
        row.status, row.reason = ("oom" if _is_oom(err) else "error"), _reason(err)
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
        f"peak {_mib(row.peak_memory_bytes)} {row.memory_kind}; re-applying all {n}: cached "
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
        _, before, cpu_before = _timed(lambda: predict(session, probes))
        session.apply(method, request)
        predict(session, probes[:4])
        _, after, cpu_after = _timed(lambda: predict(session, probes))
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
        _, elapsed, cpu = _timed(lambda: scope_map(session, probes, seed=seed))
    finally:
        session.clear()
    return elapsed, cpu


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Time to first result in the Playground
# ---------------------------------------------------------------------------------------------
def bench_time_to_first_result(timeout_s: float = 240.0, method: str | None = "ROME",
                               model: str = "demo") -> dict[str, Any]:
    """Seconds from starting the server to the Playground showing an edit's result.

    Starts ``streamlit run app.py`` (the demo model is cached, as for a returning user), opens it
    in headless Chromium, picks ``method`` in the sidebar when it is registered (else keeps the
    app's default), applies the Playground's pre-filled fact and waits for the result panel.
    Then opens the Scope map and waits for its plot. Returns ``status`` and, when it ran,
    ``server_up_s`` (health check answers), ``page_ready_s`` (Playground rendered),
    ``first_result_s`` (the edit's result shown), ``method``, ``scope_map_s`` (from the click on
    "Scope map" to its plot drawn) and ``scope_map_after_start_s``. ``model`` picks the app's model
    (``$EDITSCOPE_DEFAULT_MODEL``; default: the demo model, as the figures in the README).
    """
    reason = server_unavailable_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    import tempfile

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timeout_ms = int(timeout_s * 1000)
    result: dict[str, Any] = {"status": "error"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        started = time.perf_counter()
        proc = stack.enter_context(streamlit_server(port, {"EDITSCOPE_RUN_STORE": str(Path(tmp) / "runs.sqlite"),
                                                           "EDITSCOPE_DEFAULT_MODEL": model}))
        try:
            wait_healthy(url, proc, started + timeout_s)
            result["server_up_s"] = time.perf_counter() - started
            pw = stack.enter_context(sync_playwright())
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            stack.callback(browser.close)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(url, timeout=timeout_ms)
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            apply_button = page.get_by_role("button", name="Apply edit").first
            apply_button.wait_for(timeout=timeout_ms)
            result["page_ready_s"] = time.perf_counter() - started
            result["method"] = _pick_method(page, method, timeout_ms)
            apply_button.click()
            page.locator(RESULT).wait_for(timeout=timeout_ms)
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            result["first_result_s"] = time.perf_counter() - started
            # The Scope map's first render after the server started (UMAP's compilation is warmed in the
            # background at start-up, app.py): from the click in the navigation to the plot drawn.
            clicked = time.perf_counter()
            page.locator("[data-testid='stSidebarNavLink']", has_text="Scope map").click()
            page.locator(".js-plotly-plot").first.wait_for(timeout=timeout_ms)
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            result["scope_map_s"] = time.perf_counter() - clicked
            result["scope_map_after_start_s"] = time.perf_counter() - started
            result["status"] = "ok"
        except (PlaywrightError, RuntimeError, TimeoutError) as err:
            result["reason"] = _reason(err)
    return result


def _pick_method(page: Any, method: str | None, timeout_ms: int) -> str:
    """Choose ``method`` in the sidebar's picker when it is offered; returns the method in use."""
    if method:
        box = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']", has_text="Editing method")
        box.first.click()
        option = page.get_by_role("option", name=method, exact=True)
        if option.count():
            option.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_selector(IDLE, timeout=timeout_ms)
    # the sidebar shows the picked method's one-line summary (the picker's value is not page text)
    sidebar = page.locator("[data-testid='stSidebar']").inner_text()
    for name in available_methods():
        summary = get_method(name).summary.strip()
        if summary and summary[:80] in sidebar:
            return name
    return "?"


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def model_handles(config: BenchConfig, device: torch.device) -> Iterator[tuple[str, ModelHandle]]:
    """(label, handle) for each requested model: "demo", "tiny" (every family) or "tiny-<family>"."""
    for spec in config.models:
        if spec == "tiny":
            for family in TINY_FAMILIES:
                yield f"tiny-{family}", _tiny(family, device)
        elif spec.startswith("tiny-"):
            yield spec, _tiny(spec.removeprefix("tiny-"), device)
        else:
            yield spec, load_model(spec, device=device)


def _tiny(family: str, device: torch.device) -> ModelHandle:
    handle = tiny_model(family)
    handle.model.to(device)
    return handle


def run_benchmark(config: BenchConfig, log: Log = _print) -> BenchResults:
    """Run every case of ``config`` and return the results (nothing is written)."""
    from editing.models import pick_device

    device = pick_device(config.device)
    results = BenchResults(machine=machine_info(device), config=asdict(config))
    log(f"EditScope benchmark on {describe_machine(results.machine)}")
    registered = available_methods()
    wanted = list(config.methods) if config.methods else registered
    unknown = [m for m in wanted if m.lower() not in {r.lower() for r in registered}]
    for name in unknown:
        log(f"  unknown method {name!r} (registered: {', '.join(registered)}); skipped")
    methods = [get_method(m).name for m in wanted if m not in unknown]
    largest = max((*config.batch_sizes, *config.batch_sizes_other, config.n_edits + 1, config.n_sequential, 1))
    pool = request_pool(largest, config.seed)
    for label, handle in model_handles(config, device):
        is_demo = not label.startswith("tiny")
        log(f"\n== {label} ({handle.n_layers} layers, d_model {handle.d_model}) on {handle.device}")
        for method in methods:
            problem, hparams = ensure_ready(handle, method, config.train, log, quick=not is_demo)
            if problem is not None:
                results.latency.append(LatencyRow(model=label, method=method, status="skipped", reason=problem,
                                                  edit_kind=get_method(method).edit_kind))
                log(f"  {method}: skipped — {problem}")
                continue
            n_edits = (config.n_edits if is_demo else config.n_edits_tiny) + 1
            try:
                row = bench_latency(handle, label, method, pool[:n_edits],
                                    n_probes=config.n_probes if is_demo else 0, seed=config.seed, hparams=hparams)
            except Exception as err:
                row = LatencyRow(model=label, method=method, status="oom" if _is_oom(err) else "error",
                                 reason=_reason(err), edit_kind=get_method(method).edit_kind)
                log(traceback.format_exc(limit=3))
            results.latency.append(row)
            log(f"  {method}: " + (f"median {row.median_s:.3f} s over {row.n_edits} edits (cold {row.cold_s:.2f} s), "
                                   f"peak {_mib(row.peak_memory_bytes)} {row.memory_kind}"
                                   + (f", {row.eval_probes_per_s:.0f} probes/s" if row.eval_probes else "")
                                   if row.status == "ok" else f"{row.status} — {row.reason}"))
            if row.status != "ok" or not is_demo:
                continue
            sizes = config.batch_sizes if method in BATCH_METHODS else config.batch_sizes_other
            if sizes:
                results.scaling.extend(bench_batch(handle, label, method, pool, sizes, log))
            if config.n_sequential:
                results.scaling.extend(bench_sequential(handle, label, method, pool[: config.n_sequential], log))
        if is_demo:
            _measure_targets(results, handle, label, methods, config, log)
        if is_demo and config.n_sequential_long:
            _sequential_long(results, handle, label, config, log)
    if config.server and "demo" in config.models:
        log("\n== time to first result in the Playground")
        results.server = bench_time_to_first_result(config.server_timeout_s)
        log(f"  {results.server}")
    elif not config.server:
        results.server = {"status": "skipped", "reason": "--skip-server"}
    for spec in config.real_models:
        log(f"\n== ROME edit cost on {spec} (fresh-install first edit, later edits, arithmetic floor)")
        results.real_costs.append(measure_edit_cost(load_model(spec, device=device), spec, "ROME"))
        log(cost_markdown(results.real_costs[-1]))
    results.targets = evaluate_targets(results, config)
    return results


def _sequential_long(results: BenchResults, handle: ModelHandle, label: str, config: BenchConfig, log: Log) -> None:
    """The long sequential ROME run on the demo model (``--sequential-long N``)."""
    n = config.n_sequential_long
    log(f"\n== {n} sequential ROME edits on {label} (a step's cost against the number of edits)")
    problem = get_method("ROME").readiness(handle) if "ROME" in available_methods() else "ROME is not registered"
    if problem is not None:
        results.sequential_long.append(SequentialLongRow(model=label, method="ROME", n=n, status="skipped",
                                                         reason=problem))
        log(f"  skipped — {problem}")
        return
    row, steps = bench_sequential_long(handle, label, n, "ROME", seed=config.seed, log=log)
    results.sequential_long.append(row)
    results.sequential_long_steps.extend(steps)


def _measure_targets(results: BenchResults, handle: ModelHandle, label: str, methods: list[str],
                     config: BenchConfig, log: Log) -> None:
    """The targets' raw figures on the demo model (the MEMIT one comes from the batch rows)."""
    ok = [r.method for r in results.latency if r.model == label and r.status == "ok"]
    if "ROME" in ok:
        rome = next(r for r in results.latency if r.model == label and r.method == "ROME")
        results.measured["rome_edit_s"] = rome.median_s
        results.measured["rome_edit_s_cpu"] = rome.median_cpu_s
        results.measured["rome_edit_s_method"] = f"median of {rome.n_edits} warm edits; cold {rome.cold_s:.1f} s"
    editor = "ROME" if "ROME" in ok else (ok[0] if ok else None)
    if editor is None:
        return
    request = request_pool(1, config.seed + 1)[0]
    for key, fn, n in (("eval_100_probes_s", bench_eval_before_after, config.n_probes),
                       ("scope_map_100_s", bench_scope_map, config.n_scope_points)):
        try:
            results.measured[key], results.measured[f"{key}_cpu"] = fn(handle, editor, request, n, config.seed)
            results.measured[f"{key}_method"] = editor  # type: ignore[assignment]
            log(f"  {TARGETS[key][0]} ({n}, with a {editor} edit): {results.measured[key]:.3f} s "
                f"(CPU {results.measured[f'{key}_cpu']:.3f} s)")
        except Exception as err:
            results.measured[f"{key}_error"] = _reason(err)  # type: ignore[assignment]
            log(f"  {TARGETS[key][0]}: error — {_reason(err)}")


def evaluate_targets(results: BenchResults, config: BenchConfig) -> list[TargetRow]:
    """Each target with its measured value and the ratio to its limit."""
    rows = []
    memit = [r for r in results.scaling if r.method == "MEMIT" and r.mode == "batch" and r.n == 1000]
    for key, (what, limit, unit) in TARGETS.items():
        note = ""
        measured = results.measured.get(key)
        if key == "memit_1000_peak_gib":
            if memit and memit[0].status == "ok":
                measured = memit[0].peak_memory_bytes / GIB
                note = f"{memit[0].wall_s:.1f} s; {memit[0].memory_kind} peak"
            elif memit:
                measured, note = math.inf, f"{memit[0].status}: {memit[0].reason}"
            else:
                note = "batch of 1000 not run" + (" (--quick)" if config.quick else "")
        elif key == "rome_edit_s" and key in results.measured:
            note = str(results.measured.get(f"{key}_method", ""))
        elif isinstance(results.measured.get(f"{key}_method"), str):
            note = f"with a {results.measured[f'{key}_method']} edit"
        elif f"{key}_error" in results.measured:
            note = str(results.measured[f"{key}_error"])
        if measured is None or not isinstance(measured, float | int):
            rows.append(TargetRow(key, what, math.nan, limit, unit, math.nan, "not run", note or "method not run"))
            continue
        ratio = measured / limit
        rows.append(TargetRow(key, what, float(measured), limit, unit, ratio, "met" if ratio < 1 else "missed", note,
                              cpu_s=float(results.measured.get(f"{key}_cpu", math.nan))))
    return rows


# ---------------------------------------------------------------------------------------------
# Writing results
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(results: BenchResults) -> str:
    """The benchmark tables in Markdown (what docs/benchmark.md and the README show)."""
    lines = ["## Benchmark", "",
             "Regenerate with `python -m eval.bench --markdown docs/benchmark.md` (add `--quick` for a two-minute "
             "run). Times are wall-clock seconds; *CPU* is this process's CPU time for the same work (all its "
             "threads): on a shared machine the wall time grows with other programs' work, the CPU time does not. "
             "Memory is the peak above the level before the edit: the CUDA allocator's peak on a GPU; on a CPU the "
             "growth of the process's resident set, which stays 0 when the edit fits in memory the process "
             "already holds.", "",
             f"Measured on: {describe_machine(results.machine)}.", ""]
    lines += ["### Performance targets (demo model)", "",
              "| target | measured (wall) | CPU time | limit | ratio | status | note |",
              "|---|---|---|---|---|---|---|"]
    for t in results.targets:
        cpu = f"{_fmt(t.cpu_s)} s" if not math.isnan(t.cpu_s) else "–"
        lines.append(f"| {t.description} | {_fmt(t.measured)} {t.unit} | {cpu} | {_fmt(t.limit, 0)} {t.unit} | "
                     f"{_fmt(t.ratio, 2)} | {t.status} | {t.note} |")
    for model in dict.fromkeys(r.model for r in results.latency):
        rows = [r for r in results.latency if r.model == model]
        lines += ["", f"### Edit latency and memory — {model}", "",
                  "| method | kind | median edit (s) | CPU (s) | cold edit (s) | peak memory (MiB) | edit size (KiB) "
                  "| probes/s | status |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            status = "ok" if r.status == "ok" else f"{r.status}: {r.reason}"
            lines.append(f"| {r.method} | {r.edit_kind} | {_fmt(r.median_s)} | {_fmt(r.median_cpu_s)} | "
                         f"{_fmt(r.cold_s)} | "
                         f"{_fmt(r.peak_memory_bytes / 2 ** 20, 1) if r.status == 'ok' else '–'} | "
                         f"{_fmt(r.edit_size_bytes / 1024, 1) if r.status == 'ok' else '–'} | "
                         f"{_fmt(r.eval_probes_per_s, 0)} | {status} |")
    for mode, title in (("batch", "Batch scaling (one edit of n requests)"),
                        ("sequential", "Sequential editing (cost of the n-th edit)")):
        rows = [r for r in results.scaling if r.mode == mode]
        if not rows:
            continue
        sizes = sorted({r.n for r in rows})
        if mode == "sequential" and len(sizes) > 4:
            sizes = sorted({sizes[0], sizes[1], sizes[len(sizes) // 2], sizes[-1]})
        lines += ["", f"### {title}, seconds (peak MiB) — demo model", "",
                  "| method | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for method in dict.fromkeys(r.method for r in rows):
            cells = []
            for n in sizes:
                cell = next((r for r in rows if r.method == method and r.n == n), None)
                if cell is None:
                    cells.append("–")
                elif cell.status != "ok":
                    cells.append(cell.status)
                else:
                    cells.append(f"{cell.wall_s:.2f} ({cell.peak_memory_bytes / 2 ** 20:.0f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for r in results.sequential_long:
        lines += ["", f"### Long sequential run — {r.n} {r.method} edits, {r.model} model", ""]
        if r.status != "ok":
            lines.append(f"Not measured ({r.status}: {r.reason}).")
            continue
        lines += ["Each step edits, then enters the session again to judge the new edit (as a sequential run "
                  "does; judging every edit so far is left out, it grows with n by definition).", "",
                  "| | early steps | late steps | late / early |", "|---|---|---|---|",
                  f"| steps | {r.early_steps} | {r.late_steps} | |",
                  f"| time per step (median, s) | {_fmt(r.early_step_s)} | {_fmt(r.late_step_s)} | "
                  f"{_fmt(r.ratio, 2)} |",
                  f"| of which outside {r.method}'s computation (s) | {_fmt(r.early_overhead_s, 4)} | "
                  f"{_fmt(r.late_overhead_s, 4)} | {_fmt(r.overhead_ratio, 2)} |", "",
                  f"Whole run: {_fmt(r.total_s, 0)} s; peak memory {_fmt(r.peak_memory_bytes / 2 ** 20, 1)} MiB "
                  f"({r.memory_kind} growth over the run). Entering and leaving the session with all {r.n} edits: "
                  f"{_fmt(r.restack_cached_s * 1e3, 2)} ms through the cache, {_fmt(r.restack_plain_s * 1e3, 1)} ms "
                  f"applying and reverting them one by one (peak {_fmt(r.restack_plain_peak_bytes / 2 ** 20, 1)} MiB). "
                  f"Weights after the run identical to the original: {'yes' if r.bit_identical else 'NO'}."]
    for cost in results.real_costs:
        lines += ["", f"### ROME edit cost on a real model — {cost_markdown(cost)}"]
    server = results.server
    lines += ["", "### Time to first result in the Playground", ""]
    if server.get("status") == "ok":
        lines.append(f"From `streamlit run app.py` to the server answering: {server['server_up_s']:.1f} s; to the "
                     f"Playground rendered: {server['page_ready_s']:.1f} s; to the first edit's result shown "
                     f"({server['method']}, the pre-filled fact): {server['first_result_s']:.1f} s "
                     f"(headless Chromium, demo model cached on disk). Then the Scope map's first render: "
                     f"{server['scope_map_s']:.1f} s from the click ({server['scope_map_after_start_s']:.1f} s "
                     f"after the server started; goal ≤ 10 s on an idle machine).")
    else:
        lines.append(f"Not measured ({server.get('status', 'not run')}: {server.get('reason', '')}).")
    return "\n".join(lines) + "\n"


def write_results(results: BenchResults, out: Path) -> dict[str, Path]:
    """CSV per table, machine.json, benchmark.md and the plot; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, frame in results.frames().items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        written[name] = path
    written["machine"] = out / "machine.json"
    written["machine"].write_text(json.dumps({"machine": results.machine, "config": results.config,
                                              "measured": results.measured}, indent=1, default=str))
    written["markdown"] = out / "benchmark.md"
    written["markdown"].write_text(markdown_report(results))
    plot = write_plot(results, out)
    if plot is not None:
        written["plot"] = plot
    return written


def write_plot(results: BenchResults, out: Path) -> Path | None:
    """Latency per method and the batch/sequential curves: PNG when a static exporter is
    installed (kaleido for plotly, else matplotlib), else a self-contained HTML file."""
    import importlib.util

    frames = results.frames()
    latency = frames["latency"][frames["latency"]["status"] == "ok"]
    scaling = frames["scaling"][frames["scaling"]["status"] == "ok"]
    if latency.empty and scaling.empty:
        return None
    if importlib.util.find_spec("plotly") is not None:
        figure = _plotly_figure(latency, scaling)
        if importlib.util.find_spec("kaleido") is not None:
            try:
                path = out / "benchmark.png"
                figure.write_image(path, width=1500, height=500)
                return path
            except Exception:  # kaleido without a usable browser: fall through to the others
                pass
    if importlib.util.find_spec("matplotlib") is not None:
        return _matplotlib_plot(latency, scaling, out / "benchmark.png")
    if importlib.util.find_spec("plotly") is not None:
        path = out / "benchmark.html"
        figure.write_html(path, include_plotlyjs=True, full_html=True)
        return path
    return None


def _plotly_figure(latency: pd.DataFrame, scaling: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=3, subplot_titles=(
        "median edit latency (s)", "batch: seconds per edit call", "sequential: seconds of the n-th edit"))
    for model in dict.fromkeys(latency["model"]):
        rows = latency[latency["model"] == model]
        figure.add_trace(go.Bar(name=model, x=rows["method"], y=rows["median_s"]), row=1, col=1)
    for mode, col in (("batch", 2), ("sequential", 3)):
        rows = scaling[scaling["mode"] == mode]
        for method in dict.fromkeys(rows["method"]):
            part = rows[rows["method"] == method]
            figure.add_trace(go.Scatter(name=f"{method} ({mode})", x=part["n"], y=part["wall_s"],
                                        mode="lines+markers"), row=1, col=col)
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_xaxes(type="log", row=1, col=2)
    figure.update_yaxes(type="log", row=1, col=2)
    figure.update_layout(title="EditScope benchmark", barmode="group", height=500, width=1500)
    return figure


def _matplotlib_plot(latency: pd.DataFrame, scaling: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for model in dict.fromkeys(latency["model"]):
        rows = latency[latency["model"] == model]
        axes[0].plot(rows["method"], rows["median_s"], "o", label=model)
    axes[0].set_yscale("log")
    axes[0].set_title("median edit latency (s)")
    axes[0].tick_params(axis="x", rotation=60)
    for mode, ax in (("batch", axes[1]), ("sequential", axes[2])):
        rows = scaling[scaling["mode"] == mode]
        for method in dict.fromkeys(rows["method"]):
            part = rows[rows["method"] == method]
            ax.plot(part["n"], part["wall_s"], marker="o", label=method)
        ax.set_title(f"{mode}: seconds per edit call")
        if mode == "batch":
            ax.set_xscale("log")
            ax.set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path, Path | None]:
    """Parse the command line into (config, output folder, optional Markdown copy)."""
    parser = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few edits and small sizes (about two minutes)")
    parser.add_argument("--methods", type=_csv, default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--models", type=_csv, default=("demo", "tiny"),
                        help="comma-separated: demo, tiny (every family), tiny-<family>, a local model folder")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default out/bench)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown tables here")
    parser.add_argument("--skip-server", action="store_true", help="do not measure the Playground's first result")
    parser.add_argument("--train", action="store_true", help="train editors that need it before benchmarking")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--edits", type=int, default=None, help="timed single edits per method on the demo model")
    parser.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in _csv(s)), default=None,
                        help=f"batch sizes for {', '.join(BATCH_METHODS)} (default 1,10,100,1000)")
    parser.add_argument("--sequential", type=int, default=None, help="length of the sequential-editing run")
    parser.add_argument("--sequential-long", type=int, default=None, metavar="N",
                        help="also time N sequential ROME edits on the demo model, a step's cost against the "
                             "number of edits (default: not run; 1000 takes about half an hour on a 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=_csv, default=(),
                        help="pretrained models (e.g. smollm2-135m) whose ROME edit cost, peak memory and "
                             "arithmetic floor are measured (python -m eval.realcost)")
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {"models": args.models, "methods": args.methods, "server": not args.skip_server,
                               "train": args.train, "device": args.device, "seed": args.seed,
                               "real_models": args.real}
    if args.edits is not None:
        changes["n_edits"] = args.edits
    if args.batch_sizes is not None:
        changes["batch_sizes"] = args.batch_sizes
    if args.sequential is not None:
        changes["n_sequential"] = args.sequential
    if args.sequential_long is not None:
        if args.sequential_long < 0:
            parser.error("--sequential-long takes a number of edits of at least 0")
        changes["n_sequential_long"] = args.sequential_long
    config = quick_config(**changes) if args.quick else BenchConfig(**changes)
    return config, args.out, args.markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; prints the tables and where the files went."""
    config, out, markdown = config_from_args(argv)
    results = run_benchmark(config)
    written = write_results(results, out)
    report = markdown_report(results)
    print("\n" + report)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written["markdown"], markdown)
        written["markdown copy"] = markdown
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
