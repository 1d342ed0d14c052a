"""The command line: run, list, show, export, delete."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eval.cli import main
from eval.datasets import load_dataset
from eval.runs import run_experiment
from eval.store import RunStore


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


# -- bad input is refused before a run is stored (issue 13) -------------------------------------------
@pytest.mark.parametrize("hparams, phrases", [
    ('{"layer": 99}', ("layer", "from 0 to 3")),
    ('{"clamp_norm_factor": NaN}', ("clamp_norm_factor", "> 0")),
    ('{"context_template_length_params": [[1000000, 1]]}', ("context_template_length_params[0][0]",)),
    ('{"no_such_setting": 1}', ("Unknown hyper-parameters",)),
])
def test_a_bad_hyper_parameter_is_refused_before_any_run_is_stored(demo_handle, tmp_path, capsys, hparams, phrases):
    store = tmp_path / "runs.sqlite"
    status = main(["run", "--method", "ROME", "--n", "2", "--hparams", hparams, "--store", str(store), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2, err
    for phrase in phrases:
        assert phrase in err, err
    assert RunStore(store).list_runs().empty  # no "failed" run row left behind


def test_a_target_the_model_cannot_spell_is_refused_before_any_run_is_stored(demo_handle, tmp_path, capsys):
    record = {"case_id": 7, "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                                                  "target_new": {"str": "Zürich"}, "target_true": {"str": "Paris"}},
              "paraphrase_prompts": [], "neighborhood_prompts": []}
    data, store = tmp_path / "counterfact.json", tmp_path / "runs.sqlite"
    data.write_text(json.dumps([record]))
    status = main(["run", "--method", "ROME", "--data", str(data), "--store", str(store), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "Case 7" in err and "'Zürich'" in err, err
    assert RunStore(store).list_runs().empty


@pytest.mark.parametrize("option, value", [("--n", "-1"), ("--n", "0"), ("--n", "two"), ("--batch-size", "0")])
def test_counts_below_one_are_argument_errors(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--method", "ROME", option, value, "--store", str(tmp_path / "s.sqlite")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("at least 1" in err or "whole number" in err), err
    assert not (tmp_path / "s.sqlite").exists()


def test_run_experiment_refuses_n_below_one(demo_handle):
    cases = load_dataset("demo", limit=3)
    for n in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="at least 1"):
            run_experiment(demo_handle, "ROME", cases, n=n)


def test_device_map_option(demo_handle, rank_one_method, tmp_path, capsys):
    """``--device-map`` takes accelerate's strategies or a JSON object and reaches the loader."""
    from eval.cli import device_map_arg

    assert device_map_arg("balanced") == "balanced" and device_map_arg(None) is None
    assert device_map_arg('{"transformer.h": 0, "lm_head": "cuda:1"}') == {"transformer.h": 0, "lm_head": "cuda:1"}
    store = tmp_path / "runs.sqlite"
    for bad in ("everywhere", "[0, 1]", '{"lm_head": [0]}'):
        assert main(["run", "--method", rank_one_method, "--device-map", bad, "--store", str(store), "--quiet"]) == 2
        assert "--device-map" in capsys.readouterr().err
    assert not store.exists()  # refused before the model loads or a store is opened
    # a map placing every module on the CPU: loaded through accelerate, and the run works
    assert main(["run", "--model", "demo", "--method", rank_one_method, "--data", "demo", "--n", "1",
                 "--device-map", '{"": "cpu"}', "--store", str(store), "--quiet"]) == 0
    assert "run 1 stored" in capsys.readouterr().out
