"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest

from editing.tiny import tiny_model
from editing.train import EDITORS_ENV, TRAINERS, train_editor

#: a few training steps each: the reliability tests check failure handling, not edit quality
TINY_TRAINING: dict[str, dict[str, int]] = {
    "MEND": {"steps": 3, "batch_size": 2, "n_eval": 0},
    "KE": {"steps": 3, "batch_size": 2, "n_eval": 0},
    "SERAC": {"n_records": 8, "classifier_steps": 2, "classifier_batch": 8, "cf_steps": 2, "cf_batch": 4,
              "cf_warmup": 1, "n_eval": 0},
}


@pytest.fixture(scope="session")
def tiny_editors(tmp_path_factory) -> dict[str, str]:
    """Checkpoint folders of the learned editors trained briefly for ``tiny_model("gpt2")``, so
    that every registered method, MEND, KE and SERAC included, goes through the reliability tests."""
    import editing.methods  # noqa: F401  (registers the trainers)

    handle = tiny_model("gpt2")
    patch = pytest.MonkeyPatch()
    patch.setenv(EDITORS_ENV, str(tmp_path_factory.mktemp("editors")))
    try:
        return {method: str(train_editor(handle, method, TINY_TRAINING[method])[0])
                for method in TRAINERS if method in TINY_TRAINING}
    finally:
        patch.undo()
