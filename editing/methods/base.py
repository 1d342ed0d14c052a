"""The method interface and registry.

Every editing method is an :class:`EditMethod` registered under its paper name, with a
hyper-parameter dataclass whose defaults are derived from the model it edits.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from editing.edit import Edit, EditError, handle_stack
from editing.measure import measure
from editing.request import EditRequest, InvalidEditRequest

if TYPE_CHECKING:
    from editing.models import ModelHandle

#: progress(fraction done in [0, 1], what is happening)
ProgressFn = Callable[[float, str], None]

H = TypeVar("H", bound="HParams")


def no_progress(_fraction: float, _message: str) -> None:
    """A progress callback that ignores reports."""


@dataclasses.dataclass
class HParams:
    """Base of every method's hyper-parameters."""

    @classmethod
    def for_model(cls: type[H], handle: ModelHandle) -> H:
        """Defaults for ``handle``'s model (subclasses derive layers from depth)."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, handle: ModelHandle) -> None:
        """Raise ``ValueError`` with an actionable message when a setting cannot work on
        ``handle``'s model (called by :meth:`EditMethod.apply` before any work; default: no check)."""

    def replace(self: H, **changes: Any) -> H:
        """A copy with some fields changed; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"Unknown hyper-parameters for {type(self).__name__}: {sorted(unknown)}; "
                             f"known: {sorted(known)}.")
        return dataclasses.replace(self, **changes)


def check_fits_context(handle: ModelHandle, requests: Sequence[EditRequest]) -> None:
    """Raise :class:`InvalidEditRequest` when a request's prompt with a target is longer than the
    model reads (checked once here, so no method meets an input its position embeddings cannot hold)."""
    from editing.tokens import encode, target_ids

    tokenizer = handle.tokenizer
    for request in requests:
        prompt_len = len(encode(tokenizer, request.text))
        for target in filter(None, (request.target_new, request.target_true)):
            total = prompt_len + len(target_ids(tokenizer, request.text, target))
            if total > handle.max_length:
                raise InvalidEditRequest(
                    f"The prompt with the target {target[:40]!r} is {total} tokens; the model reads at most "
                    f"{handle.max_length}. Shorten the prompt or the target."
                )


def scaled_layer(n_layers: int, fraction: float) -> int:
    """The layer at ``fraction`` of the model's depth (e.g. ROME's 17/48 on GPT-2 XL)."""
    return max(0, min(n_layers - 1, round(fraction * n_layers)))


class EditMethod(ABC):
    """An editing method. Subclasses set the class attributes and implement :meth:`_execute`."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HParams]]
    #: "weight_delta", "module_patch" or "inference_wrapper"
    edit_kind: ClassVar[str]
    #: one-line description for the UI and the README table
    summary: ClassVar[str] = ""
    #: True when the method needs a trained editor (MEND, KE, SERAC)
    requires_training: ClassVar[bool] = False
    #: families it works on (None = all supported families)
    families: ClassVar[tuple[str, ...] | None] = None

    def readiness(self, handle: ModelHandle, hparams: HParams | dict[str, Any] | None = None) -> str | None:
        """None when the method can edit ``handle`` now (with ``hparams``, e.g. a chosen trained
        editor); otherwise what the user must do first (e.g. train the editor, with the command)."""
        if self.families is not None and handle.arch.family not in self.families:
            return f"{self.name} does not support {handle.arch.family} models (supported: {', '.join(self.families)})."
        return None

    def default_hparams(self, handle: ModelHandle) -> HParams:
        return self.hparams_class.for_model(handle)

    def resolve_hparams(self, handle: ModelHandle, hparams: HParams | dict[str, Any] | None) -> HParams:
        if hparams is None:
            return self.default_hparams(handle)
        if isinstance(hparams, dict):
            return self.default_hparams(handle).replace(**hparams)
        if not isinstance(hparams, self.hparams_class):
            raise TypeError(f"{self.name} expects {self.hparams_class.__name__}, got {type(hparams).__name__}.")
        return hparams

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest],
              hparams: HParams | dict[str, Any] | None = None,
              progress: ProgressFn | None = None) -> Edit:
        """Compute the edit for ``requests`` against the model's current weights and apply it.

        Returns the applied :class:`Edit` (``edit.revert(handle)`` undoes it exactly). On any
        error the model is left exactly as it was.
        """
        if isinstance(requests, EditRequest):
            requests = [requests]
        requests = list(requests)
        if not requests:
            raise InvalidEditRequest("No edit requests given.")
        check_fits_context(handle, requests)
        params = self.resolve_hparams(handle, hparams)
        params.validate(handle)
        problem = self.readiness(handle, params)
        if problem is not None:
            raise EditError(problem)
        progress = progress or no_progress
        depth = len(handle_stack(handle))
        with handle.lock:
            try:
                with measure(handle.device) as cost:
                    edit = self._execute(handle, requests, params, progress)
                    if not edit.is_applied:
                        edit.apply(handle)
                edit.stats.wall_time_s = cost.wall_time_s
                edit.stats.peak_memory_bytes = cost.peak_memory_bytes
                edit.stats.memory_kind = cost.memory_kind
                progress(1.0, f"{self.name}: done")  # inside the try: a callback that cancels here reverts too
            except BaseException:
                stack = handle_stack(handle)
                while len(stack) > depth:  # leave the model as we found it
                    stack[-1].revert(handle)
                raise
        return edit

    @abstractmethod
    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        """Compute the edit (leaving weights as found) and return it, applied or not."""


METHODS: dict[str, type[EditMethod]] = {}


def register(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator registering a method under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"Method {cls.name!r} registered twice.")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> EditMethod:
    """A new instance of the method registered as ``name`` (case-insensitive)."""
    lookup = {key.lower(): key for key in METHODS}
    key = lookup.get(name.strip().lower())
    if key is None:
        raise KeyError(f"Unknown editing method {name!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[key]()
