"""Readers for the knowledge-editing data sets, all into one :class:`EditCase` type.

Formats (see /work/shared/datasets/README.md for the published layouts):

* ``counterfact`` — ROME's ``counterfact.json``: a rewrite with paraphrase, neighbourhood,
  attribute and generation prompts;
* ``zsre`` — ZsRE as used by MEND / EasyEdit: a question, its rephrase, the new answer, an NQ
  locality question (its "nq question: " prefix removed) and optional portability;
* ``mquake`` — MQuAKE: several rewrites per case, multi-hop questions and single-hop clozes;
* ``knowedit`` — EasyEdit's KnowEdit files: portability and locality categories whose
  ``ground_truth`` is a string, a list of aliases or a list of lists of aliases;
* ``factbase`` — a fact base file like ``data/factbase.json``; the name ``"demo"`` means the
  bundled one. Its cases are counterfactual edits with probes from :func:`probes_for_request`.

A malformed file raises :class:`DatasetError` naming the file, the record and the field.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing.core.request import EditRequest, InvalidEditRequest
from editing.storage.factbase import FactBase, load_factbase
from editing.train import edit_records
from eval.probes import KIND_PREFIX, Probe, ProbeSet, probes_for_request

FORMATS = ("counterfact", "zsre", "mquake", "knowedit", "factbase")
NQ_PREFIX = "nq question: "


class DatasetError(ValueError):
    """A data set file that cannot be read; the message names the file, record and field."""


@dataclass
class EditCase:
    """One unit of evaluation: the edit requests applied together and their probes."""

    case_id: str
    requests: list[EditRequest]
    probes: ProbeSet
    source: str  # the format it was read from ("counterfact", ..., "factbase")
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. CounterFact's generation prompts


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def load_dataset(path_or_name: str | Path, fmt: str | None = None, limit: int | None = None,
                 seed: int = 0) -> list[EditCase]:
    """Read a data set file (format auto-detected unless ``fmt``) or ``"demo"`` into edit cases.

    ``"demo"`` gives counterfactual edits of the bundled fact base's held-out subjects (those no
    learned editor is trained on), shuffled by ``seed`` so a prefix covers every relation.
    """
    if fmt is not None and fmt not in FORMATS:
        raise DatasetError(f"Unknown data set format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if str(path_or_name) == "demo":
        return factbase_cases(load_factbase(), limit=limit, seed=seed)
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (give a data set file, or 'demo' for the bundled fact base).")
    data = _read_json(path)
    if fmt is None:
        fmt = detect_format(data, path)
    if fmt == "factbase":
        return factbase_cases(_read_factbase(path), limit=limit, seed=seed)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a {fmt} file holds a list of records, not {type(data).__name__}.")
    reader = READERS[fmt]
    cases = []
    for index, record in enumerate(data[:limit] if limit is not None else data):
        context = _Context(path, index)
        if not isinstance(record, dict):
            raise DatasetError(f"{context}: expected an object, got {type(record).__name__}.")
        cases.append(reader(record, context))
    return cases


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the file ({err}).") from err
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}: record {len(records)} (line {line_no}) is not valid JSON: "
                                       f"{err.msg}.") from err
                except RecursionError as err:
                    raise DatasetError(f"{path}: record {len(records)} (line {line_no}) is nested too deeply.") \
                        from err
        return records
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from err
    except RecursionError as err:  # hostile input: nesting deeper than the parser's stack
        raise DatasetError(f"{path}: the JSON is nested too deeply to be a data set.") from err


def detect_format(data: Any, path: Path | str = "<data>") -> str:
    """The format of parsed JSON, from the fields of its first record."""
    if isinstance(data, dict) and "facts" in data and "relations" in data:
        return "factbase"
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty list of records (or a fact base object).")
    first = data[0]
    if not isinstance(first, dict):
        raise DatasetError(f"{path}: record 0: expected an object, got {type(first).__name__}.")
    if "requested_rewrite" in first:
        rewrite = first["requested_rewrite"]
        return "mquake" if isinstance(rewrite, list) or "questions" in first else "counterfact"
    if "src" in first and "alt" in first:
        return "zsre"
    if "target_new" in first and "prompt" in first:
        return "knowedit"
    raise DatasetError(f"{path}: record 0 matches no known format (fields {sorted(first)}); "
                       f"pass fmt= one of {', '.join(FORMATS)}.")


# ---------------------------------------------------------------------------------------------
# Field access with precise errors
# ---------------------------------------------------------------------------------------------
@dataclass
class _Context:
    path: Path
    index: int
    within: str = ""  # enclosing field of nested reads

    def __str__(self) -> str:
        return f"{self.path}: record {self.index}"

    def error(self, field_name: str, problem: str) -> DatasetError:
        name = f"{self.within}.{field_name}" if self.within else field_name
        return DatasetError(f"{self}: field '{name}' {problem}.")


_MISSING = object()


def _get(record: dict, dotted: str, ctx: _Context, kind: type | tuple[type, ...] = str, required: bool = True,
         default: Any = None, within: str = "") -> Any:
    """``record["a"]["b"]`` for ``"a.b"``, checked for presence and type (``within`` names the
    enclosing field in messages, e.g. ``requested_rewrite[1]``)."""
    value: Any = record
    if within:
        ctx = _Context(ctx.path, ctx.index, within)
    for part in dotted.split("."):
        if not isinstance(value, dict):
            raise ctx.error(dotted, f"cannot be read: its parent is {type(value).__name__}, not an object")
        value = value.get(part, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise ctx.error(dotted, "is missing")
            return default
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ctx.error(dotted, f"should be {names}, not {type(value).__name__}")
    if isinstance(value, str) and required and not value.strip():
        raise ctx.error(dotted, "is empty")
    return value


def _strings(value: Any, dotted: str, ctx: _Context) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(dotted, "should be a list of strings")
    return [v for v in value if v.strip()]


def _answers(value: Any, dotted: str, ctx: _Context) -> list[str]:
    """KnowEdit's ground truth: a string, a list of aliases or a list of lists of aliases."""
    if isinstance(value, str):
        flat = [value]
    elif isinstance(value, list):
        flat = []
        for item in value:
            if isinstance(item, str):
                flat.append(item)
            elif isinstance(item, list) and all(isinstance(v, str) for v in item):
                flat.extend(item)
            else:
                raise ctx.error(dotted, "should be a string, a list of strings or a list of lists of strings")
    else:
        raise ctx.error(dotted, f"should be a string or a list of strings, not {type(value).__name__}")
    flat = [v.strip() for v in flat if v.strip()]
    if not flat:
        raise ctx.error(dotted, "has no answer")
    return flat


