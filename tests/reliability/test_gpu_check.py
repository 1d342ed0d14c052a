"""scripts/gpu_check.py, the prepared script for a lent GPU machine, runs its checks on the CPU too."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from editing.methods.base import method_names

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_the_gpu_check_passes_on_the_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path / "editors"))  # the script points it at its own folder
    assert module.main(["--device", "cpu", "--skip-smollm2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    edits = {r["method"]: r for r in results if r["check"] == "method"}
    assert set(edits) == set(method_names())
    assert all(r["ok"] and r["changed_predictions"] and r["weights_untouched_at_rest"] for r in edits.values())
    assert [r.get("skipped") for r in results if r["check"] == "sharded"] == ["fewer than two CUDA devices"]
