"""What the pages do when a button is pressed, without Streamlit: build probe sets, run edits through
``eval/``, re-check probes, compare methods. Kept free of streamlit so it can be tested (and reused)
on its own; the model work itself happens in ``eval/`` and ``editing/``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from editing.edit import Edit, EditError
from editing.factbase import FactBase, load_factbase
from editing.models import ModelHandle
from editing.request import EditRequest
from editing.safety import pack_edit_stack, unpack_edit_stack
from editing.session import EditSession
from eval.evaluate import EditOutcome, evaluate_edit, outcome_table, predict
from eval.probes import IN_SCOPE_KINDS, Probe, ProbeSet, probes_for_request

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class Example:
    """A fact from the fact base, turned into a counterfactual edit for the forms."""

    label: str
    prompt: str
    subject: str
    target_new: str
    target_true: str


def describe_edit(edit: Edit) -> str:
    """'Eiffel Tower: France → Italy' for an edit's first request (and how many more it holds)."""
    if not edit.requests:
        return "(no request)"
    first = edit.requests[0]
    text = f"{first.subject}: {first.target_true or '…'} → {first.target_new}"
    if len(edit.requests) > 1:
        text += f" (+{len(edit.requests) - 1} more)"
    return text


def stack_archive(session: EditSession) -> bytes:
    """The session's edit stack as a zip (JSON + safetensors), for download."""
    with tempfile.TemporaryDirectory(prefix="editscope-save-") as tmp:
        folder = Path(tmp) / "edits"
        session.save(folder)
        return pack_edit_stack(folder, Path(tmp) / "edits.zip").read_bytes()


def load_stack_archive(session: EditSession, data: bytes) -> EditSession:
    """A new session on the same model holding the stack in the uploaded zip.

    The upload is unpacked safely (size-limited, no paths outside its folder, JSON and
    safetensors only), the saved model name is checked and every edit is test-applied once under
    the model's lock, so a stack that does not fit this model fails here with a message and the
    person's current stack stays as it was.
    """
    folder = unpack_edit_stack(data)
    saved_model = json.loads((folder / "session.json").read_text(encoding="utf-8")).get("model")
    if saved_model and saved_model != session.handle.name:
        raise EditError(f"These edits were saved for the model {saved_model!r}; the loaded model is "
                        f"{session.handle.name!r}. Pick that model in the sidebar first.")
    loaded = EditSession(session.handle)
    loaded.load(folder)
    try:
        with loaded.active():
            pass
    except (EditError, RuntimeError, ValueError) as err:
        raise EditError(f"The saved edits do not fit this model: {err}") from err
    return loaded


def example_facts(factbase: FactBase | None = None) -> list[Example]:
    """Every fact of the fact base as a counterfactual edit.

    The prompt is the relation's first training template; the new target is the next object of
    the same relation in alphabetical order (deterministic, and always a word the demo model knows).
    """
    factbase = factbase or load_factbase()
    examples = []
    for fact in factbase.facts:
        candidates = sorted(factbase.objects_of(fact.relation))
        if len(candidates) < 2:
            continue
        new = candidates[(candidates.index(fact.object) + 1) % len(candidates)]
        relation = factbase.relations[fact.relation]
        label = f"{fact.subject} — {fact.relation.replace('_', ' ')}: {fact.object} → {new}"
        examples.append(Example(label, relation.train_templates[0].replace("{}", fact.subject), fact.subject,
                                new, fact.object))
    return examples


def probeset_for(request: EditRequest, user_probes: Sequence[tuple[str, str, str]] = (),
                 base: ProbeSet | None = None) -> ProbeSet:
    """The probes of a typed edit: ``base`` (a data set case's probes) or the fact base's, plus the
    person's own probes as (prompt, answer, kind)."""
    probeset = base if base is not None else probes_for_request(request, load_factbase())
    probeset = ProbeSet(list(probeset.requests), list(probeset.probes))  # never extend a shared object
    for prompt, answer, kind in user_probes:
        probeset.add(prompt, answer, kind)
    return probeset


