"""Helpers shared by the reliability tests."""

from __future__ import annotations

import dataclasses
import re

import torch

from editing.methods import get_method


def few_steps(handle, method: str, steps: int = 3) -> dict[str, int]:
    """Hyper-parameters capping ``method``'s optimisation loops at ``steps`` steps.

    The reliability tests check failure handling, isolation and input validation, not edit
    quality; capping loops keeps them fast while still running every part of the method.
    """
    params = get_method(method).default_hparams(handle)
    return {f.name: steps for f in dataclasses.fields(params)
            if re.search(r"(^|_)(steps|epochs|iters?|iterations)$", f.name)
            and isinstance(getattr(params, f.name), int) and getattr(params, f.name) > steps}


def run_hparams(handle, method: str, editors: dict[str, str], steps: int | None = 3) -> dict[str, object]:
    """Hyper-parameters for running ``method`` on ``handle`` in a reliability test: loops capped at
    ``steps`` (None: the method's own), and a learned method's editor taken from ``editors``
    (method -> checkpoint folder, trained by the ``tiny_editors`` fixture).

    Fails the test when the method still cannot run: every learned editor was trained for it, so a
    method that is not ready means broken training or a broken checkpoint, which a skip would hide.
    """
    import pytest

    hparams: dict[str, object] = few_steps(handle, method, steps) if steps is not None else {}
    if method in editors:
        hparams["checkpoint"] = editors[method]
    problem = get_method(method).readiness(handle, hparams)
    if problem is not None:
        trained = "its quick editor was trained for this test" if method in editors else \
            "no quick editor was trained for it (is its trainer registered in editing.train.TRAINERS?)"
        pytest.fail(f"{method} is not ready on {handle.name} although {trained}: {problem}")
    return hparams


def first_ready(handle, candidates: tuple[str, ...], kind: str | None = None) -> str | None:
    """The first of ``candidates`` that is registered and ready on ``handle``; else, with ``kind``,
    any ready registered method of that edit kind."""
    from editing.methods import available_methods

    registered = available_methods()
    names = [c for c in candidates if c in registered]
    if kind is not None:
        names += [m for m in registered if m not in names and get_method(m).edit_kind == kind]
    for name in names:
        if get_method(name).readiness(handle) is None:
            return name
    return None


def last_logprobs(handle, prompts: list[str]) -> torch.Tensor:
    """Next-token log-probabilities of every prompt (the shared scoring path)."""
    from editing.analysis.scoring import last_token_logprobs

    return last_token_logprobs(handle, prompts)
