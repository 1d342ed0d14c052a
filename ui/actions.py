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

from editing.core.edit import Edit, EditError
from editing.core.request import EditRequest
from editing.core.safety import pack_edit_stack, unpack_edit_stack
from editing.core.session import EditSession
from editing.models.loader import ModelHandle
from editing.storage.factbase import FactBase, load_factbase
from eval.evaluate import GENERATION_KINDS, EditOutcome, evaluate_edit, outcome_table, predict, with_generations
from eval.metrics import summarize
from eval.outcomes import (
    GENERATION_TOKENS,
    TokenProbs,
    continuations,
    gives_answer,
    is_intended,
    probe_outcome,
    token_probs,
)
from eval.probes import IN_SCOPE_KINDS, Probe, ProbeSet, probes_for_request
from eval.realfacts import factbase_for

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
                 base: ProbeSet | None = None, handle: ModelHandle | None = None,
                 progress: ProgressFn | None = None) -> ProbeSet:
    """The probes of a typed edit: ``base`` (a data set case's probes) or those of the model's fact
    source (the bundled fact base for the demo, the real-world facts a pretrained ``handle`` knows:
    :func:`eval.realfacts.factbase_for`), plus the person's own probes as (prompt, answer, kind)."""
    if base is None:
        factbase = factbase_for(handle, progress) if handle is not None else load_factbase()
    probeset = base if base is not None else probes_for_request(request, factbase)
    probeset = ProbeSet(list(probeset.requests), list(probeset.probes))  # never extend a shared object
    for prompt, answer, kind in user_probes:
        probeset.add(prompt, answer, kind)
    return probeset


def apply_and_evaluate(session: EditSession, method: str, request: EditRequest, probeset: ProbeSet,
                       hparams: dict[str, Any] | None, progress: ProgressFn | None = None,
                       generate: bool = False) -> EditOutcome:
    """Apply one edit on the session (pushed on its stack) and judge it on ``probeset``.

    With ``generate`` the edit prompt, its paraphrases, neighbours and consequences are also
    continued greedily before and after, and judged by whether the text says their answer (the
    table's ``gen_*`` columns, :func:`eval.evaluate.with_generations`).
    """
    kinds = GENERATION_KINDS if generate else ()
    with session.handle.lock.claim():  # a background run waits until the whole flow is done
        return evaluate_edit(session, method, [request], probeset, hparams or None, progress=progress,
                             generation_kinds=kinds, probe_tokens=GENERATION_TOKENS)


@dataclass(frozen=True)
class TargetBreakdown:
    """The edit prompt's targets token by token, without and with the edit."""

    new_before: TokenProbs
    new_after: TokenProbs
    true_before: TokenProbs | None = None
    true_after: TokenProbs | None = None


def target_breakdown(session: EditSession, edit: Edit, request: EditRequest) -> TargetBreakdown:
    """Per-token probabilities of the new (and true) target on the edit prompt, without ``edit`` and
    with it, each on top of the session's earlier edits."""
    before, after = stack_up_to(session, edit, include=False), stack_up_to(session, edit, include=True)
    prompt = request.text
    true = request.target_true
    return TargetBreakdown(
        new_before=token_probs(before, prompt, request.target_new),
        new_after=token_probs(after, prompt, request.target_new),
        true_before=token_probs(before, prompt, true) if true else None,
        true_after=token_probs(after, prompt, true) if true else None,
    )


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
                       new_probes: Sequence[tuple[str, str, str]], generate: bool = False) -> pd.DataFrame:
    """Rows (as in ``EditOutcome.table``) for probes typed after ``edit`` was applied: predictions
    without it and with it, each on top of the session's earlier edits. With ``generate`` the probes
    of the generated kinds are also continued greedily without and with it (the ``gen_*`` columns)."""
    added: list[Probe] = [probeset.add(prompt, answer, kind) for prompt, answer, kind in new_probes]
    without, with_edit = stack_up_to(session, edit, include=False), stack_up_to(session, edit, include=True)
    rows = outcome_table(predict(without, added), predict(with_edit, added))
    if not generate:
        return rows
    prompts = [p.prompt if p.kind in GENERATION_KINDS else None for p in added]
    wanted = [p for p in prompts if p is not None]
    before = iter(continuations(without, wanted))
    after = iter(continuations(with_edit, wanted))
    return with_generations(rows, [next(before) if p else None for p in prompts],
                            [next(after) if p else None for p in prompts])


def metrics_with_added(metrics: dict[str, float], table: pd.DataFrame) -> dict[str, float]:
    """``metrics`` recomputed over ``table`` (the edit's probes and those typed afterwards); metrics
    the table cannot give (fluency, consistency) are kept."""
    return {**metrics, **summarize(table)}


def outcome_column(table: pd.DataFrame) -> pd.Series:
    """Per probe, one of :data:`eval.outcomes.OUTCOMES`: in-scope probes now giving the expected answer
    (teacher-forced, every token), changed to something else, or unchanged; out-of-scope probes
    changed or kept."""
    values = [probe_outcome(kind in IN_SCOPE_KINDS, bool(changed), gives_answer(acc))
              for kind, changed, acc in zip(table["kind"], table["changed"], table["acc_after"], strict=True)]
    return pd.Series(values, index=table.index, name="outcome", dtype=object)


def intended_column(table: pd.DataFrame) -> pd.Series:
    """Per probe: did it behave as intended? Only in-scope probes that now give the expected answer and
    out-of-scope probes that kept their prediction did."""
    return outcome_column(table).map(is_intended).astype(bool).rename("as_intended")


def answers_after(session: EditSession, probeset: ProbeSet) -> dict[str, bool]:
    """Per probe id: whether the session (its edits active) gives the probe's expected answer."""
    return {o.probe.id: gives_answer(o.accuracy) for o in predict(session, probeset.probes, k=0)}


def scope_outcomes(points: pd.DataFrame, answered: dict[str, bool]) -> pd.Series:
    """The outcome of every scope-map point (``answered``: probe id -> gives its expected answer after)."""
    values = [probe_outcome(bool(s), bool(f), bool(answered.get(i, False)))
              for i, s, f in zip(points["probe_id"], points["in_scope"], points["flipped"], strict=True)]
    return pd.Series(values, index=points.index, name="outcome", dtype=object)


def carried_true_target(prompt: str, subject: str, target_true: str, origin: tuple[str, str, str] | None) -> bool:
    """Whether ``target_true`` was carried over from another fact: it is the true target an example
    (or the default fact) put in the form, but the prompt or subject are no longer that example's."""
    if origin is None or not target_true.strip():
        return False
    o_prompt, o_subject, o_true = origin
    same_fact = " ".join(prompt.split()) == " ".join(o_prompt.split()) and subject.strip() == o_subject.strip()
    return target_true.strip() == o_true.strip() and not same_fact


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
            with handle.lock.claim():  # one method's whole flow at a time; a background run waits for it
                outcomes[method] = evaluate_edit(scratch, method, [request], probeset, hparams.get(method) or None,
                                                 progress=report)
        except Exception as err:  # one method failing must not hide the others' results
            errors[method] = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return outcomes, errors


def metrics_frame(outcomes: dict[str, EditOutcome]) -> pd.DataFrame:
    """Methods × metrics, with wall time, peak memory and how it was measured (``memory_kind``)."""
    rows = {method: {**outcome.metrics, "wall_time_s": outcome.wall_time_s,
                     "peak_memory_bytes": outcome.peak_memory_bytes, "memory_kind": outcome.memory_kind}
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
