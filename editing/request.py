"""Edit requests: "in <prompt with subject>, the answer should become <target_new>"."""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass

MAX_FIELD_CHARS = 1000


class InvalidEditRequest(ValueError):
    """An edit request a person must fix; the message says what and how."""


def _clean(value: object, field_name: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise InvalidEditRequest(f"The {field_name} is missing.")
        return None
    if not isinstance(value, str):
        raise InvalidEditRequest(f"The {field_name} must be text, not {type(value).__name__}.")
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
        if target_true is not None and target_true == target_new:
            raise InvalidEditRequest(
                f"The new target {target_new!r} equals the true target: nothing would change."
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
        unknown = set(data) - {"prompt", "subject", "target_new", "target_true"}
        if unknown:
            raise InvalidEditRequest(f"Unknown fields in edit request: {sorted(unknown)}.")
        return cls(**data)
