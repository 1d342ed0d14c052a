"""The core benchmark (python -m eval.bench): a small real run end to end, and its target bookkeeping.

The dashboard's benchmark (python -m ui.bench, a real browser) is tested in tests/app/test_ui_bench.py.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from editing.core.measure import current_rss_bytes
from editing.methods import available_methods, get_method
from editing.models.tiny import tiny_model
from editing.train import EDITORS_ENV
from eval.bench import cases, common, report, rows, run
from eval.realcost import EditCost


def _fast_ready_method() -> str | None:
    handle = tiny_model("gpt2")
    for name in ("FT-L", "GRACE", "ROME", *available_methods()):
        if name in available_methods() and get_method(name).readiness(handle) is None:
            return name
    return None


def test_a_quick_run_measures_every_case_and_writes_csv_plot_and_markdown(tmp_path, monkeypatch):
    method = _fast_ready_method()
    if method is None:
        pytest.skip("no method registered and ready on a tiny model")
    monkeypatch.setenv(EDITORS_ENV, str(tmp_path / "editors"))  # no trained editor here yet
    unready = [m for m in available_methods() if get_method(m).readiness(tiny_model("gpt2")) is not None][:1]
    config = run.quick_config(models=("tiny-gpt2",), methods=(method, *unready, "No-Such-Method"))
    log: list[str] = []
    results = run.run_benchmark(config, log=log.append)
    by_method = {r.method: r for r in results.latency}
    measured = by_method[method]
    assert measured.status == "ok" and measured.n_edits == config.n_edits_tiny
    assert 0 < measured.min_s <= measured.median_s <= measured.max_s and measured.cold_s > 0
    assert measured.median_cpu_s > 0
    # growth above the start of each edit (editing.core.measure, tested in tests/editing/test_measure.py),
    # never the process's whole resident size (what a lost baseline would report)
    assert measured.memory_kind in ("rss", "cuda") and measured.peak_memory_bytes < current_rss_bytes()
    assert measured.edit_size_bytes > 0
    for name in unready:  # on a tiny model an editor is trained for a few steps, only to time it
        assert by_method[name].status == "ok" and by_method[name].n_edits == config.n_edits_tiny
        assert any(f"training {name} on tiny-gpt2 (a few steps" in line for line in log)
        assert by_method[name].train_s > 0 and any(f"trained {name} in" in line for line in log)
        problem, hparams, train_s = cases.ensure_ready(tiny_model("llama"), name, train=False, log=log.append)
        # elsewhere: skipped with the reason, nothing trained
        assert "python -m editing.train" in problem and hparams == {} and math.isnan(train_s)
    assert "No-Such-Method" not in by_method and any("unknown method 'No-Such-Method'" in line for line in log)
    assert "python -m ui.bench" in report.markdown_report(results)  # the UI's figures: its own benchmark
    written = report.write_results(results, tmp_path)
    latency = pd.read_csv(written["latency"])
    assert list(latency.columns) == rows.columns_of(rows.LatencyRow)
    assert latency.loc[latency["method"] == method, "median_s"].iloc[0] == pytest.approx(measured.median_s)
    targets = pd.read_csv(written["targets"])
    assert set(targets["target"]) == set(rows.TARGETS)
    assert set(targets["status"]) == {"not run"}  # no demo model in this run
    markdown = written["markdown"].read_text()
    assert results.machine["cpu"] in markdown and f"| {method} |" in markdown
    assert written["plot"].suffix in (".png", ".html") and written["plot"].stat().st_size > 0


def test_targets_report_ratios_and_what_was_not_run():
    config = run.BenchConfig()
    results = rows.BenchResults(machine={}, config={})
    results.measured.update(rome_edit_s=0.5, eval_100_probes_s=2.0)
    results.scaling.append(rows.ScalingRow(model="demo", method="MEMIT", mode="batch", n=1000, status="ok",
                                            wall_s=30.0, peak_memory_bytes=6 * common.GIB, memory_kind="rss"))
    targets = {t.target: t for t in rows.evaluate_targets(results, config.quick)}
    assert targets["rome_edit_s"].ratio == pytest.approx(0.5) and targets["rome_edit_s"].status == "met"
    assert targets["eval_100_probes_s"].ratio == pytest.approx(2.0) and targets["eval_100_probes_s"].status == "missed"
    assert targets["memit_1000_peak_gib"].measured == pytest.approx(6.0)
    assert targets["memit_1000_peak_gib"].ratio == pytest.approx(0.25)
    assert targets["scope_map_100_s"].status == "not run" and math.isnan(targets["scope_map_100_s"].ratio)
    results.scaling[0] = rows.ScalingRow(model="demo", method="MEMIT", mode="batch", n=1000, status="oom",
                                          reason="MemoryError: out of memory")
    memit = next(t for t in rows.evaluate_targets(results, config.quick) if t.target == "memit_1000_peak_gib")
    assert memit.status == "missed" and "oom" in memit.note


def test_the_command_line_selects_models_methods_and_sizes(tmp_path):
    config, out, markdown = run.config_from_args(
        ["--quick", "--models", "demo,tiny-llama", "--methods", "ROME, MEMIT", "--out", str(tmp_path),
         "--batch-sizes", "1,5", "--markdown", str(tmp_path / "b.md")])
    assert config.quick and config.models == ("demo", "tiny-llama") and config.methods == ("ROME", "MEMIT")
    assert config.batch_sizes == (1, 5) and out == tmp_path
    assert markdown == tmp_path / "b.md"
    full, _, _ = run.config_from_args([])
    assert full.batch_sizes == (1, 10, 100, 1000) and full.models == ("demo", "tiny")


def test_real_model_edit_cost_is_selected_and_reported():
    config, _, _ = run.config_from_args(["--real", "smollm2-135m"])
    assert config.real_models == ("smollm2-135m",)
    assert run.config_from_args([])[0].real_models == ()  # opt-in: it loads a 135M-parameter model
    results = rows.BenchResults(machine=common.machine_info(torch.device("cpu")), config={})
    results.real_costs.append(EditCost(model="smollm2-135m", method="ROME", threads=2, first_edit_s=26.4,
                                       cached_edits_s=[18.0, 18.6, 26.0], peak_memory_bytes=2 ** 30,
                                       memory_kind="rss", flops=int(2.25e12), matmul_flops_per_s=2e11))
    markdown = report.markdown_report(results)
    assert "ROME edit cost on a real model — ROME on smollm2-135m" in markdown
    assert "| arithmetic floor of a later edit (operations / rate) | 11.2 s |" in markdown
    assert "| later edit / floor | 1.65 |" in markdown
    assert results.frames()["real_cost"].loc[0, "floor_s"] == pytest.approx(11.25)


def test_the_long_sequential_run_is_opt_in_and_reports_the_step_cost_ratio(tmp_path):
    config, _, _ = run.config_from_args(["--sequential-long", "1000"])
    assert config.n_sequential_long == 1000
    assert run.config_from_args([])[0].n_sequential_long == 0  # off by default: 1000 edits take minutes
    assert run.config_from_args(["--quick"])[0].n_sequential_long == 0
    with pytest.raises(SystemExit):
        run.config_from_args(["--sequential-long", "-1"])
    method = _fast_ready_method()
    if method is None:
        pytest.skip("no method registered and ready on a tiny model")
    handle = tiny_model("gpt2")
    log: list[str] = []
    row, steps = cases.bench_sequential_long(handle, "tiny-gpt2", 24, method, log=log.append, early=4, window=4)
    assert row.status == "ok", row.reason
    assert [s["step"] for s in steps] == list(range(1, 25)) and all(s["step_s"] >= s["edit_s"] > 0 for s in steps)
    assert (row.early_steps, row.late_steps) == ("3-6", "21-24")
    assert row.ratio == pytest.approx(row.late_step_s / row.early_step_s) and row.ratio > 0
    assert row.restack_cached_s > 0 and row.restack_plain_s > 0
    assert row.bit_identical and row.memory_kind in ("rss", "cuda")
    assert any("step 24/24" in line for line in log)
    results = rows.BenchResults(machine=common.machine_info(torch.device("cpu")), config={})
    results.sequential_long.append(row)
    results.sequential_long_steps.extend(steps)
    written = report.write_results(results, tmp_path)
    assert len(pd.read_csv(written["sequential_long_steps"])) == 24
    assert pd.read_csv(written["sequential_long"]).loc[0, "ratio"] == pytest.approx(row.ratio)
    markdown = written["markdown"].read_text()
    assert f"### Long sequential run — 24 {method} edits, tiny-gpt2 model" in markdown
    assert "| time per step (median, s) |" in markdown and "identical to the original: yes" in markdown


def test_the_load_during_a_run_is_sampled_and_reported():
    with common.load_during(every_s=0.01) as load:
        sum(i * i for i in range(200_000))
    assert 0 <= load["min"] <= load["mean"] <= load["max"] and load["wall_s"] >= 0
    machine = {**common.machine_info(torch.device("cpu")), "load_during": load}
    assert f"during the run of {load['wall_s']:.0f} s" in common.describe_machine(machine)


def test_tiny_models_get_the_few_step_editor_even_with_train(monkeypatch):
    """--train trains the demo model's editors in their default config; a tiny random model's editor is
    only there to time edits, so it stays the trainer's few-step config (before: 600 steps each)."""
    from editing import train

    asked: list[object] = []

    def fake_train(handle, method, overrides, progress):
        asked.append(overrides)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train, "train_editor", fake_train)
    monkeypatch.setenv(train.EDITORS_ENV, "/nonexistent-editors")  # nothing cached: training is needed
    problem, _, _ = cases.ensure_ready(tiny_model("gpt2"), "MEND", train=True, log=lambda _m: None, quick=True)
    assert "training failed" in problem and asked == [train.TRAINERS["MEND"].quick]
    cases.ensure_ready(tiny_model("gpt2"), "MEND", train=True, log=lambda _m: None, quick=False)
    assert asked[-1] is None  # the demo model with --train: the default config


