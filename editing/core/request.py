"""Edit requests: "in <prompt with subject>, the answer should become <target_new>"."""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass

MAX_FIELD_CHARS = 1000
#: the fields of a serialised request, and those it cannot do without
FIELDS = ("prompt", "subject", "target_new", "target_true")
REQUIRED_FIELDS = ("prompt", "subject", "target_new")


class InvalidEditRequest(ValueError):
    """An edit request a person must fix; the message says what and how."""


def _clean(value: object, field_name: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise InvalidEditRequest(f"The {field_name} is missing.")
        return None
    if not isinstance(value, str):
        raise InvalidEditRequest(f"The {field_name} must be text, not {type(value).__name__}.")
    # A lone surrogate is not text at all: it cannot be encoded, so the tokenizer would fail with
    # a raw TypeError much later (it comes from broken UTF-16 or a bad escape such as "\ud800").
    surrogates = [ch for ch in value if "\ud800" <= ch <= "\udfff"]
    if surrogates:
        raise InvalidEditRequest(
            f"The {field_name} contains an invalid character (a lone surrogate, U+{ord(surrogates[0]):04X}); "
            "retype it as plain text."
        )
    text = " ".join(value.split())  # collapse newlines/tabs/runs of spaces
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text):
        raise InvalidEditRequest(f"The {field_name} contains control characters; remove them.")
    if not text:
        if required:
            raise InvalidEditRequest(f"The {field_name} is empty.")
        return None
    if len(text) > MAX_FIELD_CHARS:
        raise InvalidEditRequest(
            f"The {field_name} is {len(text)} characters long; at most {MAX_FIELD_CHARS} are allowed."
        )
    return text


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    ``prompt`` holds ``{}`` where the subject goes ("The Eiffel Tower is in" with subject
    "Eiffel Tower" is accepted and normalised to "The {} is in"). Targets are stored without a
    leading space; methods add the space the tokenizer expects.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        subject = _clean(self.subject, "subject")
        prompt = _clean(self.prompt, "prompt")
        target_new = _clean(self.target_new, "new target")
        target_true = _clean(self.target_true, "true target", required=False)
        assert subject and prompt and target_new  # _clean raised otherwise
        n_slots = prompt.count("{}")
        if n_slots == 0:
            if subject not in prompt:
                raise InvalidEditRequest(
                    f"The subject {subject!r} does not occur in the prompt {prompt!r}. Write the "
                    f"subject into the prompt, or put {{}} where it goes."
                )
            prompt = prompt.replace(subject, "{}", 1)
        elif n_slots > 1:
            raise InvalidEditRequest("The prompt has more than one {}; use exactly one for the subject.")
        if "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
            raise InvalidEditRequest("The prompt may contain braces only as the {} subject slot.")
        if prompt.strip() == "{}":
            raise InvalidEditRequest("The prompt needs words besides the subject (e.g. '{} is in').")
        # Case and spacing are no new fact: "paris" for "Paris" would be reported as an edit that
        # changed nothing (whitespace is already normalised by _clean).
        if target_true is not None and target_true.casefold() == target_new.casefold():
            raise InvalidEditRequest(
                f"The new target {target_new!r} is the true target {target_true!r} (ignoring case and spacing): "
                "nothing would change. Type a different new target."
            )
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "target_new", target_new)
        object.__setattr__(self, "target_true", target_true)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditRequest:
        """The request of a :meth:`to_dict` mapping; a missing or unknown field is an
        :class:`InvalidEditRequest` naming it."""
        if not isinstance(data, dict):
            raise InvalidEditRequest(f"An edit request must be a mapping of its fields, not {type(data).__name__}.")
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise InvalidEditRequest(f"Unknown fields in edit request: {sorted(map(str, unknown))}; "
                                     f"known: {list(FIELDS)}.")
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise InvalidEditRequest(f"The edit request lacks the field{'s' if len(missing) > 1 else ''} "
                                     f"{', '.join(missing)} (required: {', '.join(REQUIRED_FIELDS)}).")
        return cls(**data)