def _request(ctx: _Context, field_name: str, prompt: str, subject: str, target_new: str,
             target_true: str | None) -> EditRequest:
    """An EditRequest, matching the subject case-insensitively when the prompt spells it differently."""
    if "{}" not in prompt and subject not in prompt:
        at = prompt.lower().find(subject.lower())
        if at >= 0:
            subject = prompt[at: at + len(subject)]
    try:
        return EditRequest(prompt, subject, target_new, target_true)
    except InvalidEditRequest as err:
        raise ctx.error(field_name, f"does not make a valid edit request: {err}") from err


class _Builder:
    """Collects the probes of one case with per-kind ids."""

    def __init__(self, source: str = "dataset") -> None:
        self.probes: list[Probe] = []
        self.source = source

    def add(self, kind: str, prompt: str, answer: str, subkind: str | None = None, subject: str | None = None,
            request_index: int = 0, contrast: str | None = None, aliases: tuple[str, ...] = ()) -> None:
        prompt, answer = " ".join(prompt.split()), " ".join(answer.split())
        if not prompt or not answer:
            return
        if subject is not None and subject not in prompt:
            subject = None
        prefix = KIND_PREFIX[kind]
        index = sum(1 for p in self.probes if p.kind == kind)
        self.probes.append(Probe(f"{prefix}-{index}", prompt, answer, kind, subkind=subkind, subject=subject,
                                 request_index=request_index, source=self.source,
                                 contrast=contrast if contrast != answer else None, aliases=aliases))


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def read_counterfact(record: dict, ctx: _Context) -> EditCase:
    """One CounterFact record: the rewrite, paraphrases, neighbours (keep target_true) and attribute prompts."""
    rewrite = _get(record, "requested_rewrite", ctx, dict)
    prompt = _get(record, "requested_rewrite.prompt", ctx)
    subject = _get(record, "requested_rewrite.subject", ctx)
    new = _get(record, "requested_rewrite.target_new.str", ctx)
    true = _get(record, "requested_rewrite.target_true.str", ctx)
    request = _request(ctx, "requested_rewrite.prompt", prompt, subject, new, true)
    b = _Builder()
    b.add("reliability", request.text, new, subject=request.subject, contrast=true)
    # Paraphrase prompts open with an unrelated sentence: kept, as ROME evaluates them that way.
    for text in _strings(record.get("paraphrase_prompts", []), "paraphrase_prompts", ctx):
        b.add("generality", text, new, subject=request.subject, contrast=true)
    for text in _strings(record.get("neighborhood_prompts", []), "neighborhood_prompts", ctx):
        b.add("locality", text, true, subkind="neighbourhood", contrast=new)
    # Attribute prompts are other subjects that truly have the new target: out of scope, unchanged.
    for text in _strings(record.get("attribute_prompts", []), "attribute_prompts", ctx):
        b.add("unrelated", text, new, subkind="attribute", contrast=true)
    meta = {"relation_id": rewrite.get("relation_id"),
            "generation_prompts": _strings(record.get("generation_prompts", []), "generation_prompts", ctx)}
    case_id = record.get("case_id", ctx.index)
    return EditCase(str(case_id), [request], ProbeSet([request], b.probes), "counterfact", meta)


