"""The distributed sweep (issue 14): grid syntax, validation before anything starts, and a small
sweep on a local Ray instance that lands in a temporary store, skips what is done and retries
what failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.cli import main
from eval.store import RunStore
from eval.sweep import CaseSlice, parse_grid, parse_slices

ROOT = Path(__file__).resolve().parents[2]


# -- syntax and checks that need neither Ray nor the model ------------------------------------------
def test_grid_syntax():
    method, points = parse_grid("ROME:v_lr=0.1,0.5;layer=0,1")
    assert method == "ROME"
    assert points == [{"v_lr": 0.1, "layer": 0}, {"v_lr": 0.1, "layer": 1},
                      {"v_lr": 0.5, "layer": 0}, {"v_lr": 0.5, "layer": 1}]
    # JSON values, plain text, and commas inside brackets or quotes that do not split
    assert parse_grid('FT:layers=[0],[0,1];objective=prompt_last,"a,b"')[1] == [
        {"layers": [0], "objective": "prompt_last"}, {"layers": [0], "objective": "a,b"},
        {"layers": [0, 1], "objective": "prompt_last"}, {"layers": [0, 1], "objective": "a,b"}]
    assert parse_grid("ROME:") == ("ROME", [{}])
    for bad, phrase in [("ROME", "METHOD:NAME"), ("ROME:v_lr", "NAME=V1,V2"), ("ROME:v_lr=0.1;v_lr=0.2", "twice"),
                        ("ROME:v_lr=0.1,", "empty value"), ("ROME:v_lr=1,1", "repeats")]:
        with pytest.raises(ValueError, match=phrase):
            parse_grid(bad)
    assert parse_slices("0:20,20:", 30) == [CaseSlice(0, 20), CaseSlice(20, 30)]
    assert parse_slices(None, 7) == [CaseSlice(0, 7)]
    for bad, phrase in [("0:40", "ends after"), ("5:5", "START < STOP"), ("3", "START:STOP"), ("0:2,0:2", "twice")]:
        with pytest.raises(ValueError, match=phrase):
            parse_slices(bad, 30)


@pytest.mark.parametrize("argv, phrase", [
    (["--grid", "ROME:v_lr=0.5,-1"], "v_lr must be a number > 0"),
    (["--grid", "FT-L:layer=0"], "Unknown hyper-parameters for FTLHParams"),
    (["--grid", "NoSuchMethod:x=1"], "Unknown editing method"),
    (["--methods", "ROME", "--grid", "FT-L:lr=0.1"], "which --methods does not list"),
    (["--methods", "ROME", "--slices", "0:100000"], "ends after the data set's"),
    ([], "No methods"),
    (["--methods", "ROME", "--device-map", "everywhere"], "--device-map 'everywhere'"),
])
def test_a_bad_grid_is_refused_before_anything_starts(tmp_path, capsys, argv, phrase):
    store = tmp_path / "runs.sqlite"
    assert main(["sweep", "--store", str(store), *argv]) == 2
    assert phrase in capsys.readouterr().err
    assert not store.exists() or RunStore(store).list_runs().empty


def test_a_worker_loads_its_model_with_the_sweeps_device_map(monkeypatch):
    """With several GPUs per worker, each worker spreads its own model over them (no Ray needed
    here: the worker's class is used directly, the loader spied on)."""
    import editing.models.loader as loader
    from eval.sweep import PointWorker, SweepSettings

    seen = {}
    monkeypatch.setattr(loader, "load_model", lambda spec, **kwargs: seen.update(spec=spec, **kwargs) or "handle")
    threads = torch.get_num_threads()
    try:  # the worker sets this process's torch threads
        worker = PointWorker(SweepSettings(model="some-8b", device_map='{"model.layers": 0, "lm_head": 1}'), threads=1)
    finally:
        torch.set_num_threads(threads)
    assert worker.handle() == "handle"
    assert seen == {"spec": "some-8b", "device": None, "dtype": None,
                    "device_map": {"model.layers": 0, "lm_head": 1}}


def test_the_cli_does_not_import_ray():
    code = "import sys, eval.cli; eval.cli._parser(); assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


# -- on a local Ray instance ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for this module's sweeps (a start costs seconds), shut down after."""
    import ray

    from editing.models.demo import demo_is_built

    if not demo_is_built():
        pytest.fail("The demo model is not in the cache: run `python -m editing.prepare` first.", pytrace=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _runs(store):
    return RunStore(store).list_runs().sort_values("run_id")


def test_sweep_stores_skips_done_points_and_retries_failed_ones(local_ray, tmp_path, capsys):
    store, corpus = tmp_path / "runs.sqlite", tmp_path / "corpus.txt"
    # 2 methods × 2 points × one 3-case slice; ROME's second point reads a statistics corpus that
    # does not exist yet, so it fails on its worker (after validation) until the file is written
    argv = ["sweep", "--model", "demo", "--data", "demo", "--methods", "FT-L,ROME",
            "--grid", "FT-L:lr=0.01,0.005", "--grid", f"ROME:mom2_corpus=bundled,{corpus}",
            "--slices", "0:3", "--store", str(store)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "4 grid points: 0 already done, 4 to run." in out and "3 ran, 0 skipped" in out and "1 failed" in out
    runs = _runs(store)
    assert sorted(runs["status"]) == ["done", "done", "done", "failed"]
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert failed["method"] == "ROME" and "corpus" in failed["error"]
    for run_id in runs.loc[runs["status"] == "done", "run_id"]:
        result = RunStore(store).load_run(int(run_id))
        assert result.config["case_ids"] == ["factbase-0", "factbase-1", "factbase-2"]
        assert result.config["model"] == "demo" and result.config["mode"] == "single"
        assert len(result.summary) == 3 and result.summary["reliability"].notna().all() and not result.probes.empty
    hparams = sorted(str(RunStore(store).load_run(int(i)).config["hparams"]) for i in runs["run_id"])
    assert hparams == sorted([str({"lr": 0.01}), str({"lr": 0.005}), str({"mom2_corpus": "bundled"}),
                              str({"mom2_corpus": str(corpus)})])

    # the second invocation skips the done points and retries the failed one, which now succeeds
    lines = (ROOT / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines()[:200]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 grid points: 3 already done, 1 to run." in out and "1 ran, 3 skipped" in out
    runs = _runs(store)
    assert len(runs) == 5 and list(runs["status"])[-1] == "done" and list(runs["method"])[-1] == "ROME"

    # a third invocation has nothing left to do
    assert main(argv) == 0
    assert "4 grid points: 4 already done, 0 to run." in capsys.readouterr().out
    assert len(_runs(store)) == 5


def test_model_bounds_are_checked_on_a_worker_before_any_point_runs(local_ray, tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    argv = ["sweep", "--methods", "FT-L,ROME", "--grid", "ROME:layer=0,99", "--slices", "0:3", "--store", str(store)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refused before any point ran" in err and "layer must be a whole number from 0 to 3" in err
    assert RunStore(store).list_runs().empty
