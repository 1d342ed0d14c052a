"""Build a cached folder once per machine: a lock, a progress file, an atomic rename.

Several processes (the app, a CLI run, a test worker) may ask for the same cached artefact — the
demo model, a converted pretrained model — at the same moment. :func:`build_once` lets exactly
one of them build it; the others wait, and while they wait they report the builder's own
progress (read from a small JSON file beside the lock) instead of a frozen "starting". A failed
build leaves its error in that file, so a waiting process says why, and the next call retries.

The folder appears whole or not at all: it is built under ``<name>.tmp-<pid>`` and renamed into
place, and it counts as built only once its ``marker`` file exists.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from editing.storage.files import atomic_write_text

ProgressFn = Callable[[float, str], None]

#: how often a waiting process re-reads the builder's progress (seconds)
POLL_SECONDS = 0.5


class BuildFailed(RuntimeError):
    """Building the cached folder failed; the message says what was being built and why."""


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def progress_path(target: Path) -> Path:
    """The JSON file (``fraction``, ``message``, ``pid``, ``error``) a build writes as it goes."""
    return target.with_name(target.name + ".progress.json")


def read_progress(target: Path) -> dict | None:
    """The last progress record of a build of ``target`` (None when there is none or it is unreadable)."""
    try:
        return json.loads(progress_path(target).read_text())
    except (OSError, ValueError):
        return None


def is_built(target: Path, marker: str) -> bool:
    return (target / marker).exists()


def build_once(target: Path, build: Callable[[Path, ProgressFn], None], *, what: str, marker: str,
               progress: ProgressFn | None = None) -> Path:
    """Return ``target``, building it first with ``build(tmp_folder, report)`` unless it is built.

    ``build`` writes everything (``marker`` last, or at any point: the rename makes it visible at
    once) into the temporary folder it is given and calls ``report(fraction, message)`` as it
    goes. While another process holds the build lock, ``progress`` is called with "waiting for
    another process that is building <what>: <its progress>". Raises :class:`BuildFailed` when the
    build raises (the error is kept in the progress file for waiting processes to show).
    """
    if is_built(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(target), "w") as lock_file:
        _acquire(lock_file, target, what, progress)
        try:
            if not is_built(target, marker):
                _build(target, build, what, marker, progress)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def _acquire(lock_file, target: Path, what: str, progress: ProgressFn | None) -> None:
    """Take the build lock; while another process holds it, relay that process's progress."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    while True:
        if progress is not None:
            record = read_progress(target) or {}
            fraction = float(record.get("fraction", 0.0))
            detail = record.get("message") or "starting"
            progress(fraction, f"waiting for another process that is building {what}: {detail}")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(POLL_SECONDS)


def _build(target: Path, build: Callable[[Path, ProgressFn], None], what: str, marker: str,
           progress: ProgressFn | None) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    status = progress_path(target)

    def report(fraction: float, message: str) -> None:
        atomic_write_text(status, json.dumps({"fraction": float(fraction), "message": message, "pid": os.getpid()}))
        if progress is not None:
            progress(fraction, message)

    report(0.0, f"building {what}")
    try:
        build(tmp, report)
        if not (tmp / marker).exists():
            raise BuildFailed(f"building {what} finished without writing {marker}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(status, json.dumps({"fraction": 0.0, "message": f"failed: {err}", "pid": os.getpid(),
                                              "error": f"{type(err).__name__}: {err}"}))
        if isinstance(err, Exception) and not isinstance(err, BuildFailed):
            raise BuildFailed(f"Building {what} failed: {type(err).__name__}: {err}") from err
        raise
    report(1.0, f"{what} ready")
