"""Activation hooks shared by every method and by the evaluation layer.

* :func:`capture` records module inputs or outputs during a forward pass;
* :func:`modify` rewrites a module's output (or input) on the fly;
* :func:`forward_until` runs the model only as far as the last module whose activations
  are needed (statistics collection, key computation);
* :func:`at_positions` reads a captured activation at given (row, position) pairs.

A model sharded by a ``device_map`` runs each block on its own device, so an activation is on its
module's device, and a module's *input* (before accelerate moves it) may still be on the previous
block's: index and combine activations on the device they are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@contextmanager
def capture(model: nn.Module, names: Iterable[str], inputs: bool = False,
            detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or first positional input) of each named module.

    The dict is filled as the forward pass runs; with ``detach=False`` the graph is kept so
    gradients can flow to the captured tensors.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):
        module = model.get_submodule(name)

        def hook(_module, args, output, _name=name):
            value = _first(args) if inputs else _first(output)
            store[_name] = value.detach() if detach else value

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def modify(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor],
           inputs: bool = False) -> Iterator[None]:
    """Replace a module's output (or first input) by ``fn(value)`` during the block."""
    module = model.get_submodule(name)
    if inputs:
        def pre_hook(_module, args):
            return (fn(args[0]), *args[1:])

        h = module.register_forward_pre_hook(pre_hook)
    else:
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Raise :class:`StopForward` once the named module has run."""
    def hook(_module, _args, _output):
        raise StopForward

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def at_positions(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[rows, positions]`` (``(batch, seq, dim)`` -> ``(n, dim)``), with the index tensors
    moved to ``hidden``'s device first (a no-op unless the model is sharded)."""
    return hidden[rows.to(hidden.device), positions.to(hidden.device)]


def forward_until(model: nn.Module, last_module: str | None, **model_inputs) -> None:
    """Run ``model(**model_inputs)``, stopping after ``last_module`` (full pass when None)."""
    with ExitStack() as stack:
        if last_module is not None:
            stack.enter_context(stop_after(model, last_module))
        try:
            model(**model_inputs)
        except StopForward:
            pass
