"""Per-model hyper-parameter presets, kept as JSON files a person can read, copy and override.

A method's defaults come from rules in code (the layer by depth, λ by MLP width, ...); for the
models its paper published settings for, a *preset file* replaces some of those values. The files
shipped with EditScope live next to this module, one folder per method, one file per model::

    editing/methods/presets/ROME/gpt2-xl.json
    {
      "method": "ROME",
      "model": "gpt2-xl",
      "applies_to": {"model_type": "gpt2", "n_layers": 48, "d_model": 1600},
      "reference": "kmeng01/rome, hparams/ROME/gpt2-xl.json",
      "hparams": {"layer": 17}
    }

A preset applies to the models whose :func:`model_key` — ``(config.model_type, n_layers,
d_model)`` — equals ``applies_to``. Its ``hparams`` set those fields; every other field keeps the
value derived for the model by rule. The file name is free (it only names the preset).

Overriding: set ``EDITSCOPE_PRESETS`` to a folder (or several, separated by ``os.pathsep``; the
first listed wins) laid out the same way. A file there for the same method and model key replaces
the shipped file as a whole (copy the shipped file and change what you need); a file for a model
without a shipped preset adds one. Explicit hyper-parameters (``apply(..., hparams={...})``, the
CLI's ``--hparams``) still win over any preset.

A method may read the presets of another as well (:attr:`HParams.preset_names`, first name
first): AlphaEdit uses MEMIT's (its own folder first), FT-M uses FT-L's.

Every file is checked when its method's presets are first read: the layout, the model key, and
each field against the method's own checks (:mod:`editing.methods.checks`); a mistake is an
:class:`~editing.methods.checks.InvalidHParams` naming the file and the field. Model-dependent
bounds (a layer of this model) are checked when the preset is applied to a model.

``python -m editing.methods.presets ROME --model demo`` prints the effective hyper-parameters
and the preset file they come from; without ``--model`` it lists the preset files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from editing.methods.checks import InvalidHParams, check_fields

if TYPE_CHECKING:
    from editing.methods.base import HParams
    from editing.models.loader import ModelHandle

#: the folder of the presets shipped with EditScope
SHIPPED_DIR = Path(__file__).resolve().parent
#: environment variable naming the user's preset folder(s)
PRESETS_ENV = "EDITSCOPE_PRESETS"

#: (model_type, n_layers, d_model)
ModelKey = tuple[str, int, int]
P = TypeVar("P", bound="HParams")

_TOP_LEVEL = {"method", "model", "applies_to", "reference", "note", "hparams"}
_KEY_FIELDS = ("model_type", "n_layers", "d_model")


def model_key(handle: ModelHandle) -> ModelKey:
    """(model_type, n_layers, d_model): how presets recognise a model."""
    return handle.model.config.model_type, handle.n_layers, handle.d_model


@dataclasses.dataclass(frozen=True)
class Preset:
    """One preset file, read and checked."""

    method: str  # the folder it lies in
    path: Path
    model: str  # the model's name (the file's "model", else its stem)
    key: ModelKey
    reference: str  # where the values come from ("" for a user's file that does not say)
    hparams: Mapping[str, Any]
    shipped: bool  # True for the files that come with EditScope

    def fail(self, message: str) -> InvalidHParams:
        return InvalidHParams(f"Preset file {self.path}: {message}")

    def check(self, cls: type[HParams], handle: ModelHandle | None) -> None:
        """Each field against ``cls``'s checks (the model-dependent bounds too when ``handle`` is given)."""
        known = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(set(self.hparams) - known)
        if unknown:
            raise self.fail(f"unknown hyper-parameter {unknown[0]!r} for {cls.__name__}; known: {sorted(known)}.")
        try:
            check_fields(dict(self.hparams), cls.field_checks(), handle)
        except InvalidHParams as err:
            raise self.fail(str(err)) from None

    def apply(self, params: P, handle: ModelHandle | None = None) -> P:
        """``params`` with this preset's fields set (copies: callers may change the lists they get)."""
        self.check(type(params), handle)
        values = _coerce(type(params), copy.deepcopy(dict(self.hparams)))
        return dataclasses.replace(params, **values)

    def describe(self) -> dict[str, Any]:
        """The preset as JSON-able data (for ``python -m editing.methods.presets``)."""
        return {"method": self.method, "model": self.model, "file": str(self.path),
                "source": "shipped" if self.shipped else f"${PRESETS_ENV}",
                "applies_to": dict(zip(_KEY_FIELDS, self.key, strict=True)), "reference": self.reference,
                "hparams": dict(self.hparams)}


