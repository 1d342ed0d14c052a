"""Where EditScope keeps files: the bundled data folder and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

#: the project's data/ folder (fact base, corpus, templates)
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def cache_dir(*parts: str) -> Path:
    """A folder under the user cache (``$EDITSCOPE_CACHE`` or ``~/.cache/editscope``), created."""
    root = os.environ.get("EDITSCOPE_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "editscope"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