def apply_and_evaluate(session: EditSession, method: str, request: EditRequest, probeset: ProbeSet,
                       hparams: dict[str, Any] | None, progress: ProgressFn | None = None) -> EditOutcome:
    """Apply one edit on the session (pushed on its stack) and judge it on ``probeset``."""
    return evaluate_edit(session, method, [request], probeset, hparams or None, progress=progress)


def stack_up_to(session: EditSession, edit: Edit, include: bool) -> EditSession:
    """A scratch session on the same model holding the session's edits below ``edit`` (and ``edit``
    itself when ``include``). Raises :class:`EditError` when ``edit`` is no longer on the stack."""
    edits = list(session.edits)
    if not any(e is edit for e in edits):
        raise EditError("That edit is no longer on your stack (it was undone or cleared).")
    index = next(i for i, e in enumerate(edits) if e is edit)
    scratch = EditSession(session.handle)
    for earlier in edits[: index + 1 if include else index]:
        scratch.push(earlier)
    return scratch


def check_added_probes(session: EditSession, edit: Edit, probeset: ProbeSet,
                       new_probes: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """Rows (as in ``EditOutcome.table``) for probes typed after ``edit`` was applied: predictions
    without it and with it, each on top of the session's earlier edits."""
    added: list[Probe] = [probeset.add(prompt, answer, kind) for prompt, answer, kind in new_probes]
    before = predict(stack_up_to(session, edit, include=False), added)
    after = predict(stack_up_to(session, edit, include=True), added)
    return outcome_table(before, after)


def intended_column(table: pd.DataFrame) -> pd.Series:
    """Per probe: did it behave as intended? In-scope probes should change, out-of-scope ones should not."""
    in_scope = table["kind"].isin(IN_SCOPE_KINDS)
    return (table["changed"].astype(bool) == in_scope).rename("as_intended")


def compare_methods(handle: ModelHandle, request: EditRequest, methods: Sequence[str],
                    hparams: dict[str, dict[str, Any]], probeset: ProbeSet, base_edits: Sequence[Edit] = (),
                    progress: ProgressFn | None = None) -> tuple[dict[str, EditOutcome], dict[str, str]]:
    """The same edit through each method, each on a scratch session holding ``base_edits``.

    Returns the outcomes and, per method that failed, its error message. The person's own stack
    is never changed.
    """
    outcomes: dict[str, EditOutcome] = {}
    errors: dict[str, str] = {}
    for index, method in enumerate(methods):
        scratch = EditSession(handle)
        for edit in base_edits:
            scratch.push(edit)

        def report(fraction: float, message: str, index: int = index, method: str = method) -> None:
            if progress is not None:
                progress((index + fraction) / len(methods), f"{method}: {message}")

        try:
            outcomes[method] = evaluate_edit(scratch, method, [request], probeset, hparams.get(method) or None,
                                             progress=report)
        except Exception as err:  # one method failing must not hide the others' results
            errors[method] = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return outcomes, errors


def metrics_frame(outcomes: dict[str, EditOutcome]) -> pd.DataFrame:
    """Methods × metrics, with wall time and peak memory."""
    rows = {method: {**outcome.metrics, "wall_time_s": outcome.wall_time_s,
                     "peak_memory_bytes": outcome.peak_memory_bytes}
            for method, outcome in outcomes.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def predictions_frame(outcomes: dict[str, EditOutcome]) -> pd.DataFrame:
    """One row per probe: its prompt and answer, the prediction before, and each method's prediction after."""
    frame: pd.DataFrame | None = None
    for method, outcome in outcomes.items():
        table = outcome.table.set_index("probe_id")
        if frame is None:
            frame = table[["kind", "prompt", "answer", "pred_before"]].copy()
        frame[method] = table["pred_after"]
        frame[f"{method} P(answer)"] = table["prob_after"]
    return frame.reset_index() if frame is not None else pd.DataFrame()
