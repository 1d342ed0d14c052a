"""One user's ordered stack of edits over a shared, never-mutated-at-rest model.

Long runs (:meth:`EditSession.stack_cache`): a sequential run enters ``session.active()`` for every
step (to compute the next edit, then to judge), and applying then reverting the stack one edit at a
time made step n cost O(n) tensor work — O(n²) for a run. Inside ``with session.stack_cache():``
the session keeps, for each parameter its weight deltas change, the parameter's value with the
whole stack applied (and the original value, and the float32 master of a half-precision weight).
Entering ``active()`` then writes each of those parameters once and applies only the edits added
since the last entry (one per step in a sequential run); leaving restores the originals by copy.
The tensor work of a step is therefore constant in n: one copy in and one copy out per edited
parameter, plus the newest edit's own apply.

Why this design:

* **The lock is still taken per operation.** The run could instead keep its stack applied and hold
  the model's lock for the whole run, but then an interactive edit would wait for the whole run,
  not for at most one step as the README promises (the dashboard's background jobs release the
  lock between steps so a waiting interactive edit gets in, see
  :mod:`editing.core.concurrency`). So the stack is still reverted before the lock is released; only
  re-applying it became cheap.
* **Cached weights, not a cached sum of deltas.** A fused ``W + (Δ₁ + … + Δₙ)`` costs the same one
  add per parameter, but rounds differently from ``((W + Δ₁) + Δ₂) + …``, so the cached path would
  answer slightly differently from the uncached one. The stacked weights themselves are the very
  bits applying the edits one by one gives (each edit is applied once, on top of the previous
  state, exactly as before) and half-precision weights keep their float32 masters unchanged.
* **Reverting copies saved originals back** (never subtracts), so the shared model is bit for bit
  the original after every block, also on error or cancellation; before writing, the saved
  originals are compared with the weights, so a base model changed behind the session's back only
  costs a rebuild, never a stale stack.
* **Opt-in, for runs.** The cache holds two copies of each edited parameter (one layer for ROME) for
  as long as the block lasts; browser sessions, whose stacks are short, keep the plain path.

What stays O(n): Python bookkeeping of the stack (each edit is put on the handle's stack, which
methods such as AlphaEdit, T-Patcher and CaliNET read — microseconds per edit), and module patches
(T-Patcher, CaliNET, GRACE) and inference wrappers (SERAC, IKE), which are applied one by one as
before: registering a hook or consulting a router costs microseconds and changes no weight, while
their forward-pass cost grows with the patches themselves, not with re-application.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from editing.core.edit import (
    Edit,
    EditError,
    EditOrderError,
    InferenceWrapper,
    ModulePatch,
    Route,
    WeightDelta,
    float_masters,
    handle_stack,
    load_edit,
)
from editing.core.request import EditRequest

if TYPE_CHECKING:
    from editing.methods.base import EditMethod, HParams, ProgressFn
    from editing.models.loader import ModelHandle


class EditSession:
    """Edits of one user (one browser tab, one experiment) on a shared :class:`ModelHandle`.

    The base model is shared by every session and holds no session's edits at rest. Use
    ``with session.active():`` to run code against the edited model: the session's edits are
    applied under the handle's lock and reverted — bit for bit — when the block ends, even on
    error. Undo and redo move edits between the stack and a redo list; nothing is recomputed.
    """

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self._stack: list[Edit] = []
        self._redo: list[Edit] = []
        self._depth = 0
        self._caching = 0  # depth of stack_cache() blocks
        self._cache: _StackCache | None = None

    # -- the stack -----------------------------------------------------------------------------
    @property
    def edits(self) -> tuple[Edit, ...]:
        return tuple(self._stack)

    @property
    def can_undo(self) -> bool:
        return bool(self._stack)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> Edit:
        if not self._stack:
            raise EditError("Nothing to undo.")
        edit = self._stack.pop()
        self._redo.append(edit)
        return edit

    def redo(self) -> Edit:
        if not self._redo:
            raise EditError("Nothing to redo.")
        edit = self._redo.pop()
        self._stack.append(edit)
        return edit

    def clear(self) -> None:
        self._stack.clear()
        self._redo.clear()
        self._cache = None  # its tensors describe a stack that is gone

    def push(self, edit: Edit) -> None:
        """Add an already computed (or loaded) edit on top of the stack."""
        if edit.is_applied:
            raise EditError("Push edits that are not applied to any model.")
        self._stack.append(edit)
        self._redo.clear()

    @contextmanager
    def tentatively(self) -> Iterator[EditSession]:
        """Keep what the block pushes only if it ends without error; otherwise the stack and the
        redo list are put back exactly as they were (e.g. an edit whose evaluation failed)."""
        if self._depth:
            raise EditError("tentatively() cannot be used while the session's edits are active.")
        stack, redo = list(self._stack), list(self._redo)
        try:
            yield self
        except BaseException:
            self._stack, self._redo = stack, redo
            raise

    # -- running against the edited model ------------------------------------------------------
    @contextmanager
    def stack_cache(self) -> Iterator[EditSession]:
        """Within the block, :meth:`active` re-applies the stack's weight deltas from cached stacked
        weights: constant tensor work per entry, whatever the stack's length (module docstring).

        For long runs (``eval.runs`` holds it around a sequential run). The cache is dropped when
        the outermost block ends; the model is never left edited, also on error.
        """
        self._caching += 1
        try:
            yield self
        finally:
            self._caching -= 1
            if not self._caching:
                self._cache = None

    @contextmanager
    def active(self) -> Iterator[EditSession]:
        """Apply this session's edits for the duration of the block, under the model's lock."""
        with self.handle.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            stack = handle_stack(self.handle)
            if stack:
                raise EditError("The shared model holds edits of another session; refusing to stack.")
            self._depth = 1
            entry = _Entry()
            try:
                if not (self._caching and self._cacheable() and self._apply_cached(entry)):
                    for edit in self._stack:
                        edit.apply(self.handle)
                yield self
            finally:
                try:
                    # Revert everything applied since entry — ours and any edit a method applied
                    # inside the block — newest first; edits the cache stood for only leave the stack.
                    while stack:
                        top = stack[-1]
                        if id(top) in entry.attached:
                            _detach(top, self.handle)
                        else:
                            top.revert(self.handle)
                finally:
                    entry.restore(self.handle)
                    self._depth = 0

    def _cacheable(self) -> bool:
        """Whether the stack's weights can come from a cache: its weight deltas apply by plain
        ``W + Δ``, and every other edit leaves the weights alone (type checks only: cheap per edit)."""
        for edit in self._stack:
            if isinstance(edit, ModulePatch | InferenceWrapper):
                continue  # hooks and routing: they change no weight, and are applied one by one
            if not isinstance(edit, WeightDelta) or type(edit)._apply is not WeightDelta._apply \
                    or type(edit)._revert is not WeightDelta._revert:
                return False  # an edit with its own way of writing weights: the plain path
        return True

    def _apply_cached(self, entry: _Entry) -> bool:
        """Apply the stack: the weight deltas the cache covers by writing each parameter they change
        once, then the weight deltas added since (usually one), and extend the cache with them.

        Returns False, having changed nothing, where a weight has no values to cache (``meta``).
        """
        handle = self.handle
        weight_edits = [e for e in self._stack if isinstance(e, WeightDelta)]
        cache = self._cache
        if cache is None or not cache.covers_prefix(weight_edits):
            cache = _StackCache()  # built below by applying every edit once
        new = weight_edits[len(cache.edits):]
        new_names = list(dict.fromkeys(name for edit in new for name in edit.deltas))
        params = {name: handle.parameter(name) for name in [*cache.weights, *new_names]}
        if any(param.is_meta for param in params.values()):
            return False
        if not cache.base_intact(params):
            cache = _StackCache()  # weights changed behind the cache: build it again on them
            new, new_names = weight_edits, list(dict.fromkeys(name for e in weight_edits for name in e.deltas))
            params.update((name, handle.parameter(name)) for name in new_names if name not in params)
        self._cache = cache
        masters = float_masters(handle)
        with torch.no_grad():
            for name, weight in cache.weights.items():
                entry.written[name] = (cache.base[name], masters.get(name))
                _write(params[name], weight)
                if name in cache.masters:
                    masters[name] = cache.masters[name]
        # originals of the parameters only the new edits change: still untouched at this point
        new_base = {name: params[name].detach().clone() for name in new_names if name not in cache.base}
        covered = {id(edit) for edit in cache.edits}
        for edit in self._stack:
            if id(edit) in covered:
                _attach(edit, handle)
                entry.attached.add(id(edit))
            else:
                edit.apply(handle)  # the new weight deltas (bit for bit as ever), hooks, wrappers
        if new:  # the parameters now hold the whole stack: remember them for the next entry
            stacked = {name: params[name].detach().clone() for name in new_names}
            stacked_masters = {name: masters.get(name) for name in new_names}
            # committed only now, all together: a half-extended cache would apply an edit twice
            cache.base.update(new_base)
            cache.weights.update(stacked)
            for name, master in stacked_masters.items():
                if master is not None:
                    cache.masters[name] = master  # edit.py replaces masters, never writes into one
                else:
                    cache.masters.pop(name, None)
            cache.edits.extend(new)
        return True

    def apply(self, method: str | EditMethod, requests: EditRequest | Sequence[EditRequest],
              hparams: HParams | dict[str, Any] | None = None,
              progress: ProgressFn | None = None) -> Edit:
        """Compute an edit on top of this session's edits and push it on the stack.

        On any error the stack and the model stay as they were.
        """
        from editing.methods import available_methods, get_method
        from editing.methods.base import EditMethod, as_requests

        if isinstance(method, str):
            method_obj = get_method(method)
        elif isinstance(method, EditMethod):
            method_obj = method
        else:  # None or a number would fail later as an AttributeError that names no argument
            raise TypeError(f"method must be a method name (one of {', '.join(available_methods())}) or an "
                            f"EditMethod, not {type(method).__name__}.")
        requests = as_requests(requests)
        with self.active():
            edit = method_obj.apply(self.handle, requests, hparams, progress=progress)
        self._stack.append(edit)
        self._redo.clear()
        return edit

    def route(self, prompt: str) -> Route:
        """How ``prompt`` is answered under this session's inference wrappers (SERAC, IKE)."""
        return self._route(prompt, self._routing())

    def routes(self, prompts: Sequence[str]) -> list[Route]:
        """:meth:`route` for many prompts; wrappers first do their per-query work in one batch."""
        prompts = list(prompts)
        routing = self._routing()
        for edit in routing:
            edit.prepare_routes(self.handle, prompts)
        return [self._route(prompt, routing) for prompt in prompts]

    def _routing(self) -> list[Edit]:
        """The edits that change routing (inference wrappers): asking each edit of a long stack of
        weight edits about each prompt cost O(edits × prompts) calls that changed nothing."""
        return [e for e in self._stack
                if type(e).route is not Edit.route or type(e).prepare_routes is not Edit.prepare_routes]

    def _route(self, prompt: str, routing: Sequence[Edit]) -> Route:
        route = Route(handle=self.handle, prompt=prompt)
        for edit in routing:
            route = edit.route(self.handle, route)
        return route

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Save the stack (each edit as JSON + safetensors) with a manifest.

        Edit files get names of their own (``edit_000_<token>``) and the manifest is replaced last,
        so a save that fails half-way leaves the previous save in the folder intact.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:8]
        names = [f"edit_{index:03d}_{token}" for index in range(len(self._stack))]
        saved = False
        try:
            for name, edit in zip(names, self._stack, strict=True):
                edit.save(folder / name)
            manifest = {"format": "editscope-session/1", "model": self.handle.name, "edits": names}
            tmp = folder / f"session.json.{token}.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(folder / "session.json")
            saved = True
        finally:  # remove a failed save's files, or after success the previous save's
            for path in [*folder.glob("edit_*"), *folder.glob(f"session.json.{token}.tmp")]:
                ours = path.name.split(".")[0] in names
                if ours != saved or path.suffix == ".tmp":
                    path.unlink(missing_ok=True)
        return folder / "session.json"

    def load(self, folder: str | Path) -> None:
        """Replace the stack by one saved with :meth:`save`; on error the stack is unchanged."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "session.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EditError(f"Cannot read {folder / 'session.json'}: {err}") from err
        if not isinstance(manifest, dict) or manifest.get("format") != "editscope-session/1":
            raise EditError(f"{folder} does not hold a saved EditScope session.")
        names = manifest.get("edits", [])
        # only plain file names: a manifest must not make us read files outside its folder
        if not isinstance(names, list) or not all(
                isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n and "\\" not in n
                for n in names):
            raise EditError(f"{folder / 'session.json'} names edit files outside its folder.")
        edits = [load_edit(folder / name) for name in names]
        self._stack = edits
        self._redo = []


@dataclass
class _StackCache:
    """The weights a prefix of a session's weight deltas give together (see ``stack_cache``)."""

    edits: list[WeightDelta] = field(default_factory=list)  # the weight deltas covered, in stack order
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> its original value
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> value with them applied
    masters: dict[str, torch.Tensor] = field(default_factory=dict)  # half-precision weights' float32 masters

    def covers_prefix(self, weight_edits: Sequence[Edit]) -> bool:
        """Whether the covered edits are the first ones of ``weight_edits`` (an undo breaks it)."""
        return len(self.edits) <= len(weight_edits) and all(
            a is b for a, b in zip(self.edits, weight_edits, strict=False))

    def base_intact(self, params: dict[str, torch.Tensor]) -> bool:
        """Whether the weights (``params``: name -> parameter, a superset of the cached ones) are
        still the originals the cache was built on."""
        return all(torch.equal(params[name], base) for name, base in self.base.items())


