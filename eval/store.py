"""A local SQLite store of experiment runs, so nothing is lost on a refresh or a crash.

Each run is a row of ``runs``; each finished step (its summary row and every per-probe result)
is written in one transaction, so a killed process loses at most the step it was computing.
Rows are stored as JSON, so new metric columns need no schema change. Every call opens its own
connection: the store is safe to use from several threads (Streamlit) and processes.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from editing.storage.files import atomic_write_text
from editing.storage.paths import cache_dir
from eval.metrics import COUNT_KEYS

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    pid INTEGER,
    model TEXT,
    method TEXT,
    mode TEXT,
    dataset TEXT,
    n INTEGER,
    batch_size INTEGER,
    config TEXT NOT NULL,
    error TEXT,
    final TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    row TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS probe_results (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    position INTEGER NOT NULL,
    row TEXT NOT NULL,
    PRIMARY KEY (run_id, step, position)
);
"""

#: metrics shown per run in :meth:`RunStore.list_runs`
LISTED_METRICS = ("reliability", "generality", "locality", "portability", "score", "edit_success",
                  "n_efficacy_without_reliability")


@dataclass
class RunResult:
    """A run's results: one summary row per step and the per-probe results of every step."""

    run_id: int | None
    summary: pd.DataFrame
    probes: pd.DataFrame
    cancelled: bool = False
    status: str = "done"
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The metrics at the end (last step of a sequential run, the mean over steps otherwise)."""
        return final_metrics(self.summary, self.config.get("mode", ""))


def final_metrics(summary: pd.DataFrame, mode: str) -> dict[str, Any]:
    """A run's headline numbers: its last step when sequential, else the mean over its steps."""
    if summary.empty:
        return {}
    numeric = summary.select_dtypes("number")
    values = numeric.iloc[-1] if mode == "sequential" else numeric.mean()
    if mode != "sequential":  # counts of separate steps add up (a mean count would read as a count)
        for key in (k for k in COUNT_KEYS if k in numeric.columns):
            values[key] = numeric[key].sum(min_count=1)
    return {k: _plain(v) for k, v in values.items() if k not in ("step",)}