def read_zsre(record: dict, ctx: _Context) -> EditCase:
    """One ZsRE record: question → alt, its rephrase, the NQ locality question, optional portability."""
    subject = _get(record, "subject", ctx)
    question = _get(record, "src", ctx)
    new = _get(record, "alt", ctx)
    answers = record.get("answers")
    true = _strings(answers, "answers", ctx)[0] if answers else _get(record, "pred", ctx, required=False)
    request = _request(ctx, "src", question, subject, new, true if true != new else None)
    b = _Builder()
    b.add("reliability", request.text, new, subject=request.subject, contrast=request.target_true)
    rephrase = _get(record, "rephrase", ctx, required=False)
    if rephrase:
        b.add("generality", rephrase, new, subject=request.subject, contrast=request.target_true)
    loc = _get(record, "loc", ctx, required=False)
    if loc:
        # NQ locality questions carry the "nq question: " prefix of MEND's preprocessing: dropped.
        question_text = loc[len(NQ_PREFIX):] if loc.lower().startswith(NQ_PREFIX) else loc
        b.add("locality", question_text, _get(record, "loc_ans", ctx), subkind="nq", contrast=new)
    portability = record.get("portability")
    if portability is not None:
        if not isinstance(portability, dict):
            raise ctx.error("portability", "should be an object with 'New Question' and 'New Answer'")
        b.add("portability", _get(record, "portability.New Question", ctx),
              _get(record, "portability.New Answer", ctx), subkind="multi-hop", subject=request.subject)
    meta = {"cond": record.get("cond")}
    return EditCase(str(record.get("case_id", ctx.index)), [request], ProbeSet([request], b.probes), "zsre", meta)


def read_mquake(record: dict, ctx: _Context) -> EditCase:
    """One MQuAKE case: all its rewrites, their questions, the multi-hop questions and untouched single hops."""
    rewrites = _get(record, "requested_rewrite", ctx, list)
    if not rewrites:
        raise ctx.error("requested_rewrite", "is empty")
    requests = []
    b = _Builder()
    for i, rewrite in enumerate(rewrites):
        name = f"requested_rewrite[{i}]"
        if not isinstance(rewrite, dict):
            raise ctx.error(name, "should be an object")
        prompt = _get(rewrite, "prompt", ctx, within=name)
        subject = _get(rewrite, "subject", ctx, within=name)
        new = _get(rewrite, "target_new.str", ctx, within=name)
        true = _get(rewrite, "target_true.str", ctx, within=name)
        request = _request(ctx, f"{name}.prompt", prompt, subject, new, true)
        requests.append(request)
        b.add("reliability", request.text, new, subject=request.subject, request_index=i, contrast=true)
        question = _get(rewrite, "question", ctx, required=False, within=name)
        if question:
            b.add("generality", question, new, subject=request.subject, request_index=i, contrast=true)
    questions = _strings(_get(record, "questions", ctx, list), "questions", ctx)
    new_answer = _get(record, "new_answer", ctx)
    old_answer = _get(record, "answer", ctx, required=False)
    aliases = tuple(_strings(record.get("new_answer_alias", []), "new_answer_alias", ctx))
    for question in questions:
        # Multi-hop questions are questions, not cloze prompts; asked as they are.
        b.add("portability", question, new_answer, subkind="multi-hop", subject=requests[0].subject,
              contrast=old_answer, aliases=aliases)
    # Single hops the edits do not touch must keep their answers (original and new chains).
    edited = {r.text for r in requests}
    seen: set[str] = set()
    for hops_field in ("single_hops", "new_single_hops"):
        hops = record.get(hops_field, [])
        if not isinstance(hops, list):
            raise ctx.error(hops_field, "should be a list")
        for j, hop in enumerate(hops):
            if not isinstance(hop, dict):
                raise ctx.error(f"{hops_field}[{j}]", "should be an object")
            cloze = _get(hop, "cloze", ctx, within=f"{hops_field}[{j}]")
            if cloze in edited or cloze in seen:
                continue
            seen.add(cloze)
            answer = _get(hop, "answer", ctx, within=f"{hops_field}[{j}]")
            b.add("locality", cloze, answer, subkind="single-hop",
                  aliases=tuple(_strings(hop.get("answer_alias", []), f"{hops_field}[{j}].answer_alias", ctx)))
    meta = {"questions": questions, "answer": old_answer, "new_answer": new_answer}
    return EditCase(str(record.get("case_id", ctx.index)), requests, ProbeSet(requests, b.probes), "mquake", meta)


