"""Safety of files that come from outside: uploads, user-typed paths and archives of saved edits.

Everything a person hands to EditScope through the dashboard (a data set file, a zipped edit
stack, a path typed into a text box) goes through this module first:

* :func:`save_upload` writes an upload into the upload folder, size-limited, under a sanitised,
  content-addressed name (nothing of the user's file name can point elsewhere);
* :func:`resolve_allowed` turns a typed path into a real path inside the allowed folders
  (symbolic links are followed before the check, so a link cannot lead outside);
* :func:`unpack_edit_stack` safely unzips an uploaded edit stack: JSON and safetensors members
  only (never pickles), no absolute or ``..`` paths, no links, bounded member count and size,
  extracted all-or-nothing, manifest checked — then ``EditSession.load(folder)`` can read it;
* :func:`pack_edit_stack` zips a saved stack for download, written atomically.

Limits come from environment variables so a deployment can change them without code:
``EDITSCOPE_MAX_UPLOAD_MB`` (default 50, the ``server.maxUploadSize`` of .streamlit/config.toml),
``EDITSCOPE_MAX_UNPACKED_MB`` (default 2048) and ``EDITSCOPE_ALLOWED_DIRS`` (extra allowed
folders, separated by ``os.pathsep``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from editing.storage.files import atomic_path, atomic_write_bytes
from editing.storage.paths import DATA_DIR, cache_dir

MIB = 1024 * 1024
#: what a saved edit stack may contain (see editing.core.edit.save_edit and EditSession.save)
EDIT_STACK_SUFFIXES = (".json", ".safetensors")
#: data set files the readers in eval/datasets.py understand
DATASET_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
MAX_ARCHIVE_MEMBERS = 1000
#: a member that unpacks to more than this many times its compressed size is treated as a zip bomb
MAX_COMPRESSION_RATIO = 200
_CHUNK = 1 * MIB


class UnsafeInput(ValueError):
    """An upload or path was refused; the message says why and what is allowed."""


class UploadTooLarge(UnsafeInput):
    """An upload (or what an archive unpacks to) is over the size limit."""


class UnsafePath(UnsafeInput):
    """A path points outside the allowed folders, or an archive member has an unsafe name."""


class DestinationExists(UnsafeInput):
    """The folder an archive was to be unpacked into exists already (nothing was overwritten)."""


# -- limits and folders ------------------------------------------------------------------------
def _env_mib(name: str, default_mib: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return max(1, int(float(value) * MIB)) if value else default_mib * MIB
    except ValueError:
        return default_mib * MIB


def max_upload_bytes() -> int:
    """Largest upload accepted (``EDITSCOPE_MAX_UPLOAD_MB``, default 50 MiB like the app's config)."""
    return _env_mib("EDITSCOPE_MAX_UPLOAD_MB", 50)


def max_unpacked_bytes() -> int:
    """Largest total size an uploaded archive may unpack to (``EDITSCOPE_MAX_UNPACKED_MB``, default 2 GiB)."""
    return _env_mib("EDITSCOPE_MAX_UNPACKED_MB", 2048)


def upload_dir(*parts: str) -> Path:
    """The folder uploads are written to (under the user cache), created."""
    return cache_dir("uploads", *parts)


def allowed_roots() -> list[Path]:
    """Folders a user-supplied path may point into: the bundled data, the user cache
    (uploads, runs, exports, saved edits) and any folder listed in ``EDITSCOPE_ALLOWED_DIRS``."""
    roots = [DATA_DIR, cache_dir()]
    extra = os.environ.get("EDITSCOPE_ALLOWED_DIRS", "")
    roots.extend(Path(p).expanduser() for p in extra.split(os.pathsep) if p.strip())
    return [root.resolve() for root in roots]


def safe_filename(name: str, default: str = "upload") -> str:
    """A file name that cannot point anywhere: the last path part, reduced to ``[A-Za-z0-9._-]``,
    no leading dots, at most 100 characters."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:100].strip("._")  # no leading dot: no hidden files
    return cleaned or default


def resolve_allowed(path: str | Path, roots: Sequence[Path] | None = None, must_exist: bool = False) -> Path:
    """``path`` resolved (links followed), checked to lie inside one of ``roots``.

    Raises :class:`UnsafePath` naming the allowed folders otherwise, and :class:`FileNotFoundError`
    when ``must_exist`` and it does not exist.
    """
    text = str(path)
    if not text.strip() or "\x00" in text:
        raise UnsafePath("No usable path given.")
    roots = [Path(r).resolve() for r in (roots if roots is not None else allowed_roots())]
    resolved = Path(text).expanduser().resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise UnsafePath(
            f"{text!r} is outside the folders EditScope may read or write: {', '.join(map(str, roots))}. "
            f"Upload the file instead, or add its folder to EDITSCOPE_ALLOWED_DIRS."
        )
    if must_exist and not resolved.exists():
        raise FileNotFoundError(f"{text!r} does not exist.")
    return resolved


def check_suffix(name: str, allowed: Iterable[str]) -> None:
    """Raise :class:`UnsafeInput` unless ``name`` ends with one of ``allowed`` (case-insensitive)."""
    allowed = tuple(s.lower() for s in allowed)
    if not name.lower().endswith(allowed):
        raise UnsafeInput(f"{name!r} is not an accepted file type; accepted: {', '.join(allowed)}.")


# -- uploads -----------------------------------------------------------------------------------
def _read_limited(data: bytes | bytearray | memoryview | BinaryIO, limit: int, what: str) -> bytes:
    """All of ``data``, reading at most ``limit + 1`` bytes so a huge stream is never held whole."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raw = data.read(limit + 1)
        if not isinstance(raw, bytes):
            raise UnsafeInput(f"The {what} must be read in binary mode.")
    if len(raw) > limit:
        raise UploadTooLarge(f"The {what} is larger than the limit of {limit / MIB:.0f} MiB.")
    return raw


def save_upload(data: bytes | BinaryIO, filename: str, folder: Path | None = None,
                max_bytes: int | None = None, allowed_suffixes: Iterable[str] | None = DATASET_SUFFIXES) -> Path:
    """Write an uploaded file into the upload folder and return its path.

    The name is ``<first 12 hex digits of the content's SHA-256>-<sanitised name>``, so two uploads
    never overwrite each other and a re-upload finds the same file. The write is atomic; nothing
    is written when the upload is too large or of a refused type.
    """
    limit = max_bytes if max_bytes is not None else max_upload_bytes()
    name = safe_filename(filename)
    if allowed_suffixes is not None:
        check_suffix(name, allowed_suffixes)
    raw = _read_limited(data, limit, f"upload {name!r}")
    folder = resolve_allowed(folder) if folder is not None else upload_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(raw).hexdigest()[:12]}-{name}"
    if not target.exists():
        atomic_write_bytes(target, raw)
    return target


