"""Fixtures of the editing tests."""

from __future__ import annotations

import pytest

from editing.analysis import stats


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Statistics and context templates of tiny random models go to a temporary cache."""
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    stats.clear_memory_cache()
    yield
    stats.clear_memory_cache()