def _plain(value: Any) -> Any:
    """A JSON-friendly Python value (numpy scalars, tuples, NaN kept as float)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in row.items()}, default=str)


def _strict(value: Any) -> Any:
    """NaN/inf to None, for standards-conforming JSON export."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return value


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """Runs persisted in one SQLite file (default: the user cache's ``runs/runs.sqlite``)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir("runs") / "runs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection whose ``with`` block is one transaction (committed, or rolled back on error)."""
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            conn.execute("PRAGMA foreign_keys=ON")
            with conn:
                yield conn
        finally:
            conn.close()

    # -- writing -------------------------------------------------------------------------------
    def create_run(self, config: dict[str, Any]) -> int:
        """Register a new run (status ``running``) and return its id."""
        with self._connect() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (created_at, status, pid, model, method, mode, dataset, n, batch_size, config) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), os.getpid(), config.get("model"), config.get("method"), config.get("mode"),
                 config.get("dataset"), config.get("n"), config.get("batch_size"), _dumps(config)),
            )
            return int(cursor.lastrowid)

    def add_step(self, run_id: int, summary_row: dict[str, Any], probe_rows: Sequence[dict[str, Any]]) -> None:
        """Write one step's summary and per-probe rows in a single transaction."""
        step = int(summary_row["step"])
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO steps (run_id, step, row) VALUES (?, ?, ?)",
                         (run_id, step, _dumps(summary_row)))
            conn.execute("DELETE FROM probe_results WHERE run_id = ? AND step = ?", (run_id, step))
            conn.executemany("INSERT INTO probe_results (run_id, step, position, row) VALUES (?, ?, ?, ?)",
                             [(run_id, step, i, _dumps(row)) for i, row in enumerate(probe_rows)])

    def finish_run(self, run_id: int, status: str = "done", error: str | None = None,
                   final: dict[str, Any] | None = None) -> None:
        """Mark a run ``done``, ``cancelled`` or ``failed`` (with its final metrics)."""
        with self._connect() as conn:
            conn.execute("UPDATE runs SET status = ?, finished_at = ?, error = ?, final = ? WHERE run_id = ?",
                         (status, time.time(), error, _dumps(final or {}), run_id))

    def delete(self, run_id: int) -> None:
        """Remove a run and all its results."""
        with self._connect() as conn:
            conn.execute("DELETE FROM probe_results WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM steps WHERE run_id = ?", (run_id,))
            cursor = conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            if cursor.rowcount == 0:
                raise KeyError(f"No run {run_id} in {self.path}.")

    # -- reading -------------------------------------------------------------------------------
    def list_runs(self) -> pd.DataFrame:
        """One row per run, newest first: what it was, its status and its final metrics.

        A run still marked ``running`` whose process is gone is reported as ``interrupted``.
        """
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT r.run_id, r.created_at, r.finished_at, r.status, r.pid, r.model, r.method, r.mode, "
                "r.dataset, r.n, r.batch_size, r.error, r.final, "
                "(SELECT COUNT(*) FROM steps s WHERE s.run_id = r.run_id) AS n_steps, "
                "(SELECT row FROM steps s WHERE s.run_id = r.run_id ORDER BY step DESC LIMIT 1) AS last_row "
                "FROM runs r ORDER BY r.run_id DESC").fetchall()
        records = []
        for (run_id, created, finished, status, pid, model, method, mode, dataset, n, batch_size, error, final,
             n_steps, last_row) in rows:
            if status == "running" and not _pid_alive(pid):
                status = "interrupted"
            metrics = json.loads(final) if final else {}
            if not metrics and last_row:
                metrics = json.loads(last_row)  # unfinished: show the latest step
            records.append({
                "run_id": run_id, "created_at": pd.Timestamp(created, unit="s"), "status": status, "model": model,
                "method": method, "mode": mode, "dataset": dataset, "n": n, "batch_size": batch_size,
                "n_steps": n_steps, **{k: metrics.get(k, math.nan) for k in LISTED_METRICS},
                "duration_s": (finished - created) if finished else math.nan, "error": error,
            })
        columns = ["run_id", "created_at", "status", "model", "method", "mode", "dataset", "n", "batch_size",
                   "n_steps", *LISTED_METRICS, "duration_s", "error"]
        return pd.DataFrame(records, columns=columns)

    def load_run(self, run_id: int) -> RunResult:
        """Everything stored about a run (also a partial one)."""
        with self._connect() as conn:
            run = conn.execute("SELECT status, pid, config, error FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if run is None:
                raise KeyError(f"No run {run_id} in {self.path}.")
            steps = conn.execute("SELECT row FROM steps WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
            probes = conn.execute("SELECT row FROM probe_results WHERE run_id = ? ORDER BY step, position",
                                  (run_id,)).fetchall()
        status, pid, config, error = run
        if status == "running" and not _pid_alive(pid):
            status = "interrupted"
        summary = pd.DataFrame([json.loads(r[0]) for r in steps])
        probe_table = pd.DataFrame([json.loads(r[0]) for r in probes])
        for table in (summary, probe_table):
            for column in table.columns:
                if table[column].map(lambda v: isinstance(v, list)).any():
                    table[column] = table[column].map(lambda v: [tuple(x) if isinstance(x, list) else x for x in v]
                                                      if isinstance(v, list) else v)
        return RunResult(run_id=run_id, summary=summary, probes=probe_table, cancelled=status == "cancelled",
                         status=status, config=json.loads(config), error=error)

    def export(self, run_id: int, path: str | Path, table: str = "summary") -> Path:
        """Write a run to ``path``: JSON (config, summary and per-probe results) or CSV (``table``:
        ``"summary"`` or ``"probes"``), chosen by the suffix; written atomically."""
        path = Path(path)
        result = self.load_run(run_id)
        suffix = path.suffix.lower()
        if suffix == ".json":
            payload = {"run_id": run_id, "status": result.status, "config": result.config, "error": result.error,
                       "summary": result.summary.to_dict(orient="records"),
                       "probes": result.probes.to_dict(orient="records")}
            text = json.dumps(_strict(_plain(payload)), indent=1, default=str, allow_nan=False)
        elif suffix == ".csv":
            if table not in ("summary", "probes"):
                raise ValueError("table must be 'summary' or 'probes'.")
            text = (result.summary if table == "summary" else result.probes).to_csv(index=False)
        else:
            raise ValueError(f"Cannot export to {path.name}: use a .csv or .json file name.")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return path
