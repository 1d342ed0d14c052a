"""Reversible edits.

Three kinds cover every method (see DESIGN.md):

* :class:`WeightDelta` — changes to existing weights, stored as dense deltas or low-rank
  factors (FT, KN, ROME, MEMIT, KE, MEND, AlphaEdit);
* :class:`ModulePatch` — extra parameters attached with forward hooks (T-Patcher, CaliNET,
  GRACE); the model's own weights are never touched;
* :class:`InferenceWrapper` — a router or context in front of the unchanged model (SERAC, IKE).

Applying keeps a copy of exactly the tensors it changes, and reverting copies them back, so
revert restores every parameter bit for bit. An edit is applied at most once at a time and
edits on one model must be reverted in reverse order (the handle keeps the stack and checks).

Precision and devices: a delta is materialised in float32 on its parameter's device (a model
spread over several devices by ``device_map`` keeps each update where its weight lives). A
float32 (or float64) weight gets ``W + Δ`` in its own precision, as before. A bfloat16/float16
weight cannot hold a small ``Δ``: ``W + Δ`` rounds back to ``W`` when ``|Δ|`` is below half a
unit in the last place (bfloat16 keeps 8 significant bits, so ~4e-3 relative; FT-L's ε = 5e-5 on
GPT-J weights of ~0.02 is below it), and rounding after every edit of a stack loses each small
step again. So the handle keeps a float32 *master* copy of every low-precision weight that
applied edits changed (:func:`float_masters`): each edit adds its ``Δ`` to the master in float32
and the weight becomes the master rounded once (``round(W₀ + Δ₁ + … + Δₙ)``), so deltas below the
weight's resolution still add up over a stack of edits. Reverting restores the weight from the
exact copy taken by the first edit of a weight, or from the previous master rounded the same
way it was rounded when applied, so it is bit for bit; the master goes when the first edit of a
weight is reverted. Memory, on the weight's device: the first applied edit of a low-precision
weight keeps its exact copy and a float32 master (three times the bfloat16 weight, where a plain
backup would be one), each further edit of it one more float32 master.
"""

from __future__ import annotations

import json
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from editing.core.request import EditRequest
from editing.storage.files import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle


class EditError(RuntimeError):
    """An edit could not be computed or applied; the model is left as it was."""


class EditOrderError(EditError):
    """Edits on a model were applied or reverted out of stack order."""


#: type name -> Edit subclass, for loading saved edits
EDIT_TYPES: dict[str, type[Edit]] = {}


def register_edit_type(cls: type[Edit]) -> type[Edit]:
    """Class decorator: make an Edit subclass loadable by :func:`load_edit`."""
    EDIT_TYPES[cls.__name__] = cls
    return cls


@dataclass
class EditStats:
    """Cost of computing an edit."""

    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = "rss"


