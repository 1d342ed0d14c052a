"""Shared fixtures: tiny random models of every family and the (cached) demo model."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, so two test workers on two cores do not slow each
# other down (set before torch loads, as app.py does for the server).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from editing.models.tiny import TINY_FAMILIES, tiny_model

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The models under test are small: one intra-op thread avoids thread start-up and contention costs
# that dominate their matrix products (measured ~14x faster wall time on the shared 2-core machine).
torch.set_num_threads(int(os.environ.get("EDITSCOPE_TEST_THREADS", "1")))


@pytest.fixture(params=TINY_FAMILIES)
def tiny_handle(request):
    """A fresh tiny random model for each supported family."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def demo_handle():
    """The demo model, loaded once per test session (and per xdist worker).

    It is never built inside a timed test: the README's test command prepares it first
    (`python -m editing.prepare`); a missing model fails at once with the command to run.
    """
    from editing.models.demo import demo_is_built, demo_model_dir
    from editing.models.loader import load_model

    if not demo_is_built():
        pytest.fail(f"The demo model is not in the cache ({demo_model_dir()}). Prepare it before the tests: "
                    "`python -m editing.prepare` (or `make test`, which runs it).", pytrace=False)
    return load_model("demo")


@pytest.fixture
def demo(demo_handle):
    """The shared demo handle, checked to hold no edit before and after the test."""
    from editing.core.edit import handle_stack

    snapshot = {n: p.detach().clone() for n, p in demo_handle.model.named_parameters()}
    assert not handle_stack(demo_handle)
    yield demo_handle
    assert not handle_stack(demo_handle), "a test left an edit applied to the shared demo model"
    for name, param in demo_handle.model.named_parameters():
        assert torch.equal(param, snapshot[name]), f"{name} changed after the test"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session", autouse=True)
def _demo_model_by_default():
    """Every test that opens the dashboard runs on the demo model: the sidebar offers an installed pretrained model
    (SmolLM2) first, which would be far too slow to load and edit in page tests. The browser test's
    server inherits the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDITSCOPE_DEFAULT_MODEL", "demo")
        yield
