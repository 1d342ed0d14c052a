"""build_once: one build per cached folder, relayed progress for waiters, errors kept and retried."""

from __future__ import annotations

import threading

import pytest

from editing.storage.buildonce import BuildFailed, build_once, read_progress


def _write_marker(folder, report):
    report(0.5, "half way")
    (folder / "done").write_text("ok")


def test_builds_once_and_then_finds_the_folder(tmp_path):
    calls = []

    def build(folder, report):
        calls.append(folder)
        _write_marker(folder, report)

    target = tmp_path / "thing"
    assert build_once(target, build, what="a thing", marker="done") == target
    assert build_once(target, build, what="a thing", marker="done") == target
    assert len(calls) == 1 and (target / "done").read_text() == "ok"
    assert not list(tmp_path.glob("thing.tmp-*")), "the temporary build folder was left behind"
    assert read_progress(target)["fraction"] == 1.0


def test_a_failed_build_leaves_nothing_says_why_and_is_retried(tmp_path):
    target = tmp_path / "thing"

    def broken(folder, report):
        (folder / "partial").write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(BuildFailed, match="Building a thing failed: RuntimeError: disk on fire"):
        build_once(target, broken, what="a thing", marker="done")
    assert not target.exists() and not list(tmp_path.glob("thing.tmp-*"))
    assert "disk on fire" in read_progress(target)["error"]
    build_once(target, _write_marker, what="a thing", marker="done")
    assert (target / "done").exists()


def test_a_build_without_its_marker_is_a_failure(tmp_path):
    with pytest.raises(BuildFailed, match="without writing done"):
        build_once(tmp_path / "thing", lambda folder, report: None, what="a thing", marker="done")
    assert not (tmp_path / "thing").exists()


def test_a_waiting_caller_relays_the_builders_progress(tmp_path):
    target = tmp_path / "thing"
    reported, release = threading.Event(), threading.Event()

    def slow(folder, report):
        report(0.4, "step 40 of 100")
        reported.set()
        assert release.wait(30)
        (folder / "done").write_text("ok")

    builder = threading.Thread(target=build_once, args=(target, slow),
                               kwargs={"what": "the demo model", "marker": "done"})
    builder.start()
    assert reported.wait(30)
    messages: list[tuple[float, str]] = []

    def progress(fraction, message):
        messages.append((fraction, message))
        release.set()  # let the builder finish once the waiter has said what it waits for

    def must_not_build(folder, report):
        raise AssertionError("the waiting caller built the folder a second time")

    assert build_once(target, must_not_build, what="the demo model", marker="done", progress=progress) == target
    builder.join(30)
    assert messages[0] == (0.4, "waiting for another process that is building the demo model: step 40 of 100")
