"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest

from editing.models.tiny import tiny_model
from editing.train import EDITORS_ENV, TRAINERS, train_editor


@pytest.fixture(scope="session")
def tiny_editors(tmp_path_factory) -> dict[str, str]:
    """Checkpoint folders of the learned editors trained for a few steps (each trainer's ``quick``
    settings) for ``tiny_model("gpt2")``, so that every registered method, MEND, KE and SERAC
    included, goes through the reliability tests, which check failure handling, not edit quality."""
    from editing.methods import import_all_methods

    import_all_methods()  # method modules register their trainers on import

    handle = tiny_model("gpt2")
    patch = pytest.MonkeyPatch()
    patch.setenv(EDITORS_ENV, str(tmp_path_factory.mktemp("editors")))
    try:
        return {method: str(train_editor(handle, method, trainer.quick)[0]) for method, trainer in TRAINERS.items()}
    finally:
        patch.undo()
