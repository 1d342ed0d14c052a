"""One user's ordered stack of edits over a shared, never-mutated-at-rest model."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editing.edit import Edit, EditError, Route, handle_stack, load_edit
from editing.request import EditRequest

if TYPE_CHECKING:
    from editing.methods.base import EditMethod, HParams, ProgressFn
    from editing.models import ModelHandle


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
            try:
                for edit in self._stack:
                    edit.apply(self.handle)
                yield self
            finally:
                # Revert everything applied since entry — ours and any edit a method applied
                # inside the block — newest first.
                while stack:
                    stack[-1].revert(self.handle)
                self._depth = 0

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
        route = Route(handle=self.handle, prompt=prompt)
        for edit in self._stack:
            route = edit.route(self.handle, route)
        return route

    def routes(self, prompts: Sequence[str]) -> list[Route]:
        """:meth:`route` for many prompts; wrappers first do their per-query work in one batch."""
        prompts = list(prompts)
        for edit in self._stack:
            edit.prepare_routes(self.handle, prompts)
        return [self.route(prompt) for prompt in prompts]

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
