"""The run store: persistence across store objects and processes, export, delete."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from eval.store import RunStore, final_metrics

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {"model": "demo", "method": "ROME", "mode": "sequential", "n": 2, "batch_size": 1, "dataset": "demo"}


def step_row(step: int, reliability: float) -> dict:
    return {"step": step, "n_edits": step, "reliability": reliability, "locality": float("nan"), "score": 0.5}


def probe_rows(step: int) -> list[dict]:
    return [{"step": step, "probe_id": "rel-0", "kind": "reliability", "top_after": [("Rome", 0.5), ("Paris", 0.25)]},
            {"step": step, "probe_id": "loc-0", "kind": "locality", "top_after": []}]


def test_write_reopen_export_delete(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    run_id = store.create_run(CONFIG)
    store.add_step(run_id, step_row(1, 1.0), probe_rows(1))
    store.add_step(run_id, step_row(2, 0.5), probe_rows(2))
    store.finish_run(run_id, "done", final={"reliability": 0.5, "score": 0.5})

    reopened = RunStore(path)  # a new store object (a new process would see the same)
    result = reopened.load_run(run_id)
    assert result.status == "done" and not result.cancelled and result.config == CONFIG
    assert result.summary["reliability"].tolist() == [1.0, 0.5]
    assert math.isnan(result.summary["locality"][0])
    assert len(result.probes) == 4 and result.probes["top_after"][0] == [("Rome", 0.5), ("Paris", 0.25)]
    listed = reopened.list_runs()
    assert listed.loc[0, "run_id"] == run_id and listed.loc[0, "n_steps"] == 2
    assert listed.loc[0, "reliability"] == 0.5 and listed.loc[0, "status"] == "done"

    csv_path = reopened.export(run_id, tmp_path / "out" / "run.csv")
    assert pd.read_csv(csv_path)["reliability"].tolist() == [1.0, 0.5]
    probes_csv = reopened.export(run_id, tmp_path / "probes.csv", table="probes")
    assert len(pd.read_csv(probes_csv)) == 4
    data = json.loads((reopened.export(run_id, tmp_path / "run.json")).read_text())  # strict JSON: NaN → null
    assert data["config"]["method"] == "ROME" and data["summary"][0]["locality"] is None
    assert len(data["probes"]) == 4
    assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/.*.part"))  # no temporary files left
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        reopened.export(run_id, tmp_path / "run.xlsx")

    reopened.delete(run_id)
    assert reopened.list_runs().empty
    with pytest.raises(KeyError):
        reopened.load_run(run_id)


def test_a_killed_process_loses_nothing_committed(tmp_path):
    path = tmp_path / "runs.sqlite"
    script = textwrap.dedent(f"""
        import os, signal
        from eval.store import RunStore
        store = RunStore({str(path)!r})
        run_id = store.create_run({CONFIG!r})
        store.add_step(run_id, {{"step": 1, "reliability": 1.0}}, [{{"probe_id": "rel-0"}}])
        store.add_step(run_id, {{"step": 2, "reliability": 0.0}}, [{{"probe_id": "rel-0"}}])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT),
                          capture_output=True, timeout=120)
    assert done.returncode == -9
    store = RunStore(path)
    (run_id,) = store.list_runs()["run_id"].tolist()
    result = store.load_run(run_id)
    assert result.summary["step"].tolist() == [1, 2] and len(result.probes) == 2
    assert result.status == "interrupted"  # marked running, but its process is gone
    assert store.list_runs().loc[0, "status"] == "interrupted"


def test_run_tables_list_edit_success_and_add_up_failure_counts(tmp_path):
    """A batch run's headline averages rates over its batches but sums counts: two batches with 2 and 1 edits
    that beat the old target without being answered had 3 such failures, not 1.5."""
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run({**CONFIG, "mode": "batch"})
    for step, (success, failures) in enumerate(((0.0, 2.0), (0.5, 1.0)), start=1):
        store.add_step(run_id, {"step": step, "n_edits": 2, "edit_success": success,
                                "n_efficacy_without_reliability": failures}, [])
    summary = store.load_run(run_id).summary
    final = final_metrics(summary, "batch")
    assert final["edit_success"] == 0.25 and final["n_efficacy_without_reliability"] == 3
    assert final["n_edits"] == 2  # not a count key: still the mean over steps
    assert final_metrics(summary, "sequential")["n_efficacy_without_reliability"] == 1  # the last step
    store.finish_run(run_id, "done", final=final)
    listed = store.list_runs().iloc[0]
    assert listed["edit_success"] == 0.25 and listed["n_efficacy_without_reliability"] == 3
