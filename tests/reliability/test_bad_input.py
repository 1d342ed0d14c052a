"""Bad input, tried systematically: each case is a clear error, nothing is lost, nothing crashes.

Empty, huge, unicode and control-character prompts; a subject missing from its prompt; prompts
and targets longer than the model's context (through every registered method); malformed data
set files; unknown model ids; paths outside the allowed folders; and the same inputs typed into
the Playground, where the page must show an error and keep running.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editing.core import safety
from editing.core.edit import EditError, handle_stack
from editing.core.request import MAX_FIELD_CHARS, EditRequest, InvalidEditRequest
from editing.core.session import EditSession
from editing.methods import available_methods, get_method
from editing.models.loader import ModelNotFound, load_model
from editing.models.tiny import tiny_model
from editing.models.tokens import encode
from tests.helpers import assert_params_equal, params_snapshot
from tests.reliability.common import few_steps, last_logprobs, run_hparams

try:  # AppTest needs the dashboard tests' navigation fix (an autouse fixture) in this module too
    from tests.app.conftest import _navigation_not_pages_folder  # noqa: F401
except ImportError:  # the dashboard is not there yet
    pass

METHODS = available_methods()
CAPITAL = "The capital of {} is"

# -- edit requests -------------------------------------------------------------------------------
#: (prompt, subject, new target, true target) -> the phrase the error must contain
BAD_REQUESTS = {
    "empty prompt": (("", "France", "Lyon", None), "prompt is empty"),
    "blank prompt": ((" \n\t ", "France", "Lyon", None), "prompt is empty"),
    "missing prompt": ((None, "France", "Lyon", None), "prompt is missing"),
    "empty subject": ((CAPITAL, "", "Lyon", None), "subject is empty"),
    "empty target": ((CAPITAL, "France", "  ", None), "new target is empty"),
    "huge prompt": (("word " * 5000 + "{} is", "France", "Lyon", None), f"at most {MAX_FIELD_CHARS}"),
    "huge target": ((CAPITAL, "France", "Lyon" * 300, None), f"at most {MAX_FIELD_CHARS}"),
    "NUL byte": (("The capital\x00 of {} is", "France", "Lyon", None), "control characters"),
    "escape sequence": (("\x1b[31mThe capital of {} is", "France", "Lyon", None), "control characters"),
    "zero-width space": ((CAPITAL, "Fra\u200bnce", "Lyon", None), "control characters"),
    "bidi override": ((CAPITAL, "France", "\u202eLyon", None), "control characters"),
    "bell in target": ((CAPITAL, "France", "Ly\x07on", None), "control characters"),
    "subject not in prompt": (("The capital of Spain is", "France", "Lyon", None), "does not occur in the prompt"),
    "two subject slots": (("{} and {} are", "France", "Lyon", None), "more than one"),
    "stray braces": (("The {0} of {} is", "France", "Lyon", None), "braces"),
    "only the subject": (("{}", "France", "Lyon", None), "needs words"),
    "nothing changes": ((CAPITAL, "France", "Paris", "Paris"), "nothing would change"),
    "not text": ((CAPITAL, 42, "Lyon", None), "must be text"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_edit_requests_are_refused_with_a_message_that_says_what_to_fix(case):
    (prompt, subject, new, true), phrase = BAD_REQUESTS[case]
    with pytest.raises(InvalidEditRequest, match=phrase):
        EditRequest(prompt, subject, new, true)


@pytest.mark.parametrize("prompt, subject", [
    ("Die Hauptstadt von {} ist", "Österreich"),
    ("{} est situé en", "Château de Versailles"),
    ("The capital of {} is", "日本"),
    ("عاصمة {} هي", "مصر"),
    ("🗼 {} is in", "Eiffel Tower"),
    ("The capital of  France\n is", "France"),  # whitespace runs collapse
])
def test_unicode_requests_are_accepted_and_normalised(prompt, subject):
    request = EditRequest(prompt, subject, "Wien")
    assert request.prompt.count("{}") == 1 and subject in request.text
    assert "  " not in request.text and "\n" not in request.text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.one_of(st.none(), st.text(max_size=60), st.just("{}"), st.text(max_size=20).map(lambda t: t + " {}")),
       subject=st.one_of(st.text(max_size=20), st.integers()), target=st.text(max_size=20),
       true=st.one_of(st.none(), st.text(max_size=20)))
def test_any_text_gives_a_valid_request_or_a_clear_refusal(prompt, subject, target, true):
    try:
        request = EditRequest(prompt, subject, target, true)
    except InvalidEditRequest as err:
        assert str(err)
        return
    assert request.prompt.count("{}") == 1 and request.subject in request.text
    assert request.target_new.strip() == request.target_new != ""
    assert EditRequest.from_dict(request.to_dict()) == request


# -- through every method ------------------------------------------------------------------------
def _long_prompt(handle, tokens: int) -> str:
    """A prompt template about the subject that encodes to ``tokens`` tokens with "France"."""
    words = 0
    while len(encode(handle.tokenizer, f"The capital of the {'big ' * words}country France is")) < tokens:
        words += 1
    return f"The capital of the {'big ' * words}country {{}} is"


def _inputs(handle) -> dict[str, tuple[EditRequest, bool]]:
    """name -> (request, must be refused before any work)."""
    limit = handle.max_length
    return {
        "target beyond the context": (EditRequest(CAPITAL, "France", " ".join(["Berlin"] * (limit + 10))), True),
        "prompt beyond the context": (EditRequest(_long_prompt(handle, limit + 5), "France", "Berlin"), True),
        # fits the model, but not once a method adds its context prefixes: refused or handled
        "prompt at the context limit": (EditRequest(_long_prompt(handle, limit - 2), "France", "Berlin"), False),
        "words the model never saw": (EditRequest("Die Hauptstadt von {} ist", "Österreich 🗼", "Wien"), False),
    }


@pytest.mark.parametrize("method", METHODS)
def test_methods_refuse_inputs_beyond_the_context_clearly_and_leave_the_model(method, tiny_editors):
    handle = tiny_model("gpt2")  # 128 positions
    hparams = run_hparams(handle, method, tiny_editors)
    before = params_snapshot(handle)
    failures = []
    for name, (request, refused_early) in _inputs(handle).items():
        session = EditSession(handle)
        try:
            session.apply(method, request, hparams)
        except (ValueError, EditError) as err:  # InvalidEditRequest, PromptTooLong, EditError
            assert str(err) and session.edits == (), name
        except Exception as err:  # anything else is a crash the user cannot act on
            failures.append(f"{name}: {type(err).__name__}: {err}")
        else:
            if refused_early:
                failures.append(f"{name}: accepted an input the model cannot read")
            with session.active():
                assert torch.isfinite(last_logprobs(handle, ["The capital of France is"])).all(), name
        assert not handle_stack(handle)
        assert_params_equal(handle, before)
    assert not failures, f"{method}:\n" + "\n".join(failures)


def test_too_long_inputs_are_refused_before_any_work():
    """The shared check refuses what cannot fit before a method computes anything."""
    from editing.methods.base import check_fits_context

    handle = tiny_model("llama")
    accepted = []
    for name, (request, refused_early) in _inputs(handle).items():
        if refused_early:
            with pytest.raises(InvalidEditRequest, match=f"at most {handle.max_length}"):
                check_fits_context(handle, [request])
        else:
            check_fits_context(handle, [request])
            accepted.append(name)
    assert accepted == ["prompt at the context limit", "words the model never saw"]


def test_probes_longer_than_the_context_are_a_clear_error_and_the_session_is_kept():
    pytest.importorskip("eval.evaluate")
    from editing.analysis.scoring import PromptTooLong
    from eval.evaluate import evaluate_edit, predict
    from eval.probes import Probe, ProbeSet

    handle = tiny_model("gpt2")
    session = EditSession(handle)
    long_answer = " ".join(["Paris"] * (handle.max_length + 5))
    with pytest.raises(PromptTooLong, match="at most"):
        predict(session, [Probe("user-0", "The capital of France is", long_answer, "locality")])
    method = next((m for m in METHODS if get_method(m).readiness(handle) is None), None)
    if method is None:
        pytest.skip("no method registered")
    request = EditRequest(CAPITAL, "France", "Berlin")
    probes = ProbeSet([request], [Probe("rel-0", request.text, "Berlin", "reliability"),
                                  Probe("user-0", "The capital of France is", long_answer, "locality")])
    before = params_snapshot(handle)
    with pytest.raises(PromptTooLong):
        evaluate_edit(session, method, request, probes, hparams=few_steps(handle, method))
    assert session.edits == () and not handle_stack(handle)
    assert_params_equal(handle, before)


# -- data set files ------------------------------------------------------------------------------
COUNTERFACT_OK = {"case_id": 0, "requested_rewrite": {
    "prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Lyon"},
    "target_true": {"str": "Paris"}}, "paraphrase_prompts": [], "neighborhood_prompts": []}


def _counterfact_without(path: str) -> list[dict]:
    record = json.loads(json.dumps(COUNTERFACT_OK))
    parts = path.split(".")
    parent = record
    for part in parts[:-1]:
        parent = parent[part]
    del parent[parts[-1]]
    return [COUNTERFACT_OK, record]


#: file name -> (content, phrases the error must contain besides the file name)
BAD_DATASETS: dict[str, tuple[bytes | str, tuple[str, ...]]] = {
    "empty.json": ("", ("not valid JSON",)),
    "truncated.json": ('[{"requested_rewrite": {"prompt": ', ("not valid JSON", "line")),
    "scalar.json": ("42", ("list of records",)),
    "empty-list.json": ("[]", ("non-empty list",)),
    "not-objects.json": ("[1, 2, 3]", ("record 0",)),
    "unknown-format.json": ('[{"question": "q", "answer": "a"}]', ("record 0", "no known format")),
    "no-subject.json": (json.dumps(_counterfact_without("requested_rewrite.subject")),
                        ("record 1", "requested_rewrite.subject", "missing")),
    "no-target.json": (json.dumps(_counterfact_without("requested_rewrite.target_new")),
                       ("record 1", "requested_rewrite.target_new.str", "missing")),
    "wrong-type.json": (json.dumps([{"src": 5, "alt": "x", "rephrase": "r", "loc": "l", "loc_ans": "a",
                                     "subject": "s"}]), ("record 0", "src")),
    "bad-line.jsonl": ('{"src": "a"}\n{oops\n', ("record 1", "line 2")),
    "binary.json": (b"\xff\xfe\x00\x81\x00garbage", ("cannot read",)),
    "control-chars.json": (json.dumps([{**COUNTERFACT_OK, "requested_rewrite": {
        **COUNTERFACT_OK["requested_rewrite"], "subject": "Fra\x00nce", "prompt": "The capital of Fra\x00nce is"}}]),
                           ("record 0",)),
}


@pytest.mark.parametrize("name", sorted(BAD_DATASETS))
def test_malformed_data_set_files_name_the_file_record_and_field(name, tmp_path):
    pytest.importorskip("eval.datasets")
    from eval.datasets import DatasetError, load_dataset

    content, phrases = BAD_DATASETS[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert name in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_data_set_paths_that_are_not_files_are_clear_errors(tmp_path):
    pytest.importorskip("eval.datasets")
    from eval.datasets import DatasetError, load_dataset

    for path in (tmp_path / "missing.json", tmp_path, "/dev/null/x.json"):
        with pytest.raises(DatasetError, match="no such file"):
            load_dataset(path)
    with pytest.raises(DatasetError, match="Unknown data set format"):
        load_dataset("demo", fmt="yaml")


def test_deeply_nested_json_is_a_data_set_error_not_a_crash(tmp_path):
    pytest.importorskip("eval.datasets")
    from eval.datasets import DatasetError, load_dataset

    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DatasetError):
        load_dataset(path)


# -- model ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["no-such-org/no-such-model-xyz", "", "   ", "demo2", "../../../../etc", "/etc",
                                  "gpt2\x00evil", "x" * 500, "https://huggingface.co/gpt2", "~/nowhere-at-all"])
def test_unknown_model_ids_are_model_not_found(spec):
    with pytest.raises(ModelNotFound) as info:
        load_model(spec)
    assert "local" in str(info.value) or "No model given" in str(info.value)


def test_a_model_folder_with_a_broken_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFound):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ValueError, match="supports"):
        load_model(str(tmp_path))


# -- paths outside the allowed folders -----------------------------------------------------------
@pytest.fixture
def inbox(tmp_path, monkeypatch) -> Path:
    """A private user cache as the only writable root, plus an outside folder with a secret."""
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDITSCOPE_ALLOWED_DIRS", raising=False)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.json").write_text("{}")
    os.symlink(tmp_path / "outside", safety.upload_dir() / "link-out")
    return safety.upload_dir()


def test_paths_outside_the_allowed_folders_are_refused(inbox, tmp_path):
    outside = [
        "/etc/passwd", "~/.ssh/id_rsa", str(tmp_path / "outside" / "secret.json"),
        str(inbox / ".." / ".." / "outside" / "secret.json"),  # climbs out with ..
        str(inbox / "link-out" / "secret.json"),  # a link inside that leads outside
        "relative/path.json",  # relative to the server's working directory
    ]
    for path in outside:
        with pytest.raises(safety.UnsafePath, match="outside the folders"):
            safety.resolve_allowed(path)
    for path in ("", "   ", "data\x00.json"):
        with pytest.raises(safety.UnsafePath, match="No usable path"):
            safety.resolve_allowed(path)
    inside = inbox / "dataset.json"
    inside.write_text("[]")
    assert safety.resolve_allowed(inside, must_exist=True) == inside.resolve()
    assert safety.resolve_allowed(safety.DATA_DIR / "factbase.json", must_exist=True).name == "factbase.json"
    with pytest.raises(FileNotFoundError):
        safety.resolve_allowed(inbox / "missing.json", must_exist=True)


def test_allowed_folders_can_be_extended_by_the_deployment(inbox, tmp_path, monkeypatch):
    secret = tmp_path / "outside" / "secret.json"
    with pytest.raises(safety.UnsafePath):
        safety.resolve_allowed(secret)
    monkeypatch.setenv("EDITSCOPE_ALLOWED_DIRS", str(tmp_path / "outside"))
    assert safety.resolve_allowed(secret, must_exist=True) == secret.resolve()


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd.json", "passwd.json"), ("..\\..\\windows\\win.json", "win.json"),
    (".bashrc.json", "bashrc.json"),
    ("a b$c;rm -rf.json", "a_b_c_rm_-rf.json"), ("", "upload"), ("....", "upload"), ("データ.json", "json"),
])
def test_upload_names_cannot_point_anywhere(name, expected):
    assert safety.safe_filename(name) == expected


def test_uploaded_files_land_inside_the_upload_folder(inbox):
    for name in ("../../evil.json", "/etc/evil.json", "..\\evil.json", "link-out/evil.json"):
        path = safety.save_upload(b"[]", name)
        assert path.parent == inbox and path.resolve().is_relative_to(inbox.resolve())


# -- the Playground keeps running ----------------------------------------------------------------
#: what is typed -> the phrase the page's error must show
BAD_FORMS = {
    "empty prompt": ({"prompt": ""}, "prompt is empty"),
    "control character": ({"prompt": "Eiffel Tower is a famous\x07 landmark in"}, "control characters"),
    "huge prompt": ({"prompt": "Eiffel Tower is " + "very " * 400 + "famous in"}, f"at most {MAX_FIELD_CHARS}"),
    "subject missing": ({"subject": "Big Ben"}, "does not occur in the prompt"),
    "target beyond the context": ({"target_new": " ".join(["Italy"] * 120)}, "reads at most"),
    "target the vocabulary cannot spell": ({"target_new": "Zürich"}, "vocabulary does not know: 'Zürich'"),
}


def test_the_playground_shows_bad_input_as_errors_and_keeps_running(demo_handle):
    pytest.importorskip("ui.widgets")
    from tests.app.conftest import app_state, assert_clean, click, new_app
    from ui.models import _shared_handle
    from ui.widgets import fact_key

    _shared_handle("demo", "auto", "float32")  # the model as the dashboard shares it
    at = new_app().run()
    assert_clean(at)
    defaults = {name: at.text_input(key=fact_key("pg", name)).value for name in ("prompt", "subject", "target_new")}
    for case, (typed, phrase) in BAD_FORMS.items():
        values = {**defaults, **typed}
        for name, value in values.items():
            at.text_input(key=fact_key("pg", name)).set_value(value)
        click(at, "Apply edit")
        assert_clean(at)
        shown = [e.value for e in at.error]
        assert any(phrase in text for text in shown), f"{case}: {shown}"
        assert app_state(at).current_session().edits == (), case
        for name, value in values.items():  # the typed text is kept for fixing
            assert at.text_input(key=fact_key("pg", name)).value == value, case
    assert not handle_stack(demo_handle)
