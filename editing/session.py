"""One user's ordered stack of edits over a shared, never-mutated-at-rest model."""

from __future__ import annotations

import json
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
        from editing.methods import get_method

        method_obj = get_method(method) if isinstance(method, str) else method
        if isinstance(requests, EditRequest):
            requests = [requests]
        with self.active():
            edit = method_obj.apply(self.handle, list(requests), hparams, progress=progress)
        self._stack.append(edit)
        self._redo.clear()
        return edit

    def route(self, prompt: str) -> Route:
        """How ``prompt`` is answered under this session's inference wrappers (SERAC, IKE)."""
        route = Route(handle=self.handle, prompt=prompt)
        for edit in self._stack:
            route = edit.route(self.handle, route)
        return route

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Save the stack (each edit as JSON + safetensors) with a manifest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for index, edit in enumerate(self._stack):
            name = f"edit_{index:03d}"
            edit.save(folder / name)
            names.append(name)
        manifest = {"format": "editscope-session/1", "model": self.handle.name, "edits": names}
        tmp = folder / "session.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(folder / "session.json")
        return folder / "session.json"

    def load(self, folder: str | Path) -> None:
        """Replace the stack by one saved with :meth:`save`; on error the stack is unchanged."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "session.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EditError(f"Cannot read {folder / 'session.json'}: {err}") from err
        if manifest.get("format") != "editscope-session/1":
            raise EditError(f"{folder} does not hold a saved EditScope session.")
        edits = [load_edit(folder / name) for name in manifest.get("edits", [])]
        self._stack = edits
        self._redo = []