def test_scaling_figures_come_with_their_ratio_to_one_request_in_the_same_run():
    results = rows.BenchResults(machine=common.machine_info(torch.device("cpu")), config={})
    for mode, n, wall in (("batch", 1, 2.0), ("batch", 10, 5.0), ("sequential", 1, 2.0), ("sequential", 6, 3.0)):
        results.scaling.append(rows.ScalingRow(model="demo", method="ROME", mode=mode, n=n, status="ok", wall_s=wall))
    results.scaling.append(rows.ScalingRow(model="demo", method="KN", mode="batch", n=10, status="ok", wall_s=9.0))
    frame = results.frames()["scaling"].set_index(["method", "mode", "n"])["ratio_to_n1"]
    assert frame["ROME", "batch", 10] == pytest.approx(0.25)  # 0.5 s per request against 2 s alone
    assert frame["ROME", "sequential", 6] == pytest.approx(1.5)  # the 6th edit against the first
    assert frame["ROME", "batch", 1] == pytest.approx(1.0)
    assert math.isnan(frame["KN", "batch", 10])  # no n=1 measured: no ratio
    markdown = report.markdown_report(results)
    assert "| ROME | 2.00 (0) | 5.00 (0) ×0.25 |" in markdown
    assert "| ROME | 2.00 (0) | 3.00 (0) ×1.50 |" in markdown
    assert "| KN | – | 9.00 (0) |" in markdown