@dataclass(eq=False)
class Edit(ABC):
    """A computed edit: what it changes, for which requests, how, and at what cost."""

    method: str
    requests: list[EditRequest]
    hparams: dict[str, Any]
    stats: EditStats = field(default_factory=EditStats)
    info: dict[str, Any] = field(default_factory=dict)  # method-specific, JSON-serialisable

    kind: ClassVar[str] = "abstract"

    def __post_init__(self) -> None:
        self._applied_to: ModelHandle | None = None

    # -- applying ------------------------------------------------------------------------------
    @property
    def is_applied(self) -> bool:
        return self._applied_to is not None

    def apply(self, handle: ModelHandle) -> None:
        """Put the edit into ``handle``'s model (it becomes the top of the handle's stack)."""
        if self._applied_to is not None:
            raise EditOrderError("This edit is already applied.")
        with torch.no_grad():
            self._apply(handle)
        self._applied_to = handle
        handle_stack(handle).append(self)

    def revert(self, handle: ModelHandle) -> None:
        """Undo :meth:`apply` exactly; only the most recently applied edit may be reverted."""
        if self._applied_to is not handle:
            raise EditOrderError("This edit is not applied to that model.")
        stack = handle_stack(handle)
        if not stack or stack[-1] is not self:
            raise EditOrderError("Edits must be reverted in reverse order of application.")
        with torch.no_grad():
            self._revert(handle)
        stack.pop()
        self._applied_to = None

    @abstractmethod
    def _apply(self, handle: ModelHandle) -> None: ...

    @abstractmethod
    def _revert(self, handle: ModelHandle) -> None: ...

    # -- inference routing (only wrappers change it) -------------------------------------------
    def route(self, handle: ModelHandle, route: Route) -> Route:
        """How a query is answered while this edit is active; weight edits change nothing here."""
        return route

    def prepare_routes(self, handle: ModelHandle, prompts: list[str]) -> None:
        """Optional batch work before :meth:`route` is asked about each of ``prompts`` (a wrapper's
        retriever embeds them all in one pass); nothing by default."""
        return None

    # -- size and persistence ------------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the edit stores (for saving and for measuring its size)."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable state besides tensors (subclasses extend)."""
        return {}

    @classmethod
    @abstractmethod
    def from_parts(cls, common: dict[str, Any], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> Edit: ...

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.json`` and ``<path>.safetensors`` (no pickle), atomically."""
        return save_edit(self, path)


def handle_stack(handle: ModelHandle) -> list[Edit]:
    """The edits currently applied to ``handle``'s model, oldest first."""
    stack = getattr(handle, "_applied_edits", None)
    if stack is None:
        stack = []
        handle._applied_edits = stack  # type: ignore[attr-defined]
    return stack


# ---------------------------------------------------------------------------------------------
# Weight deltas
# ---------------------------------------------------------------------------------------------
@dataclass
class ParamDelta:
    """A change to one parameter, in the parameter's own storage shape.

    Either ``dense`` (same shape as the parameter) or the low-rank pair ``left @ right``.
    """

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise ValueError("A ParamDelta is either dense or a (left, right) low-rank pair.")

    @classmethod
    def low_rank(cls, left: torch.Tensor, right: torch.Tensor) -> ParamDelta:
        return cls(left=left.detach(), right=right.detach())

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.left is not None and self.right is not None
        return (*self.left.shape[:-1], self.right.shape[-1])

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[1]

    def materialise(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense delta; with ``device``, in float32 on that device (low-rank factors are moved
        first and multiplied there: moving the small factors is cheaper than the product)."""
        if device is None:
            if self.dense is not None:
                return self.dense
            assert self.left is not None and self.right is not None
            return self.left.float() @ self.right.float()
        if self.dense is not None:
            return self.dense.to(device, torch.float32)
        assert self.left is not None and self.right is not None
        return self.left.to(device, torch.float32) @ self.right.to(device, torch.float32)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.dense is not None:
            return {f"{prefix}::dense": self.dense}
        assert self.left is not None and self.right is not None
        return {f"{prefix}::left": self.left, f"{prefix}::right": self.right}


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def needs_float_master(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored in less than float32 precision (bfloat16, float16, float8), so
    deltas are summed in a float32 master copy (see the module docstring)."""
    return param.is_floating_point() and torch.finfo(param.dtype).bits < 32


def float_masters(handle: ModelHandle) -> dict[str, torch.Tensor]:
    """Parameter name -> float32 master copy of the low-precision weights that the edits applied to
    ``handle`` now change (``round(master)`` is the weight); empty when no edit is applied."""
    masters = getattr(handle, "_float_masters", None)
    if masters is None:
        masters = {}
        handle._float_masters = masters  # type: ignore[attr-defined]
    return masters


def _master_is_current(master: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether the weight is still its master rounded; False when something wrote the weight
    outside the edit machinery (the master is then stale and is started again from the weight)."""
    if param.is_meta:  # no values to compare (shape-only tensors in tests and dry runs)
        return True
    return torch.equal(master.to(param.dtype), param)


@register_edit_type
@dataclass(eq=False)
class WeightDelta(Edit):
    """Added deltas on named parameters (``W ← W + Δ``); revert copies the saved originals back.

    Each delta is applied on its parameter's device in float32; low-precision weights are summed
    in float32 masters and rounded once (module docstring).
    """

    deltas: dict[str, ParamDelta] = field(default_factory=dict)
    kind: ClassVar[str] = "weight_delta"

    def __post_init__(self) -> None:
        super().__post_init__()
        # name -> what revert copies back: an exact copy of the weight, or (low precision, not the
        # weight's first edit) the previous float32 master, which rounds to the previous weight
        self._backup: dict[str, torch.Tensor] = {}
        # name -> the handle's master entry before this edit (None: there was none)
        self._masters_before: dict[str, torch.Tensor | None] = {}
        for name, delta in self.deltas.items():
            for tensor in delta.tensors(name).values():
                if not is_finite(tensor):
                    raise EditError(f"The update for {name} has NaN or infinite values; not applied.")

    def _apply(self, handle: ModelHandle) -> None:
        params = {name: handle.parameter(name) for name in self.deltas}
        for name, param in params.items():
            shape = self.deltas[name].shape
            if shape != tuple(param.shape):
                raise EditError(f"Delta for {name} has shape {shape}, parameter has {tuple(param.shape)}.")
        self._backup, self._masters_before = {}, {}
        masters = float_masters(handle)
        try:
            for name, param in params.items():
                # on the parameter's own device: with a device_map the layers live on several
                delta = self.deltas[name].materialise(param.device)
                if not needs_float_master(param):
                    self._backup[name] = param.detach().clone()
                    work = torch.promote_types(param.dtype, torch.float32)  # float64 weights stay float64
                    param.copy_((param.to(work) + delta.to(work)).to(param.dtype))
                    continue
                self._masters_before[name] = masters.get(name)
                master = masters.get(name)
                if master is None or not _master_is_current(master, param):
                    self._backup[name] = param.detach().clone()  # exact bits, whatever rounding does
                    master = param.detach().float()
                else:
                    self._backup[name] = master  # rounds to the weight as it is now (it did when applied)
                updated = master + delta
                rounded = updated.to(param.dtype)
                if not param.is_meta and torch.equal(rounded, param) and bool(delta.ne(0).any()):
                    warnings.warn(
                        f"{self.method}: the update of {name} is below {param.dtype} resolution, so the "
                        f"{param.dtype} weight did not change (its float32 sum is kept: later edits of "
                        f"this weight still add up). Load the model in float32 to apply it on its own.",
                        stacklevel=3)  # the caller of Edit.apply
                masters[name] = updated
                param.copy_(rounded)
        except BaseException:
            self._restore(handle, params)
            raise

    def _restore(self, handle: ModelHandle, params: dict[str, torch.nn.Parameter] | None = None) -> None:
        """Put back every weight and master entry this edit changed (revert, or a failed apply)."""
        masters = float_masters(handle)
        for name, saved in self._backup.items():
            param = params[name] if params is not None else handle.parameter(name)
            param.copy_(saved.to(param.dtype))  # a no-op cast for exact copies
        for name, before in self._masters_before.items():
            if before is None:
                masters.pop(name, None)
            else:
                masters[name] = before
        self._backup, self._masters_before = {}, {}

    def _revert(self, handle: ModelHandle) -> None:
        self._restore(handle)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            out.update(delta.tensors(name))
        return out

    @classmethod
    def from_parts(cls, common: dict[str, Any], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> WeightDelta:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, part = key.rsplit("::", 1)
            grouped.setdefault(name, {})[part] = tensor
        deltas = {name: ParamDelta(**parts) for name, parts in grouped.items()}
        return cls(deltas=deltas, **common)


# ---------------------------------------------------------------------------------------------
# Module patches
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ModulePatch(Edit):
    """Extra parameters attached to modules by forward hooks; the model's weights are untouched.

    Subclasses implement :meth:`hooks`, returning ``(module name, forward hook)`` pairs; the hook
    has the signature of ``nn.Module.register_forward_hook`` and returns the new output.
    """

    kind: ClassVar[str] = "module_patch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for key, tensor in self.tensors().items():
            if not is_finite(tensor):
                raise EditError(f"The patch tensor {key} has NaN or infinite values; not applied.")

    @abstractmethod
    def hooks(self, handle: ModelHandle) -> list[tuple[str, Callable]]: ...

    def _apply(self, handle: ModelHandle) -> None:
        for name, hook in self.hooks(handle):
            self._handles.append(handle.module(name).register_forward_hook(hook))

    def _revert(self, handle: ModelHandle) -> None:
        for hook_handle in self._handles:
            hook_handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------
# Inference wrappers
# ---------------------------------------------------------------------------------------------
@dataclass
class Route:
    """How one query is answered: by which model handle, with which full prompt text.

    ``prefix_chars`` is the length of text put before the user's prompt (IKE's demonstrations,
    SERAC's retrieved edit), so callers can still locate the original prompt's tokens.
    """

    handle: ModelHandle
    prompt: str
    prefix_chars: int = 0
    routed_by: str | None = None  # method name that changed the route, if any


@dataclass(eq=False)
class InferenceWrapper(Edit):
    """Leaves every weight alone; changes how queries are answered through :meth:`route`."""

    kind: ClassVar[str] = "inference_wrapper"

    def _apply(self, handle: ModelHandle) -> None:
        pass  # routing is consulted by the session while the edit is on its stack

    def _revert(self, handle: ModelHandle) -> None:
        pass

    @abstractmethod
    def route(self, handle: ModelHandle, route: Route) -> Route: ...


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------
def _common_fields(edit: Edit) -> dict[str, Any]:
    return {
        "method": edit.method,
        "requests": [r.to_dict() for r in edit.requests],
        "hparams": edit.hparams,
        "stats": vars(edit.stats),
        "info": edit.info,
    }


def save_edit(edit: Edit, path: str | Path) -> Path:
    """Save as JSON metadata plus a safetensors file; a half-written save never replaces a good one."""
    base = Path(path)
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "editscope-edit/1", "type": type(edit).__name__, "kind": edit.kind,
            "common": _common_fields(edit), "config": edit.config()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in edit.tensors().items()}
    # The tensors land first: a reader that finds the JSON finds its tensors complete.
    with atomic_path(base.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(base.with_suffix(".json"), json.dumps(meta, indent=1, default=_json_default))
    return base.with_suffix(".json")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"Cannot store {type(value).__name__} in edit metadata.")


def load_edit(path: str | Path) -> Edit:
    """Load an edit saved by :func:`save_edit` (JSON + safetensors only; never unpickles)."""
    base = Path(path)
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EditError(f"Cannot read saved edit {base}.json: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != "editscope-edit/1":
        raise EditError(f"{base}.json is not an EditScope edit file.")
    cls = EDIT_TYPES.get(meta.get("type", ""))
    if cls is None:
        from editing.methods import import_all_methods  # the method modules register their edit types

        import_all_methods()

        cls = EDIT_TYPES.get(meta.get("type", ""))
    if cls is None:
        raise EditError(f"Unknown edit type {meta.get('type')!r} in {base}.json.")
    try:  # a damaged or foreign file is a clear EditError, whatever the reader raised
        tensors = load_file(str(base.with_suffix(".safetensors")))
        common = dict(meta["common"])
        common["requests"] = [EditRequest.from_dict(r) for r in common["requests"]]
        common["stats"] = EditStats(**common["stats"])
        return cls.from_parts(common, meta.get("config", {}), tensors)
    except EditError:
        raise
    except Exception as err:
        raise EditError(f"Cannot load saved edit {base}: {type(err).__name__}: {err}") from err
