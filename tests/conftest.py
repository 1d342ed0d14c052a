"""Shared fixtures: tiny random models of every family and the (cached) demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from editing.tiny import TINY_FAMILIES, tiny_model

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
    """The demo model, loaded once per test session (built first if not cached)."""
    from editing.models import load_model

    return load_model("demo")


@pytest.fixture
def demo(demo_handle):
    """The shared demo handle, checked to hold no edit before and after the test."""
    from editing.edit import handle_stack

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