_PORTABILITY_SUBKINDS: tuple[tuple[str, str], ...] = (
    ("alias", "subject-alias"), ("reason", "reasoning"), ("logic", "logical"), ("inverse", "inverse"),
    ("reverse", "inverse"), ("hop", "multi-hop"),
)


def _subkind(category: str) -> str:
    lowered = category.lower()
    for needle, subkind in _PORTABILITY_SUBKINDS:
        if needle in lowered:
            return subkind
    return lowered.replace("_", "-")


def read_knowedit(record: dict, ctx: _Context) -> EditCase:
    """One KnowEdit record: the edit, its rephrase, and every portability and locality category present."""
    subject = _get(record, "subject", ctx)
    prompt = _get(record, "prompt", ctx)
    new = _answers(_get(record, "target_new", ctx, (str, list)), "target_new", ctx)[0]
    truth = record.get("ground_truth")
    true = _answers(truth, "ground_truth", ctx)[0] if truth not in (None, "", []) else None
    request = _request(ctx, "prompt", prompt, subject, new, true if true != new else None)
    b = _Builder()
    b.add("reliability", request.text, new, subject=request.subject, contrast=request.target_true)
    rephrase = record.get("rephrase_prompt") or record.get("rephrase")
    if isinstance(rephrase, str) and rephrase.strip():
        b.add("generality", rephrase, new, subject=request.subject, contrast=request.target_true)
    for group, kind in (("portability", "portability"), ("locality", "locality")):
        categories = record.get(group) or {}
        if not isinstance(categories, dict):
            raise ctx.error(group, "should be an object of categories")
        for category, items in categories.items():
            name = f"{group}.{category}"
            items = [items] if isinstance(items, dict) else items
            if not isinstance(items, list):
                raise ctx.error(name, "should be a list of {prompt, ground_truth} items")
            for j, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ctx.error(f"{name}[{j}]", "should be an object with prompt and ground_truth")
                item_prompt = _get(item, "prompt", ctx, (str, list), within=f"{name}[{j}]")
                prompts = [item_prompt] if isinstance(item_prompt, str) else _strings(item_prompt, f"{name}[{j}]"
                                                                                       ".prompt", ctx)
                answers = _answers(item.get("ground_truth"), f"{name}[{j}].ground_truth", ctx)
                for text in prompts:
                    b.add(kind, text, answers[0], subkind=_subkind(category) if kind == "portability"
                          else category.lower().replace("_", "-"),
                          subject=request.subject, aliases=tuple(answers[1:]))
    return EditCase(str(record.get("case_id", ctx.index)), [request], ProbeSet([request], b.probes), "knowedit")


READERS: dict[str, Callable[[dict, _Context], EditCase]] = {
    "counterfact": read_counterfact, "zsre": read_zsre, "mquake": read_mquake, "knowedit": read_knowedit,
}


# ---------------------------------------------------------------------------------------------
# The fact base
# ---------------------------------------------------------------------------------------------
def _read_factbase(path: Path) -> FactBase:
    try:
        return load_factbase(path)
    except KeyError as err:
        raise DatasetError(f"{path}: a relation, fact or composition lacks the field {err}.") from err
    except (ValueError, TypeError) as err:
        raise DatasetError(f"{path}: {err}") from err


def factbase_cases(factbase: FactBase, limit: int | None = None, seed: int = 0, split: str = "heldout",
                   **probe_options: Any) -> list[EditCase]:
    """Counterfactual edits of the fact base (``editing.train.edit_records``) with fact-base probes."""
    records = edit_records(split, factbase, seed=seed)
    random.Random(seed).shuffle(records)
    if limit is not None:
        records = records[:limit]
    cases = []
    for index, record in enumerate(records):
        probes = probes_for_request(record.request, factbase, seed=seed + index, **probe_options)
        cases.append(EditCase(f"factbase-{index}", [record.request], probes, "factbase"))
    return cases