@dataclass
class _Entry:
    """What one entry of ``active()`` did through the cache, so that leaving undoes exactly that."""

    attached: set[int] = field(default_factory=set)  # ids of edits put on the stack without applying
    written: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # ^ parameter -> (original value, master entry before)

    def restore(self, handle: ModelHandle) -> None:
        masters = float_masters(handle)
        with torch.no_grad():
            for name, (base, master) in self.written.items():
                _write(handle.parameter(name), base)  # a copy of the saved original: bit for bit
                if master is None:
                    masters.pop(name, None)
                else:
                    masters[name] = master
        self.written.clear()


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``param`` (one function, so tests can count the writes of a step)."""
    param.copy_(value)


def _attach(edit: Edit, handle: ModelHandle) -> None:
    """Put ``edit`` on the handle's stack as applied while the cache supplies its weights (methods
    read the stack: AlphaEdit's protected keys, T-Patcher's earlier edits)."""
    if edit.is_applied:
        raise EditOrderError("This edit is already applied.")
    edit._applied_to = handle  # the cache stands for the edit's own apply
    handle_stack(handle).append(edit)


def _detach(edit: Edit, handle: ModelHandle) -> None:
    """Take an attached edit off the stack (the cache's originals are restored afterwards)."""
    stack = handle_stack(handle)
    if not stack or stack[-1] is not edit:
        raise EditOrderError("Edits must be reverted in reverse order of application.")
    stack.pop()
    edit._applied_to = None
