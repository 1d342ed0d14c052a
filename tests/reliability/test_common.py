"""The reliability tests' own helpers: a method that is not ready fails the test, never skips it."""

from __future__ import annotations

import pytest

from editing.models.tiny import tiny_model
from editing.train import EDITORS_ENV
from tests.reliability.common import run_hparams


def outcome_of(call) -> str:
    """How ``call()`` ends a test: "failed: <message>", "skipped: <message>" or "passed"."""
    try:
        call()
    except pytest.fail.Exception as err:
        return f"failed: {err}"
    except pytest.skip.Exception as err:  # caught here, or the test itself would show as skipped
        return f"skipped: {err}"
    return "passed"


def test_a_learned_method_without_an_editor_fails_with_the_reason(tmp_path, monkeypatch):
    """Broken training (no editor, or a checkpoint that is not one) must show as a failure that
    says why, not as a skip that looks like a method the suite does not cover."""
    monkeypatch.setenv(EDITORS_ENV, str(tmp_path / "editors"))  # nothing trained here
    handle = tiny_model("gpt2")
    outcome = outcome_of(lambda: run_hparams(handle, "MEND", {}))
    assert outcome.startswith("failed: MEND is not ready") and "no quick editor was trained" in outcome, outcome
    assert "python -m editing.train MEND" in outcome  # the method's own reason comes with it
    broken = tmp_path / "not-an-editor"
    broken.mkdir()
    outcome = outcome_of(lambda: run_hparams(handle, "KE", {"KE": str(broken)}))
    assert outcome.startswith("failed: KE is not ready") and "quick editor was trained for this test" in outcome, \
        outcome


def test_a_ready_method_gets_its_capped_loops(tmp_path, monkeypatch):
    monkeypatch.setenv(EDITORS_ENV, str(tmp_path / "editors"))
    hparams = run_hparams(tiny_model("gpt2"), "FT-L", {}, steps=2)
    assert hparams and set(hparams.values()) == {2}
