"""The command line: run, list, show, export, delete."""

from __future__ import annotations

import json

import pandas as pd

from eval.cli import main


def test_run_list_show_export_delete(demo_handle, rank_one_method, tmp_path, capsys):
    store, out = tmp_path / "runs.sqlite", tmp_path / "results.csv"
    status = main(["run", "--model", "demo", "--method", rank_one_method, "--data", "demo", "--mode", "sequential",
                   "--n", "2", "--out", str(out), "--store", str(store), "--quiet"])
    printed = capsys.readouterr().out
    assert status == 0 and "run 1 stored" in printed
    results = pd.read_csv(out)
    assert results["step"].tolist() == [1, 2] and results["reliability"].notna().all()

    assert main(["list", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert rank_one_method in listing and "sequential" in listing and "done" in listing

    assert main(["show", "1", "--store", str(store)]) == 0
    assert "reliability" in capsys.readouterr().out

    assert main(["export", "1", str(tmp_path / "run.json"), "--store", str(store)]) == 0
    exported = json.loads((tmp_path / "run.json").read_text())
    assert len(exported["summary"]) == 2 and exported["config"]["method"] == rank_one_method

    assert main(["delete", "1", "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["show", "1", "--store", str(store)]) == 2
    assert "No run 1" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["run", "--method", "ROME", "--data", str(tmp_path / "missing.json"),
                 "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", "--method", "ROME", "--hparams", "[1]", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "JSON object" in capsys.readouterr().err