def _coerce(cls: type[HParams], values: dict[str, Any]) -> dict[str, Any]:
    """JSON's lists and numbers as the field's type: a list for a tuple field becomes a tuple, a
    whole number for a float field a float (so a preset gives the same values as code would)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a class defined inside a function may name types that are not resolvable
        return values
    for name, value in values.items():
        hint = hints.get(name)
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if isinstance(value, list) and any(typing.get_origin(o) is tuple or o is tuple for o in options):
            values[name] = tuple(value)
        elif isinstance(value, int) and not isinstance(value, bool) and float in options and int not in options:
            values[name] = float(value)
    return values


def preset_roots() -> list[tuple[Path, bool]]:
    """The folders searched, first wins: the user's (``$EDITSCOPE_PRESETS``), then the shipped one."""
    user = [Path(part).expanduser() for part in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if part.strip()]
    return [(root, False) for root in user] + [(SHIPPED_DIR, True)]


#: parsed files by (path, method, shipped, mtime, size): a file edited while the app runs is read again
_PARSED: dict[tuple[str, str, bool, int, int], Preset] = {}


def read_preset(path: Path, method: str, shipped: bool = False) -> Preset:
    """Read and check the layout of one preset file (its fields are checked by :meth:`Preset.check`)."""
    stat = path.stat()
    cache_key = (str(path), method, shipped, stat.st_mtime_ns, stat.st_size)
    if cache_key in _PARSED:
        return _PARSED[cache_key]

    def fail(message: str) -> InvalidHParams:
        return InvalidHParams(f"Preset file {path}: {message}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(f"not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise fail("must hold a JSON object with \"applies_to\" and \"hparams\".")
    extra = sorted(set(data) - _TOP_LEVEL)
    if extra:
        raise fail(f"unknown entry {extra[0]!r}; a preset file has {sorted(_TOP_LEVEL)}.")
    if data.get("method", method) != method:
        raise fail(f"says it is for method {data['method']!r} but lies in the {method!r} folder.")
    for name in ("model", "reference", "note"):
        if not isinstance(data.get(name, ""), str):
            raise fail(f"{name!r} must be text.")
    applies_to = data.get("applies_to")
    if not isinstance(applies_to, dict) or set(applies_to) != set(_KEY_FIELDS):
        raise fail('"applies_to" must be an object with exactly "model_type" (text), "n_layers" and "d_model" '
                   f"(whole numbers), e.g. {{\"model_type\": \"gpt2\", \"n_layers\": 48, \"d_model\": 1600}}; "
                   f"got {applies_to!r}.")
    model_type, n_layers, d_model = (applies_to[name] for name in _KEY_FIELDS)
    if not isinstance(model_type, str) or not model_type:
        raise fail(f'"applies_to.model_type" must be a model type such as "gpt2" or "llama"; got {model_type!r}.')
    for name, value in (("n_layers", n_layers), ("d_model", d_model)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(f'"applies_to.{name}" must be a whole number ≥ 1; got {value!r}.')
    hparams = data.get("hparams")
    if not isinstance(hparams, dict):
        raise fail(f'"hparams" must be an object of hyper-parameter names and values; got {hparams!r}.')
    preset = Preset(method=method, path=path, model=data.get("model") or path.stem, key=(model_type, n_layers, d_model),
                    reference=data.get("reference", ""), hparams=types.MappingProxyType(hparams), shipped=shipped)
    _PARSED[cache_key] = preset
    return preset


def method_presets(method: str, cls: type[HParams] | None = None) -> dict[ModelKey, Preset]:
    """The presets of ``method`` by model key, a user's file replacing a shipped one for the same
    key; each checked against ``cls`` when given. Two files for one key in one folder are an error."""
    found: dict[ModelKey, Preset] = {}
    for root, shipped in reversed(preset_roots()):  # shipped first, so a user's folder replaces its entries
        folder = root / method
        if not folder.is_dir():
            continue
        here: dict[ModelKey, Preset] = {}
        for path in sorted(folder.glob("*.json")):
            preset = read_preset(path, method, shipped)
            if preset.key in here:
                raise InvalidHParams(f"Preset files {here[preset.key].path} and {path} both apply to "
                                     f"{preset.key}; keep one.")
            if cls is not None:
                preset.check(cls, None)
            here[preset.key] = preset
        found.update(here)
    return found


def find_preset(cls: type[HParams], handle: ModelHandle) -> Preset | None:
    """The preset for ``handle``'s model among ``cls.preset_names`` (in that order), or None."""
    names = getattr(cls, "preset_names", ())
    if not names:
        return None
    key = model_key(handle)
    for method in names:
        preset = method_presets(method, cls).get(key)
        if preset is not None:
            return preset
    return None


def shipped_presets(method: str) -> dict[ModelKey, dict[str, Any]]:
    """The values of the presets shipped for ``method`` (no user files), by model key."""
    found: dict[ModelKey, dict[str, Any]] = {}
    folder = SHIPPED_DIR / method
    for path in sorted(folder.glob("*.json")):
        preset = read_preset(path, method, shipped=True)
        found[preset.key] = copy.deepcopy(dict(preset.hparams))
    return found