# -- archives ----------------------------------------------------------------------------------
def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path, refusing anything that could land outside the target folder."""
    name = info.filename
    if "\\" in name or "\x00" in name:
        raise UnsafePath(f"Archive member {name!r} has a forbidden character in its name.")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise UnsafePath(f"Archive member {name!r} has an absolute path.")
    if any(part in ("..", "") for part in path.parts) or not path.parts:
        raise UnsafePath(f"Archive member {name!r} leaves the archive's folder.")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafePath(f"Archive member {name!r} is a symbolic link; links are not accepted.")
    return path


def safe_extract_zip(archive: str | Path | bytes | BinaryIO, dest: str | Path,
                     allowed_suffixes: Iterable[str] | None = EDIT_STACK_SUFFIXES,
                     max_members: int = MAX_ARCHIVE_MEMBERS, max_total_bytes: int | None = None,
                     roots: Sequence[Path] | None = None) -> Path:
    """Extract a zip archive into ``dest`` (which must not exist yet), all or nothing.

    Every member is checked before anything is written (names, links, types, declared sizes),
    and sizes are counted again while extracting because a zip's headers can lie. The archive is
    unpacked into a temporary sibling folder that is renamed to ``dest`` only when complete.
    """
    limit = max_total_bytes if max_total_bytes is not None else max_unpacked_bytes()
    dest = resolve_allowed(dest, roots)
    if dest.exists():
        raise DestinationExists(f"{dest} already exists; unpack into a new folder.")
    source: str | BinaryIO = io.BytesIO(archive) if isinstance(archive, bytes) else (
        str(archive) if isinstance(archive, str | Path) else archive)
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UnsafeInput(f"The upload is not a readable zip archive ({err}).") from err
    with zf:
        members = [info for info in zf.infolist() if not info.is_dir()]
        if len(zf.infolist()) > max_members:
            raise UnsafeInput(f"The archive has {len(zf.infolist())} entries; at most {max_members} are accepted.")
        declared = 0
        paths = []
        for info in members:
            path = _member_path(info)
            if allowed_suffixes is not None:
                check_suffix(path.name, allowed_suffixes)
            if info.flag_bits & 0x1:
                raise UnsafeInput(f"Archive member {info.filename!r} is encrypted.")
            if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, MIB // MAX_COMPRESSION_RATIO):
                raise UploadTooLarge(f"Archive member {info.filename!r} expands {info.file_size} bytes from "
                                     f"{info.compress_size}: refused as a possible zip bomb.")
            declared += info.file_size
            paths.append(path)
        if declared > limit:
            raise UploadTooLarge(f"The archive unpacks to {declared / MIB:.0f} MiB; "
                                 f"the limit is {limit / MIB:.0f} MiB.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
        try:
            written = 0
            for info, path in zip(members, paths, strict=True):
                target = staging.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    copied = 0
                    while chunk := src.read(_CHUNK):
                        copied += len(chunk)
                        written += len(chunk)
                        if copied > info.file_size or written > limit:
                            raise UploadTooLarge(f"Archive member {info.filename!r} is larger than its header says.")
                        out.write(chunk)
            try:
                staging.rename(dest)
            except OSError as err:
                if dest.exists():  # another writer finished first; its folder is left as it is
                    raise DestinationExists(f"{dest} already exists; unpack into a new folder.") from err
                raise
        except zipfile.BadZipFile as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise UnsafeInput(f"The archive is damaged ({err}).") from err
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def check_edit_stack_folder(folder: str | Path) -> Path:
    """Check a folder holds a saved edit stack whose manifest names only files inside it.

    Returns the folder; raises :class:`UnsafeInput` otherwise (before any edit is read).
    """
    folder = Path(folder)
    manifest_path = folder / "session.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsafeInput(f"The edit stack has no readable session.json ({err}).") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "editscope-session/1":
        raise UnsafeInput("session.json is not an EditScope edit-stack manifest.")
    names = manifest.get("edits", [])
    if not isinstance(names, list):
        raise UnsafeInput("session.json: 'edits' must be a list of file names.")
    for name in names:
        if not isinstance(name, str) or safe_filename(name, default="") != name:
            raise UnsafePath(f"session.json names {name!r}, which is not a plain file name.")
        for suffix in EDIT_STACK_SUFFIXES:
            if not (folder / f"{name}{suffix}").is_file():
                raise UnsafeInput(f"The edit stack lacks {name}{suffix}.")
    return folder


def unpack_edit_stack(data: bytes | BinaryIO, dest: str | Path | None = None,
                      max_bytes: int | None = None) -> Path:
    """Unpack an uploaded zip of a saved edit stack and return the folder for ``EditSession.load``.

    The upload is size-limited, unpacked with :func:`safe_extract_zip` (JSON and safetensors only)
    into ``dest`` (default: a content-addressed folder under the upload folder) and its manifest is
    checked. A stack whose manifest lies one folder down (a zipped folder) is found there.
    """
    raw = _read_limited(data, max_bytes if max_bytes is not None else max_upload_bytes(), "edit-stack upload")
    content_addressed = dest is None
    if dest is None:
        dest = upload_dir("stacks") / hashlib.sha256(raw).hexdigest()[:16]
        if dest.exists():
            try:
                return check_edit_stack_folder(_stack_root(dest))
            except UnsafeInput:
                shutil.rmtree(dest, ignore_errors=True)
    try:
        folder = safe_extract_zip(raw, dest)
    except DestinationExists:
        if not content_addressed:
            raise
        # Another session unpacked the very same bytes meanwhile (the folder is named by their
        # hash and appears atomically), so its folder is this upload's folder.
        folder = Path(dest)
    try:
        return check_edit_stack_folder(_stack_root(folder))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _stack_root(folder: Path) -> Path:
    if (folder / "session.json").exists():
        return folder
    subfolders = [p for p in folder.iterdir() if p.is_dir()]
    if len(subfolders) == 1 and (subfolders[0] / "session.json").exists():
        return subfolders[0]
    return folder


def pack_edit_stack(folder: str | Path, archive: str | Path) -> Path:
    """Zip a saved edit stack (``EditSession.save`` output) for download; written atomically.

    Only the manifest and the files it names are packed (JSON and safetensors).
    """
    folder = check_edit_stack_folder(folder)
    manifest = json.loads((folder / "session.json").read_text(encoding="utf-8"))
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder / "session.json", "session.json")
        for name in manifest.get("edits", []):
            for suffix in EDIT_STACK_SUFFIXES:
                zf.write(folder / f"{name}{suffix}", f"{name}{suffix}")
    return archive
