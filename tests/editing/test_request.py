"""EditRequest validation: clear errors, normalisation."""

from __future__ import annotations

import pytest

from editing.core.request import EditRequest, InvalidEditRequest


def test_subject_in_prompt_is_normalised():
    req = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", " Italy ")
    assert req.prompt == "The {} is located in"
    assert req.target_new == "Italy"
    assert req.text == "The Eiffel Tower is located in"


def test_template_prompt_kept():
    req = EditRequest("{} is located in", "Eiffel Tower", "Italy", "France")
    assert req.prompt == "{} is located in" and req.target_true == "France"


def test_whitespace_collapsed():
    req = EditRequest("The capital of\n{}   is", "France", "Lyon")
    assert req.prompt == "The capital of {} is"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt="", subject="France", target_new="Lyon"), "prompt is empty"),
        (dict(prompt="The capital of {} is", subject="  ", target_new="Lyon"), "subject is empty"),
        (dict(prompt="The capital of {} is", subject="France", target_new=""), "new target is empty"),
        (dict(prompt="The capital of Spain is", subject="France", target_new="Lyon"), "does not occur"),
        (dict(prompt="{} and {} are", subject="France", target_new="Lyon"), "more than one"),
        (dict(prompt="{}", subject="France", target_new="Lyon"), "needs words"),
        (dict(prompt="{} is in {x}", subject="France", target_new="Lyon"), "braces"),
        (dict(prompt="The capital of {} is", subject="France", target_new="Paris", target_true="Paris"),
         "nothing would change"),
        (dict(prompt="The capital of {} is\x00", subject="France", target_new="Lyon"), "control characters"),
        (dict(prompt="x" * 2000 + " {}", subject="France", target_new="Lyon"), "at most"),
        (dict(prompt=None, subject="France", target_new="Lyon"), "missing"),
        (dict(prompt=3, subject="France", target_new="Lyon"), "must be text"),
    ],
)
def test_bad_requests_raise_clear_errors(kwargs, message):
    with pytest.raises(InvalidEditRequest, match=message):
        EditRequest(**kwargs)


def test_round_trip_dict():
    req = EditRequest("{} is located in", "Eiffel Tower", "Italy", "France")
    assert EditRequest.from_dict(req.to_dict()) == req
    with pytest.raises(InvalidEditRequest, match="Unknown fields"):
        EditRequest.from_dict({**req.to_dict(), "evil": 1})
