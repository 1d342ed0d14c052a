"""Helpers for tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import torch


def params_snapshot(handle) -> dict[str, torch.Tensor]:
    """A copy of every parameter of the handle's model."""
    return {n: p.detach().clone() for n, p in handle.model.named_parameters()}


def assert_params_equal(handle, snapshot: dict[str, torch.Tensor]) -> None:
    """Every parameter equals the snapshot bit for bit."""
    for name, param in handle.model.named_parameters():
        assert torch.equal(param, snapshot[name]), f"parameter {name} differs"
