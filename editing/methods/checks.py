"""Declarative checks of hyper-parameter fields.

Every method's hyper-parameter dataclass lists one check per field in its ``checks`` class
attribute (``{"layer": LAYER, "lr": POSITIVE, ...}``); :meth:`editing.methods.base.HParams.validate`
runs them all, once, before a method computes or stores anything. A check knows the allowed range
and says it in words, so every refusal names the field, what is allowed and what was given
("layer must be a whole number from 0 to 3 (a layer of this model); got 99."). Bounds may depend
on the model (its layers, its context length); without a model those bounds are not checked.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

#: a fixed bound, or one read from the model (skipped when the model is not known)
Bound = float | Callable[["ModelHandle"], float] | None


class InvalidHParams(ValueError):
    """A hyper-parameter a person must fix; the message names it and its allowed range."""


@dataclass(frozen=True)
class Problem:
    """What is wrong with a value: where inside it (``""``, ``"[2]"``, ``"[0][1]"``), what is
    wanted there, and the offending part."""

    where: str
    wanted: str
    value: Any

    def inside(self, where: str) -> Problem:
        return Problem(where + self.where, self.wanted, self.value)


class FieldCheck(ABC):
    """The values one hyper-parameter may take."""

    @abstractmethod
    def wanted(self, handle: ModelHandle | None) -> str:
        """The allowed values in words ("a number > 0")."""

    @abstractmethod
    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        """None when ``value`` is allowed, else what is wrong."""


def _bound(bound: Bound, handle: ModelHandle | None) -> float | None:
    if callable(bound):
        return None if handle is None else bound(handle)
    return bound


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Number(FieldCheck):
    """A finite number (``whole``: an integer, never a bool, a float or a string) within bounds."""

    low: Bound = None
    high: Bound = None
    low_open: bool = False  # the low bound itself is not allowed
    high_open: bool = False
    whole: bool = False
    why: str = ""  # what the bounds mean, said in parentheses

    def wanted(self, handle: ModelHandle | None) -> str:
        low, high = _bound(self.low, handle), _bound(self.high, handle)
        kind = "a whole number" if self.whole else "a number"
        if low is not None and high is not None:
            if self.whole and not self.low_open and not self.high_open:
                text = f"{kind} from {_number(low)} to {_number(high)}"
            else:
                text = (f"{kind} in {'(' if self.low_open else '['}{_number(low)}, "
                        f"{_number(high)}{')' if self.high_open else ']'}")
        elif low is not None:
            text = f"{kind} {'>' if self.low_open else '≥'} {_number(low)}"
        elif high is not None:
            text = f"{kind} {'<' if self.high_open else '≤'} {_number(high)}"
        else:
            text = kind if self.whole else "a finite number"
        return f"{text} ({self.why})" if self.why else text

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        # numbers.Integral/Real also take numpy scalars; a bool is a flag, not a number
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            return Problem("", self.wanted(handle), value)
        if not math.isfinite(value):
            return Problem("", self.wanted(handle), value)
        low, high = _bound(self.low, handle), _bound(self.high, handle)
        if low is not None and (value < low or (self.low_open and value == low)):
            return Problem("", self.wanted(handle), value)
        if high is not None and (value > high or (self.high_open and value == high)):
            return Problem("", self.wanted(handle), value)
        return None


@dataclass(frozen=True)
class Choice(FieldCheck):
    """One of a few strings."""

    options: tuple[str, ...]

    def wanted(self, handle: ModelHandle | None) -> str:
        return "one of " + ", ".join(repr(option) for option in self.options)

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        return None if isinstance(value, str) and value in self.options else Problem("", self.wanted(handle), value)


@dataclass(frozen=True)
class Text(FieldCheck):
    """A string (``empty_ok``: possibly empty)."""

    empty_ok: bool = True

    def wanted(self, handle: ModelHandle | None) -> str:
        return "text" if self.empty_ok else "non-empty text"

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        if isinstance(value, str) and (self.empty_ok or value.strip()):
            return None
        return Problem("", self.wanted(handle), value)


@dataclass(frozen=True)
class Flag(FieldCheck):
    """True or False (not 0/1, not "false")."""

    def wanted(self, handle: ModelHandle | None) -> str:
        return "true or false"

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        return None if isinstance(value, bool) else Problem("", self.wanted(handle), value)


@dataclass(frozen=True)
class Maybe(FieldCheck):
    """None, or a value ``inner`` allows."""

    inner: FieldCheck

    def wanted(self, handle: ModelHandle | None) -> str:
        return f"None or {self.inner.wanted(handle)}"

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        if value is None:
            return None
        found = self.inner.problem(value, handle)
        return None if found is None else Problem(found.where, f"None or {found.wanted}" if not found.where
                                                  else found.wanted, found.value)


@dataclass(frozen=True)
class Items(FieldCheck):
    """A list (or tuple) of values ``item`` allows, possibly required non-empty and without repeats."""

    item: FieldCheck
    non_empty: bool = False
    distinct: bool = False  # for items that are numbers or strings

    def wanted(self, handle: ModelHandle | None) -> str:
        repeats = ", without repeats" if self.distinct else ""
        return f"a {'non-empty ' if self.non_empty else ''}list of {_plural(self.item.wanted(handle))}{repeats}"

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        if not isinstance(value, list | tuple) or (self.non_empty and not value):
            return Problem("", self.wanted(handle), value)
        for index, item in enumerate(value):
            found = self.item.problem(item, handle)
            if found is not None:
                return found.inside(f"[{index}]")
        if self.distinct and len(set(value)) != len(value):
            return Problem("", self.wanted(handle), value)
        return None


@dataclass(frozen=True)
class Row(FieldCheck):
    """A fixed-length list whose positions have checks of their own (``[tokens, count]``)."""

    items: tuple[FieldCheck, ...]
    names: tuple[str, ...]

    def wanted(self, handle: ModelHandle | None) -> str:
        return f"a list [{', '.join(self.names)}]"

    def problem(self, value: Any, handle: ModelHandle | None) -> Problem | None:
        if not isinstance(value, list | tuple) or len(value) != len(self.items):
            return Problem("", self.wanted(handle), value)
        for index, (check, name, item) in enumerate(zip(self.items, self.names, value, strict=True)):
            found = check.problem(item, handle)
            if found is not None:
                return found.inside(f"[{index}] ({name})" if not found.where else f"[{index}]")
        return None


def _plural(wanted: str) -> str:
    """'a whole number from 0 to 3 (…)' -> 'whole numbers from 0 to 3 (…)' (good enough for the checks here)."""
    for single, many in (("a whole number", "whole numbers"), ("a number", "numbers"),
                         ("a finite number", "finite numbers"), ("non-empty text", "non-empty texts"),
                         ("text", "texts"), ("a list", "lists"), ("one of", "values among")):
        if wanted.startswith(single):
            return many + wanted[len(single):]
    return wanted


def describe(name: str, problem: Problem) -> str:
    """The message for a refused field: its name, what is allowed and what was given."""
    shown = repr(problem.value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"Hyper-parameter {name}{problem.where} must be {problem.wanted}; got {shown}."


def check_fields(values: dict[str, Any], checks: dict[str, FieldCheck], handle: ModelHandle | None) -> None:
    """Raise :class:`InvalidHParams` for the first value its check refuses."""
    for name, value in values.items():
        check = checks.get(name)
        found = check.problem(value, handle) if check is not None else None
        if found is not None:
            raise InvalidHParams(describe(name, found))


def from_annotation(annotation: Any) -> FieldCheck | None:
    """The plain type check of a field a class gave no check of its own (int, float, bool, str,
    and those or None); None for other types."""
    if isinstance(annotation, str):  # unresolved (postponed) annotation: the plain forms only
        name = annotation.replace(" ", "")
        optional = name.endswith("|None")
        inner = from_annotation({"bool": bool, "int": int, "float": float, "str": str}.get(name.removesuffix("|None")))
        return Maybe(inner) if optional and inner is not None else inner
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = from_annotation(rest[0]) if len(rest) == 1 else None
        return Maybe(inner) if inner is not None else None
    return {bool: Flag(), int: Number(whole=True), float: Number(), str: Text()}.get(annotation)


# -- the checks most methods share ------------------------------------------------------------------
def _last_layer(handle: ModelHandle) -> int:
    return handle.n_layers - 1


def half_context(handle: ModelHandle) -> int:
    """Half the tokens the model reads: what a prefix or reserve may take, leaving the rest to the prompt."""
    return handle.max_length // 2


POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)
FINITE = Number()
COUNT = Number(1, whole=True)
NON_NEGATIVE_COUNT = Number(0, whole=True)
SEED = Number(0, 2**32 - 1, whole=True)
LAYER = Number(0, _last_layer, whole=True, why="a layer of this model")
LAYERS = Items(LAYER, non_empty=True, distinct=True)
#: tokens of text sampled before a prompt: the prompt and its target need the rest of the context
CONTEXT_TOKENS = Number(1, half_context, whole=True, why="at most half the model's context")
CHECKPOINT = Text()  # empty: the editor trained with the default configuration
TEXTS = Items(Text(empty_ok=False), non_empty=True)

