"""Security: no remote code, safetensors before pickles, saved edits never unpickled, uploads
size-limited, uploaded archives unpacked safely."""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch

from editing.core import safety
from editing.core.edit import EditError, load_edit
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.models.loader import load_model
from editing.models.tiny import tiny_model
from tests.helpers import random_delta

ROOT = Path(__file__).resolve().parents[2]
REQ = EditRequest("The capital of {} is", "France", "Lyon", "Paris")
small_delta = partial(random_delta, request=REQ)  # dense, on layer 1's MLP output weight


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


def logits(handle, text: str = "The capital of France is") -> torch.Tensor:
    with torch.no_grad():
        return handle.model(torch.tensor([handle.tokenizer(text)["input_ids"]])).logits


@pytest.fixture
def saved_tiny(tmp_path) -> Path:
    handle = tiny_model("gpt2")
    folder = tmp_path / "model"
    handle.model.save_pretrained(folder, safe_serialization=True)
    handle.tokenizer.save_pretrained(folder)
    return folder


# -- model loading -------------------------------------------------------------------------------
def test_load_model_passes_trust_remote_code_false_and_never_forbids_safetensors(saved_tiny, monkeypatch):
    import editing.models.loader as models

    calls: list[tuple[str, dict]] = []
    for cls_name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(models, cls_name)
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls_name, **kwargs):
            calls.append((_name, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(saved_tiny))
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is False, f"{name} called without trust_remote_code=False"
        assert kwargs.get("use_safetensors") is not False, f"{name} refuses safetensors"


def test_custom_code_in_a_model_folder_is_never_executed(saved_tiny, tmp_path):
    marker = tmp_path / "remote-code-ran"
    (saved_tiny / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class EvilConfig(GPT2Config):\n    pass\n"
        "class EvilModel(GPT2LMHeadModel):\n    pass\n"
    )
    config = json.loads((saved_tiny / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (saved_tiny / "config.json").write_text(json.dumps(config))
    try:
        handle = load_model(str(saved_tiny))
    except Exception as err:  # refusing is as good as ignoring the code: only running it is wrong
        assert "evil" not in type(err).__module__
    else:
        assert type(handle.model).__name__ == "GPT2LMHeadModel"
    assert not marker.exists(), "loading a model folder ran its custom code"


def test_safetensors_weights_are_preferred_over_a_pickle_checkpoint(saved_tiny, tmp_path):
    marker = tmp_path / "pickle-ran"
    write_pickle_payload(saved_tiny / "pytorch_model.bin", marker)
    handle = load_model(str(saved_tiny))
    reference = tiny_model("gpt2")
    assert torch.allclose(logits(handle), logits(reference), atol=1e-5)
    assert not marker.exists()


# torch's weights-only unpickler notes the crafted file's pickle protocol: expected here
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_pickle_only_checkpoint_is_never_unpickled_unsafely(saved_tiny, tmp_path):
    marker = tmp_path / "pickle-ran"
    (saved_tiny / "model.safetensors").unlink()
    write_pickle_payload(saved_tiny / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017 - any refusal is fine; executing the payload is not
        load_model(str(saved_tiny))
    assert not marker.exists(), "a pickled checkpoint's payload ran while loading"


# -- saved edits ---------------------------------------------------------------------------------
def test_saved_edit_with_a_pickle_in_place_of_safetensors_is_refused(tmp_path):
    handle = tiny_model("gpt2")
    path = small_delta(handle).save(tmp_path / "edit")
    marker = tmp_path / "pickle-ran"
    write_pickle_payload(path.with_suffix(".safetensors"), marker)
    with pytest.raises(Exception):  # noqa: B017 - the safetensors reader rejects it; it never unpickles
        load_edit(path)
    assert not marker.exists()


def test_saved_edit_of_an_unregistered_type_is_refused(tmp_path):
    handle = tiny_model("gpt2")
    path = small_delta(handle).save(tmp_path / "edit")
    meta = json.loads(path.read_text())
    meta["type"] = "os.system"
    path.write_text(json.dumps(meta))
    with pytest.raises(EditError, match="Unknown edit type"):
        load_edit(path)


_SOURCE_DIRS = ("editing", "eval", "pages", "ui")


def _project_sources() -> list[Path]:
    files = [ROOT / "app.py"] if (ROOT / "app.py").exists() else []
    for folder in _SOURCE_DIRS:
        if (ROOT / folder).is_dir():
            files.extend(sorted((ROOT / folder).rglob("*.py")))
    return files


def _call_text(source: str, start: int) -> str:
    """The text of the call whose opening parenthesis follows ``start``."""
    depth, end = 0, source.index("(", start)
    while end < len(source):
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        if depth == 0:
            break
        end += 1
    return source[start: end + 1]


def test_project_code_never_unpickles_or_trusts_remote_code():
    offences = []
    for path in _project_sources():
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"\bdill\.load", r"\bjoblib\.load\(",
                        r"allow_pickle\s*=\s*True", r"trust_remote_code\s*=\s*True"):
            offences.extend(f"{rel}: {m.group(0)}" for m in re.finditer(pattern, source))
        for match in re.finditer(r"\btorch\.load\(", source):
            call = _call_text(source, match.start())
            if not re.search(r"weights_only\s*=\s*True", call):
                offences.append(f"{rel}: torch.load without weights_only=True")
    assert not offences, "unsafe deserialisation in project code:\n" + "\n".join(offences)


# -- uploads -------------------------------------------------------------------------------------
class _EndlessStream(io.RawIOBase):
    """A binary stream of zeros that never ends and counts what was read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("an unbounded read of an upload")
        self.read_bytes += size
        return b"\0" * size


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private user cache (uploads land under it)."""
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_uploads_over_the_limit_are_refused_and_nothing_is_written(cache):
    with pytest.raises(safety.UploadTooLarge, match="limit"):
        safety.save_upload(b"x" * 2048, "data.json", max_bytes=1024)
    stream = _EndlessStream()
    with pytest.raises(safety.UploadTooLarge):
        safety.save_upload(stream, "endless.json", max_bytes=4096)
    assert stream.read_bytes <= 4097, "the upload was read beyond its limit"
    assert not any(p.is_file() for p in safety.upload_dir().rglob("*"))


def test_upload_limit_follows_the_environment(cache, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_MAX_UPLOAD_MB", "1")
    assert safety.max_upload_bytes() == safety.MIB
    with pytest.raises(safety.UploadTooLarge):
        safety.save_upload(b"\0" * (safety.MIB + 1), "big.json")
    path = safety.save_upload(b'[{"a": 1}]', "../../etc/cron.d/evil.json")
    assert path.parent == safety.upload_dir() and path.name.endswith("-evil.json")
    assert path.read_bytes() == b'[{"a": 1}]'


def test_uploads_of_refused_types_are_rejected(cache):
    for name in ("weights.pt", "model.bin", "x.pkl", "script.py", "noext"):
        with pytest.raises(safety.UnsafeInput, match="accepted"):
            safety.save_upload(b"data", name)


# -- archives of saved edit stacks ---------------------------------------------------------------
def _zip(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


BAD_ARCHIVES = {
    "parent path": (_zip({"../evil.json": b"{}"}), safety.UnsafePath),
    "nested parent path": (_zip({"a/../../evil.json": b"{}"}), safety.UnsafePath),
    "absolute path": (_zip({"/tmp/evil.json": b"{}"}), safety.UnsafePath),
    "drive letter": (_zip({"C:/evil.json": b"{}"}), safety.UnsafePath),
    "backslashes": (_zip({"..\\..\\evil.json": b"{}"}), safety.UnsafePath),
    "symbolic link": (_zip({"session.json": b"{}"}, symlinks=("edit_000.json",)), safety.UnsafePath),
    "pickle member": (_zip({"session.json": b"{}", "edit_000.pt": b"x"}), safety.UnsafeInput),
    "python member": (_zip({"session.json": b"{}", "hook.py": b"x"}), safety.UnsafeInput),
    "zip bomb": (_zip({"edit_000.safetensors": b"\0" * (64 * safety.MIB)}), safety.UploadTooLarge),
    "not a zip": (b"PK\x03\x04 this is not really a zip", safety.UnsafeInput),
    "empty upload": (b"", safety.UnsafeInput),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_unsafe_archives_are_refused_and_leave_nothing_behind(case, tmp_path):
    data, error = BAD_ARCHIVES[case]
    dest = tmp_path / "inbox" / "stack"
    with pytest.raises(error):
        safety.safe_extract_zip(data, dest, roots=[tmp_path / "inbox"])
    assert not dest.exists()
    leftovers = list((tmp_path / "inbox").iterdir()) if (tmp_path / "inbox").exists() else []
    assert leftovers == [], f"partial extraction left {leftovers}"
    assert not (tmp_path / "evil.json").exists()


def test_archive_member_count_and_total_size_are_bounded(tmp_path):
    many = _zip({f"edit_{i:03d}.json": b"{}" for i in range(6)})
    with pytest.raises(safety.UnsafeInput, match="entries"):
        safety.safe_extract_zip(many, tmp_path / "a", max_members=5, roots=[tmp_path])
    big = _zip({"edit_000.safetensors": random.Random(0).randbytes(safety.MIB)})  # incompressible
    with pytest.raises(safety.UploadTooLarge, match="limit"):
        safety.safe_extract_zip(big, tmp_path / "b", max_total_bytes=safety.MIB // 2, roots=[tmp_path])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_extraction_outside_the_allowed_folders_is_refused(tmp_path):
    with pytest.raises(safety.UnsafePath, match="outside"):
        safety.safe_extract_zip(_zip({"session.json": b"{}"}), tmp_path / "elsewhere", roots=[tmp_path / "inbox"])


def test_edit_stack_round_trip_through_a_zip(cache, tmp_path):
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(small_delta(handle, seed=1))
    session.push(small_delta(handle, seed=2))
    with session.active():
        expected = logits(handle)
    archive = safety.pack_edit_stack(session.save(tmp_path / "saved").parent, tmp_path / "stack.zip")
    names = json.loads((tmp_path / "saved" / "session.json").read_text())["edits"]
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(["session.json"] + [f"{n}{s}" for n in names
                                                                   for s in (".json", ".safetensors")])
    folder = safety.unpack_edit_stack(archive.read_bytes())
    assert folder.is_relative_to(safety.upload_dir())
    restored = EditSession(handle)
    restored.load(folder)
    with restored.active():
        assert torch.equal(logits(handle), expected)
    # uploading the same archive again finds the unpacked folder instead of failing
    assert safety.unpack_edit_stack(io.BytesIO(archive.read_bytes())) == folder


def test_edit_stack_manifest_may_not_name_files_outside_its_folder(cache, tmp_path):
    manifest = {"format": "editscope-session/1", "model": "demo", "edits": ["../../outside"]}
    data = _zip({"session.json": json.dumps(manifest).encode()})
    with pytest.raises(safety.UnsafePath, match="plain file name"):
        safety.unpack_edit_stack(data)
    manifest["edits"] = ["edit_000"]
    with pytest.raises(safety.UnsafeInput, match="lacks edit_000"):
        safety.unpack_edit_stack(_zip({"session.json": json.dumps(manifest).encode()}))
    assert not any((safety.upload_dir("stacks")).iterdir()), "a refused stack was left unpacked"


def test_edit_stack_upload_is_size_limited(cache):
    with pytest.raises(safety.UploadTooLarge):
        safety.unpack_edit_stack(b"\0" * 2048, max_bytes=1024)


def test_the_app_limits_upload_size_no_higher_than_the_safety_helper():
    config_path = ROOT / ".streamlit" / "config.toml"
    if not config_path.exists():
        pytest.skip("the app has no .streamlit/config.toml")
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads(config_path.read_text())
    limit_mb = config.get("server", {}).get("maxUploadSize")
    assert isinstance(limit_mb, int) and limit_mb > 0, "set server.maxUploadSize in .streamlit/config.toml"
    assert limit_mb * safety.MIB <= safety.max_upload_bytes(), "the app accepts uploads the helper would refuse"


def test_the_same_stack_uploaded_by_several_sessions_at_once_unpacks_once(cache, tmp_path):
    import threading

    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(small_delta(handle, seed=3))
    data = safety.pack_edit_stack(session.save(tmp_path / "saved").parent, tmp_path / "stack.zip").read_bytes()
    folders, errors = [], []

    def upload() -> None:
        try:
            folders.append(safety.unpack_edit_stack(data))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(folders)) == 1
    assert [p.name for p in safety.upload_dir("stacks").iterdir()] == [folders[0].name]  # no staging left
    EditSession(handle).load(folders[0])


def test_a_stack_unpacked_by_another_session_between_check_and_extract_is_reused(cache, tmp_path, monkeypatch):
    """The race the threaded test above can hit only sometimes, forced: the folder appears late."""
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    session.push(small_delta(handle, seed=4))
    data = safety.pack_edit_stack(session.save(tmp_path / "saved").parent, tmp_path / "stack.zip").read_bytes()
    extract = safety.safe_extract_zip

    def other_session_wins(archive, dest, *args, **kwargs):
        extract(archive, dest, *args, **kwargs)  # the other session's unpack lands first
        return extract(archive, dest, *args, **kwargs)

    monkeypatch.setattr(safety, "safe_extract_zip", other_session_wins)
    folder = safety.unpack_edit_stack(data)
    EditSession(handle).load(folder)
    with pytest.raises(safety.DestinationExists):  # an explicit folder is never silently reused
        safety.unpack_edit_stack(data, dest=folder)
