"""The benchmark's result rows and the issue's performance targets they are judged against."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from eval.bench.common import GIB
from eval.realcost import EditCost

#: the issue's performance targets: name -> (what, limit, unit); all measured on the demo model
TARGETS = {
    "rome_edit_s": ("ROME edit with cached statistics (median)", 1.0, "s"),
    "eval_100_probes_s": ("100 probes evaluated before and after an edit", 1.0, "s"),
    "scope_map_100_s": ("scope map of 100 points after warm-up", 3.0, "s"),
    "memit_1000_peak_gib": ("MEMIT, 1000 edits in one batch: peak memory", 24.0, "GiB"),
}



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
    train_s: float = math.nan  # training the editor in this run (learned methods; NaN: none trained)


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
    measured: dict[str, float] = field(default_factory=dict)  # raw figures for the targets
    real_costs: list[EditCost] = field(default_factory=list)  # eval.realcost, one per real model
    sequential_long: list[SequentialLongRow] = field(default_factory=list)
    sequential_long_steps: list[dict[str, Any]] = field(default_factory=list)  # one row per step

    def frames(self) -> dict[str, pd.DataFrame]:
        return {
            "latency": pd.DataFrame([asdict(r) for r in self.latency], columns=columns_of(LatencyRow)),
            "scaling": pd.DataFrame([{**asdict(r), "ratio_to_n1": scaling_ratio(self.scaling, r)}
                                     for r in self.scaling], columns=[*columns_of(ScalingRow), "ratio_to_n1"]),
            "targets": pd.DataFrame([asdict(r) for r in self.targets], columns=columns_of(TargetRow)),
            "real_cost": pd.DataFrame([c.as_dict() for c in self.real_costs]),
            "sequential_long": pd.DataFrame([asdict(r) for r in self.sequential_long],
                                            columns=columns_of(SequentialLongRow)),
            "sequential_long_steps": pd.DataFrame(self.sequential_long_steps,
                                                  columns=["model", "method", "step", "step_s", "step_cpu_s",
                                                           "edit_s", "overhead_s", "rss_bytes"]),
        }


def scaling_ratio(rows: list[ScalingRow], row: ScalingRow) -> float:
    """``row``'s time against the same method's n = 1 in the same run: per request for a batch
    (``wall / n / wall₁``: below 1, batching pays), the n-th edit against the first for sequential
    editing. NaN without a measured n = 1."""
    first = next((r for r in rows if r.method == row.method and r.mode == row.mode and r.n == 1
                  and r.status == "ok" and r.wall_s > 0), None)
    if first is None or row.status != "ok":
        return math.nan
    per = row.wall_s / row.n if row.mode == "batch" else row.wall_s
    return per / first.wall_s


def columns_of(cls: type) -> list[str]:
    """The field names of a row dataclass: a CSV's columns, even when it has no rows."""
    return list(cls.__dataclass_fields__)


def evaluate_targets(results: BenchResults, quick: bool = False) -> list[TargetRow]:
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
                note = "batch of 1000 not run" + (" (--quick)" if quick else "")
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

