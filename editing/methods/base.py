"""The method interface and registry.

Every editing method is an :class:`EditMethod` registered under its paper name, with a
hyper-parameter dataclass whose defaults are derived from the model it edits.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from editing.core.edit import Edit, EditError, handle_stack
from editing.core.measure import measure
from editing.core.request import EditRequest, InvalidEditRequest
from editing.methods.checks import FieldCheck, InvalidHParams, check_fields, from_annotation

if TYPE_CHECKING:
    from editing.methods.presets import Preset
    from editing.models.loader import ModelHandle

#: progress(fraction done in [0, 1], what is happening)
ProgressFn = Callable[[float, str], None]

H = TypeVar("H", bound="HParams")


def no_progress(_fraction: float, _message: str) -> None:
    """A progress callback that ignores reports."""


def find_preset(cls: type[HParams], handle: ModelHandle) -> Preset | None:
    """The preset file that applies to ``handle``'s model for ``cls`` (:mod:`editing.methods.presets`)."""
    # imported on first use: importing the core machinery loads no module beyond base and checks
    from editing.methods.presets import find_preset as find

    return find(cls, handle)


@dataclasses.dataclass
class HParams:
    """Base of every method's hyper-parameters.

    Each subclass lists the allowed values of its fields in ``checks`` (field name ->
    :class:`~editing.methods.checks.FieldCheck`; a subclass adds to its parents' checks), and
    relations between fields in :meth:`validate_together`. A field without a check of its own is
    still checked by its type annotation (int, float, bool, str, or one of those or None).
    """

    checks: ClassVar[dict[str, FieldCheck]] = {}
    #: the method folders whose preset files apply to this class, searched in order (see
    #: :mod:`editing.methods.presets`); :func:`register` fills in the method's own name when a class
    #: does not set it
    preset_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def for_model(cls: type[H], handle: ModelHandle) -> H:
        """Defaults for ``handle``'s model: :meth:`model_defaults` with the model's preset file, if
        one applies, laid over them (:mod:`editing.methods.presets`)."""
        preset = find_preset(cls, handle)
        params = cls.model_defaults(handle, preset.hparams if preset is not None else {})
        return preset.apply(params, handle) if preset is not None else params

    @classmethod
    def model_defaults(cls: type[H], handle: ModelHandle, preset: Mapping[str, Any]) -> H:
        """Defaults derived from the model by rule (layers from depth, ...). ``preset`` holds the
        values the model's preset file sets, which replace these afterwards: a subclass may skip
        deriving a field the preset sets when that is costly."""
        return cls()

    @classmethod
    def field_checks(cls) -> dict[str, FieldCheck]:
        """The check of every field: declared ones (the most derived class wins), else the type's."""
        declared: dict[str, FieldCheck] = {}
        for klass in reversed(cls.__mro__):
            declared.update(vars(klass).get("checks", {}))
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a class defined inside a function may name types that are not resolvable
            hints = {}
        result: dict[str, FieldCheck] = {}
        for spec in dataclasses.fields(cls):
            check = declared.get(spec.name) or from_annotation(hints.get(spec.name, spec.type))
            if check is not None:
                result[spec.name] = check
        return result

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, handle: ModelHandle | None = None) -> None:
        """Raise :class:`InvalidHParams` (a ``ValueError``) naming the first field whose value is
        not allowed, and its allowed range; bounds that depend on the model (layers, context
        length) are checked when ``handle`` is given. Called once by :meth:`EditMethod.apply` (and
        by experiment runs before they store anything) before any work."""
        values = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}
        check_fields(values, self.field_checks(), handle)
        self.validate_together(handle)

    def validate_together(self, handle: ModelHandle | None) -> None:
        """Relations between fields, checked after each field passed its own check (default: none)."""

    def replace(self: H, **changes: Any) -> H:
        """A copy with some fields changed; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidHParams(f"Unknown hyper-parameters for {type(self).__name__}: {sorted(unknown)}; "
                                 f"known: {sorted(known)}.")
        return dataclasses.replace(self, **changes)


def as_requests(requests: object) -> list[EditRequest]:
    """``requests`` (one :class:`EditRequest` or an iterable of them) as a list.

    Anything else is a ``TypeError`` saying what was passed, instead of an ``AttributeError`` deep
    inside a method (``apply(None, ...)``, ``apply(5, ...)``, a plain string or dict)."""
    if isinstance(requests, EditRequest):
        return [requests]
    how = "build them with EditRequest(prompt, subject, target_new) or EditRequest.from_dict"
    if requests is None or isinstance(requests, str | bytes | Mapping) or not isinstance(requests, Iterable):
        raise TypeError(f"Edit requests must be an EditRequest or a list of them, not {type(requests).__name__}; "
                        f"{how}.")
    listed = list(requests)
    wrong = [type(item).__name__ for item in listed if not isinstance(item, EditRequest)]
    if wrong:
        raise TypeError(f"Edit requests must be EditRequest objects, not {wrong[0]}; {how}.")
    return listed


def check_spelled(handle: ModelHandle, requests: Sequence[EditRequest]) -> None:
    """Raise :class:`InvalidEditRequest` when a target has words the model's tokenizer can only write
    as its unknown token (the demo's word-level vocabulary: "Zürich", "france"): the edit would
    "succeed" and the model then answer ``<unk>``. Byte-level tokenizers spell everything."""
    from editing.models.tokens import unknown_words

    tokenizer = handle.tokenizer
    for request in requests:
        for label, target in (("new target", request.target_new), ("true target", request.target_true)):
            words = unknown_words(tokenizer, target) if target else []
            if words:
                listed = ", ".join(repr(word) for word in words)
                many = len(words) > 1
                raise InvalidEditRequest(
                    f"The {label} {target!r} has {'words' if many else 'a word'} this model's vocabulary does not "
                    f"know: {listed}. The model can only write {'them' if many else 'it'} as its unknown token "
                    f"{tokenizer.unk_token!r}; use words it knows (check the spelling and capitals)."
                )


def check_fits_context(handle: ModelHandle, requests: Sequence[EditRequest]) -> None:
    """Raise :class:`InvalidEditRequest` when a request's prompt with a target is longer than the
    model reads (checked once here, so no method meets an input its position embeddings cannot hold)."""
    from editing.models.tokens import encode, target_ids

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
        requests = as_requests(requests)
        if not requests:
            raise InvalidEditRequest("No edit requests given.")
        check_fits_context(handle, requests)
        check_spelled(handle, requests)
        params = self.resolve_hparams(handle, hparams)
        params.validate(handle)
        problem = self.readiness(handle, params)
        if problem is not None:
            raise EditError(problem)
        progress = progress or no_progress
        depth = len(handle_stack(handle))
        with handle.lock:
            try:
                with measure(handle.devices) as cost:
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


#: every built-in method and the module that defines it. A module is imported on first use, so the
#: shared machinery (and ``import editing.methods``) loads no method — the registry is a table, not a cycle.
METHOD_MODULES: dict[str, str] = {
    "FT": "editing.methods.ft", "FT-L": "editing.methods.ft", "FT-M": "editing.methods.ft",
    "KN": "editing.methods.kn", "ROME": "editing.methods.rome", "MEMIT": "editing.methods.memit",
    "AlphaEdit": "editing.methods.alphaedit", "KE": "editing.methods.ke", "MEND": "editing.methods.mend",
    "SERAC": "editing.methods.serac", "IKE": "editing.methods.ike", "T-Patcher": "editing.methods.tpatcher",
    "CaliNET": "editing.methods.calinet", "GRACE": "editing.methods.grace",
}
#: the method classes imported so far (their modules register them), and any registered by users
METHODS: dict[str, type[EditMethod]] = {}


def register(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator registering a method under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"Method {cls.name!r} registered twice.")
    METHODS[cls.name] = cls
    hparams_class = getattr(cls, "hparams_class", None)
    if isinstance(hparams_class, type) and "preset_names" not in vars(hparams_class):
        hparams_class.preset_names = (cls.name,)  # its presets lie in presets/<method name>/
    return cls


def method_names() -> list[str]:
    """Names of every method, built-in or registered, sorted (imports nothing)."""
    return sorted(set(METHOD_MODULES) | set(METHODS))


def method_class(name: str) -> type[EditMethod]:
    """The class of the method called ``name`` (case-insensitive), importing its module on first use."""
    lookup = {key.lower(): key for key in method_names()}
    key = lookup.get(name.strip().lower()) if isinstance(name, str) else None
    if key is None:
        raise KeyError(f"Unknown editing method {name!r}; available: {', '.join(method_names())}.")
    if key not in METHODS:
        importlib.import_module(METHOD_MODULES[key])
    return METHODS[key]


def import_all_methods() -> None:
    """Import every built-in method's module (registering their methods and edit types)."""
    for module in dict.fromkeys(METHOD_MODULES.values()):
        importlib.import_module(module)


def get_method(name: str) -> EditMethod:
    """A new instance of the method registered as ``name`` (case-insensitive)."""
    return method_class(name)()
