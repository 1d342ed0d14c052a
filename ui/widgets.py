"""Widgets shared by the pages: error messages, progress, the fact form, hyper-parameter inputs."""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from editing.core.edit import EditError
from editing.core.request import EditRequest, InvalidEditRequest
from editing.models.arch import UnsupportedArchitecture
from editing.models.loader import ModelNotFound
from ui.actions import carried_true_target
from ui.state import DEFAULT_FACTS, AppState, FactInputs, default_fact

ProgressFn = Callable[[float, str], None]

#: errors whose message is written for the person (shown as is, without a traceback)
USER_ERRORS: tuple[type[BaseException], ...] = (
    InvalidEditRequest, ModelNotFound, UnsupportedArchitecture, EditError, ValueError, KeyError, FileNotFoundError,
)

_ERROR_TITLES = {
    "InvalidEditRequest": "Check the fact",
    "ModelNotFound": "Model not found",
    "UnsupportedArchitecture": "Unsupported model",
    "DatasetError": "Cannot read the data set",
    "UnsafeInput": "File refused",
    "UploadTooLarge": "File too large",
    "UnsafePath": "Path refused",
    "PromptTooLong": "Prompt too long",
}


def error_message(err: BaseException) -> str:
    """A one-paragraph message for the person (KeyError's quotes removed)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


def show_error(err: BaseException, where: Any = None) -> None:
    """Show ``err`` as an error box: known kinds by their message, others with the traceback folded away."""
    box = where if where is not None else st
    title = _ERROR_TITLES.get(type(err).__name__)
    if isinstance(err, EditError):
        title = title or "The edit failed"
    text = error_message(err)
    if isinstance(err, USER_ERRORS):
        box.error(f"**{title}:** {text}" if title else text)
        return
    box.error(f"**Unexpected error ({type(err).__name__}):** {text}")
    with box.expander("Details"):
        st.code("".join(traceback.format_exception(err)), language="text")


def show_notices(state: AppState) -> None:
    """Show (and drop) messages queued before the last rerun."""
    while state.notices:
        level, text = state.notices.pop(0)
        getattr(st, level if level in ("success", "info", "warning", "error") else "info")(text)


@contextmanager
def running(label: str) -> Iterator[ProgressFn]:
    """A status box with a progress bar; yields the ``progress(fraction, message)`` callback."""
    with st.status(label, expanded=True) as status:
        bar = st.progress(0.0, text="starting")

        def report(fraction: float, message: str) -> None:
            value = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
            bar.progress(value, text=message[:200])

        try:
            yield report
        except BaseException:
            status.update(label=f"{label} — failed", state="error", expanded=False)
            raise
        status.update(label=f"{label} — done", state="complete", expanded=False)


# -- the fact form ------------------------------------------------------------------------------
FACT_FIELDS = ("prompt", "subject", "target_new", "target_true")
_FACT_LABELS = {
    "prompt": ("Prompt (with the subject)",
               "The text before the answer, containing the subject, e.g. 'Eiffel Tower is a famous landmark in'. "
               "'{}' may stand for the subject."),
    "subject": ("Subject", "The entity the fact is about; it must occur in the prompt."),
    "target_new": ("New target", "What the model should answer after the edit."),
    "target_true": ("True target (optional)",
                    "What the model answers now; the probability metrics compare the new target against it. "
                    "Leave it empty to use the model's own answer before the edit (the result says which was used)."),
}


def fact_key(prefix: str, name: str) -> str:
    return f"{prefix}_fact_{name}"


#: The forms that share the typed fact (Playground, Compare, Locate).
FACT_FORMS = ("pg", "cmp", "loc")


def follow_model_default(state: AppState) -> None:
    """Put the picked model's example fact in the forms while they still hold another model's example.

    The demo model knows its facts only in its fact base's phrasing, a real model answers best where the
    probe ends at the answer: the example changes with the model, but nothing the person typed is replaced.
    """
    ctx = state.context
    if ctx is None:
        return
    wanted = default_fact(ctx.model.spec)
    shown = [state.fact]
    for prefix in FACT_FORMS:
        if fact_key(prefix, "prompt") in st.session_state:
            shown.append(FactInputs(**{name: str(st.session_state.get(fact_key(prefix, name), "") or "")
                                       for name in FACT_FIELDS}))
    if all(fact in DEFAULT_FACTS and fact != wanted for fact in shown):
        set_fact(state, wanted, FACT_FORMS)


def seed_fact_inputs(state: AppState, prefix: str) -> None:
    """Fill the form's widget keys from the shared typed fact unless they already hold a value (and
    apply values queued for this form by the last run)."""
    follow_model_default(state)
    for name in FACT_FIELDS:
        key = fact_key(prefix, name)
        if key in state.pending_widgets:
            st.session_state[key] = state.pending_widgets.pop(key)
        elif key not in st.session_state:
            st.session_state[key] = getattr(state.fact, name)


def set_fact(state: AppState, fact: FactInputs, prefixes: tuple[str, ...]) -> None:
    """Replace the typed fact (an example was picked) in the state and in the forms' widgets.

    The example's true target is remembered with its prompt and subject, so it is never used for
    another fact typed over it (:func:`drop_carried_true_target`).
    """
    state.fact = fact
    state.fact_origin = (fact.prompt, fact.subject, fact.target_true) if fact.target_true else None
    for prefix in prefixes:
        for name in FACT_FIELDS:
            st.session_state[fact_key(prefix, name)] = getattr(fact, name)


def drop_carried_true_target(state: AppState, fact: FactInputs, prefixes: tuple[str, ...]) -> str | None:
    """Empty the true target when it belongs to another fact (an example's, typed over); the boxes are
    emptied on the next run. Returns the dropped value (None when nothing was dropped)."""
    if not carried_true_target(fact.prompt, fact.subject, fact.target_true, state.fact_origin):
        return None
    dropped = fact.target_true
    fact.target_true = ""
    state.fact = fact
    state.fact_origin = None
    for prefix in prefixes:
        state.pending_widgets[fact_key(prefix, "target_true")] = ""
    return dropped


def fact_inputs(prefix: str, include_target_true: bool = True, include_target_new: bool = True) -> None:
    """The text inputs of the fact form (call inside an ``st.form``)."""
    left, right = st.columns([3, 2])
    label, help_text = _FACT_LABELS["prompt"]
    left.text_input(label, key=fact_key(prefix, "prompt"), help=help_text)
    label, help_text = _FACT_LABELS["subject"]
    right.text_input(label, key=fact_key(prefix, "subject"), help=help_text)
    names = [n for n, wanted in (("target_new", include_target_new), ("target_true", include_target_true)) if wanted]
    if names:
        for column, name in zip(st.columns(len(names)), names, strict=True):
            label, help_text = _FACT_LABELS[name]
            column.text_input(label, key=fact_key(prefix, name), help=help_text)


def read_fact(state: AppState, prefix: str) -> FactInputs:
    """Copy the submitted form values into the shared typed fact and return it."""
    values = {name: str(st.session_state.get(fact_key(prefix, name), getattr(state.fact, name)) or "")
              for name in FACT_FIELDS}
    state.fact = FactInputs(**values)
    return state.fact


def request_from(fact: FactInputs) -> EditRequest:
    """The edit request of the typed fact; raises :class:`InvalidEditRequest` with what to fix."""
    return EditRequest(prompt=fact.prompt, subject=fact.subject, target_new=fact.target_new,
                       target_true=fact.target_true or None)


def typed_request(state: AppState, fact: FactInputs) -> tuple[EditRequest, str | None]:
    """The edit request of the typed fact and the true target it leaves out, if any (None if not).

    A true target carried over from another fact (:func:`~ui.actions.carried_true_target`) belongs
    to that fact, so the request goes without it and the model's own answer stands in; the page
    drops it from the form and says so. Raises :class:`InvalidEditRequest` with what to fix.
    """
    carried = fact.target_true if carried_true_target(fact.prompt, fact.subject, fact.target_true,
                                                      state.fact_origin) else None
    request = request_from(FactInputs(fact.prompt, fact.subject, fact.target_new,
                                      "" if carried else fact.target_true))
    return request, carried


# -- hyper-parameters ----------------------------------------------------------------------------
MAIN_HPARAMS = 6  # shown directly; the rest go into an expander


def _editable(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def parse_int_list(text: str, like: list | tuple) -> list[int] | tuple[int, ...]:
    """'3, 4, 5' -> [3, 4, 5] (a tuple when the default was one); raises ValueError with what is wrong."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError as err:
        raise ValueError(f"'{text}' is not a list of whole numbers, e.g. '3, 4, 5'.") from err
    return tuple(values) if isinstance(like, tuple) else values


def hparam_inputs(defaults: Any, key_prefix: str, n_layers: int | None = None) -> tuple[dict[str, Any], str | None]:
    """Inputs for the numeric, boolean and layer-list fields of a hyper-parameter dataclass, in an
    expander (the first few) and a second one for the rest (expanders cannot be nested).

    A field named ``layer`` is bounded by ``n_layers``; a list of layers is checked against it.
    Returns the fields the person changed (to pass to ``evaluate_edit`` as a dict) and an error
    message when an input cannot be read (the typed text stays in its box).
    """
    fields = [f for f in dataclasses.fields(defaults) if _editable(getattr(defaults, f.name))]
    changes: dict[str, Any] = {}
    errors: list[str] = []
    main = st.expander("Hyper-parameters")
    more = st.expander("More hyper-parameters") if len(fields) > MAIN_HPARAMS else None
    for index, spec in enumerate(fields):
        target = main if index < MAIN_HPARAMS or more is None else more
        default = getattr(defaults, spec.name)
        key = f"{key_prefix}|{spec.name}"
        label = spec.name.replace("_", " ")
        if isinstance(default, bool):
            value = target.checkbox(label, value=default, key=key)
        elif isinstance(default, int) and spec.name == "layer" and n_layers:
            value = int(target.number_input(label, value=default, min_value=0, max_value=n_layers - 1, step=1,
                                            key=key))
        elif isinstance(default, int):
            value = int(target.number_input(label, value=default, step=1, key=key))
        elif isinstance(default, float):
            step = abs(default) / 10 if default else 0.1
            value = float(target.number_input(label, value=default, step=step, format="%g", key=key))
        else:
            text = target.text_input(f"{label} (comma-separated)", value=", ".join(map(str, default)), key=key)
            try:
                value = parse_int_list(text, default)
                if "layer" in spec.name and n_layers and any(not 0 <= v < n_layers for v in value):
                    raise ValueError(f"Layers must lie between 0 and {n_layers - 1}.")
            except ValueError as err:
                errors.append(f"{label}: {err}")
                target.error(str(err))
                continue
        if value != default:
            changes[spec.name] = value
    return changes, ("; ".join(errors) or None)


def hparams_note(method: str | None, changed: dict[str, Any]) -> None:
    """Say which method the sidebar's hyper-parameters apply to (the others run with their defaults)."""
    if method and changed:
        st.caption(f"The sidebar's hyper-parameters ({', '.join(f'{k} = {v}' for k, v in changed.items())}) apply "
                   f"to {method}; other methods use their defaults.")
    else:
        st.caption("Every method runs with its default hyper-parameters for this model (change them in the sidebar).")
