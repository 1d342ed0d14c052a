"""Judging an edit: predictions on every probe before and after, and the metrics of both families.

Works for any method through the :class:`~editing.core.session.EditSession` interface: queries are
answered under ``session.active()`` and routed through ``session.route`` (so inference-wrapper
edits such as SERAC or IKE are judged on what they really answer), batched per answering model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from editing.analysis.scoring import generate_routed, score_routes
from editing.core.edit import Edit
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.storage.factbase import FactBase, load_corpus, load_factbase
from eval.metrics import agreement, fluency, generation_contains, per_token_prob, summarize, tfidf_similarity
from eval.probes import Probe, ProbeSet, probes_for_requests

NAN = float("nan")
ProgressFn = Callable[[float, str], None]

#: columns of the per-probe table, in order (extra columns follow these)
TABLE_COLUMNS = ("probe_id", "kind", "subkind", "prompt", "answer", "pred_before", "pred_after", "prob_before",
                 "prob_after", "acc_before", "acc_after", "changed", "top_before", "top_after")
#: provenance and the numbers the other metrics need: ``agreement`` (locality, token level) and the
#: per-token probabilities of the answer and of its contrast (CounterFact)
EXTRA_COLUMNS = ("in_scope", "subject", "request_index", "source", "contrast", "agreement", "pcf_answer_before",
                 "pcf_answer_after", "pcf_contrast_before", "pcf_contrast_after", "pred_prob_before",
                 "pred_prob_after", "routed_by")
#: columns :func:`with_generations` adds when probes are also judged by greedy generation
GENERATION_COLUMNS = ("gen_before", "gen_after", "gen_hit_before", "gen_hit_after", "gen_contrast_before",
                      "gen_contrast_after")
#: the probe kinds judged by generation unless told otherwise
GENERATION_KINDS = ("reliability", "generality", "locality", "portability")


@dataclass
class ProbeOutcome:
    """What the (possibly edited, possibly routed) model answers to one probe."""

    probe: Probe
    routed_prompt: str
    routed_by: str | None
    answer_ids: list[int]
    answer_prob: float  # P(whole answer | prompt), teacher-forced
    pcf_answer: float  # exp(−mean per-token NLL) of the answer
    accuracy: float  # token-level teacher-forced accuracy of the answer
    argmax_ids: list[int]  # argmax token at each answer position (teacher-forced)
    pred: str  # the most likely next token after the prompt
    pred_id: int
    pred_prob: float  # its probability (NaN when top-k was not asked for)
    top: list[tuple[str, float]] = field(default_factory=list)
    pcf_contrast: float = NAN  # exp(−mean per-token NLL) of the probe's contrast answer


def predict(session: EditSession, probes: Sequence[Probe], k: int = 5) -> list[ProbeOutcome]:
    """Answer every probe with the session's edits active, batched.

    One teacher-forced scoring pass covers the answers (with the top ``k`` next tokens, read at the
    first answer position, which sees the prompt alone) and the CounterFact contrasts. With ``k=0``
    the prediction is the argmax at that position and its probability is not recorded.
    """
    probes = list(probes)
    if not probes:
        return []
    with session.active():
        routes = session.routes([p.prompt for p in probes])
        contrasted = [i for i, p in enumerate(probes) if p.contrast]
        scores = score_routes(routes + [routes[i] for i in contrasted],
                              [p.answer for p in probes] + [probes[i].contrast for i in contrasted], top_k=k)
    contrast_prob = {i: per_token_prob(scores[len(probes) + j]) for j, i in enumerate(contrasted)}
    outcomes = []
    for index, (probe, route) in enumerate(zip(probes, routes, strict=True)):
        score = scores[index]
        argmax = [int(t) for t in score.predicted.tolist()] if score.predicted is not None else []
        if score.top:
            best = score.top[0]
            pred, pred_id, pred_prob = best.token, best.token_id, best.prob
            top = [(t.token, t.prob) for t in score.top]
        else:
            pred_id = argmax[0] if argmax else -1
            pred = route.handle.tokenizer.decode([pred_id]).strip() if argmax else ""
            pred_prob, top = NAN, []
        outcomes.append(ProbeOutcome(
            probe=probe, routed_prompt=route.prompt, routed_by=route.routed_by, answer_ids=list(score.token_ids),
            answer_prob=score.prob, pcf_answer=per_token_prob(score), accuracy=score.accuracy, argmax_ids=argmax,
            pred=pred, pred_id=pred_id, pred_prob=pred_prob, top=top, pcf_contrast=contrast_prob.get(index, NAN),
        ))
    return outcomes


def outcome_table(before: Sequence[ProbeOutcome], after: Sequence[ProbeOutcome]) -> pd.DataFrame:
    """One row per probe comparing its before and after outcomes."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} outcomes before but {len(after)} after.")
    rows: list[dict[str, Any]] = []
    for b, a in zip(before, after, strict=True):
        if b.probe.id != a.probe.id:
            raise ValueError(f"Outcomes out of order: {b.probe.id} before, {a.probe.id} after.")
        p = b.probe
        rows.append({
            "probe_id": p.id, "kind": p.kind, "subkind": p.subkind, "prompt": p.prompt, "answer": p.answer,
            "pred_before": b.pred, "pred_after": a.pred, "prob_before": b.answer_prob, "prob_after": a.answer_prob,
            "acc_before": b.accuracy, "acc_after": a.accuracy, "changed": b.pred_id != a.pred_id,
            "top_before": b.top, "top_after": a.top,
            "in_scope": p.in_scope, "subject": p.subject, "request_index": p.request_index, "source": p.source,
            "contrast": p.contrast, "agreement": agreement(b.argmax_ids, a.argmax_ids),
            "pcf_answer_before": b.pcf_answer, "pcf_answer_after": a.pcf_answer,
            "pcf_contrast_before": b.pcf_contrast, "pcf_contrast_after": a.pcf_contrast,
            "pred_prob_before": b.pred_prob, "pred_prob_after": a.pred_prob,
            "routed_by": a.routed_by,
        })
    return pd.DataFrame(rows, columns=[*TABLE_COLUMNS, *EXTRA_COLUMNS])


@dataclass
class EditOutcome:
    """An applied edit with every probe's before/after outcome and the metrics."""

    edit: Edit
    table: pd.DataFrame
    metrics: dict[str, float]
    wall_time_s: float
    peak_memory_bytes: int
    memory_kind: str = "rss"
    probeset: ProbeSet | None = None
    eval_time_s: float = 0.0
    generations: dict[str, list[str]] | None = None  # "prompts", "before", "after"


def _scaled(progress: ProgressFn | None, start: float, end: float) -> ProgressFn:
    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(start + (end - start) * min(1.0, max(0.0, fraction)), message)

    return report


def generate_probes(session: EditSession, probes: Sequence[Probe], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations of the probes' prompts with the session's edits active (routed, batched)."""
    return _generate(session, [p.prompt for p in probes], max_new_tokens)


def with_generations(table: pd.DataFrame, before: Sequence[str | None], after: Sequence[str | None]) -> pd.DataFrame:
    """The per-probe table with the generation columns (:data:`GENERATION_COLUMNS`).

    ``before``/``after`` hold one continuation per row (None for probes not generated). A hit is
    :func:`eval.metrics.generation_contains` of the row's answer (1.0/0.0, NaN when not generated);
    the contrast columns judge the row's competing answer the same way.
    """
    if not len(before) == len(after) == len(table):
        raise ValueError(f"{len(table)} probes but {len(before)} generations before and {len(after)} after.")
    out = table.copy()

    def judged(texts: Sequence[str | None], column: str) -> list[float]:
        return [NAN if text is None or not isinstance(target, str) or not target else
                float(generation_contains(text, target)) for text, target in zip(texts, out[column], strict=True)]

    out["gen_before"], out["gen_after"] = list(before), list(after)
    out["gen_hit_before"], out["gen_hit_after"] = judged(before, "answer"), judged(after, "answer")
    out["gen_contrast_before"], out["gen_contrast_after"] = judged(before, "contrast"), judged(after, "contrast")
    return out


def _spread(probes: Sequence[Probe], chosen: Sequence[Probe], texts: Sequence[str]) -> list[str | None]:
    by_id = {p.id: t for p, t in zip(chosen, texts, strict=True)}
    return [by_id.get(p.id) for p in probes]


def evaluate_edit(session: EditSession, method: str, requests: EditRequest | Sequence[EditRequest],
                  probeset: ProbeSet | None = None, hparams: dict[str, Any] | None = None,
                  progress: ProgressFn | None = None, k: int = 5,
                  generation_prompts: Sequence[str] | None = None, max_new_tokens: int = 20,
                  factbase: FactBase | None = None, generation_kinds: Sequence[str] = (),
                  probe_tokens: int = 20) -> EditOutcome:
    """Predict every probe, apply the edit to ``session``, predict again, and measure.

    "Before" is the session as it was (its earlier edits active). Without ``probeset`` the probes
    come from the fact base (:func:`eval.probes.probes_for_requests`; without ``factbase``, the
    bundled one for the demo model and the facts a real model knows otherwise,
    :func:`eval.realfacts.factbase_for`). With ``generation_prompts``
    greedy continuations before and after give fluency (n-gram entropy) and consistency (TF-IDF
    similarity with fact-base and corpus text about the new targets). With ``generation_kinds``
    (e.g. :data:`GENERATION_KINDS`) the probes of those kinds are also judged by greedy generation
    of ``probe_tokens`` tokens before and after (:func:`with_generations`; metrics
    ``reliability_gen`` ... beside the teacher-forced ones). On any error nothing is pushed on the
    session.
    """
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if factbase is None:
        from eval.realfacts import factbase_for  # the bundled fact base for the demo, known facts for a real model

        factbase = factbase_for(session.handle)
    probeset = probeset if probeset is not None else probes_for_requests(requests, factbase)
    report = _scaled(progress, 0.0, 1.0)
    started = time.perf_counter()
    report(0.0, "predicting before the edit")
    before = predict(session, probeset.probes, k)
    gen_before = _generate(session, generation_prompts, max_new_tokens)
    judged = [p for p in probeset.probes if p.kind in set(generation_kinds)]
    probe_gen_before = generate_probes(session, judged, probe_tokens) if judged else []
    eval_time = time.perf_counter() - started
    with session.tentatively():  # nothing stays pushed when judging the edit fails
        edit = session.apply(method, requests, hparams, progress=_scaled(progress, 0.05, 0.9))
        started = time.perf_counter()
        report(0.9, "predicting after the edit")
        after = predict(session, probeset.probes, k)
        gen_after = _generate(session, generation_prompts, max_new_tokens)
        table = outcome_table(before, after)
        if judged:
            table = with_generations(table, _spread(probeset.probes, judged, probe_gen_before),
                                     _spread(probeset.probes, judged, generate_probes(session, judged, probe_tokens)))
        metrics = summarize(table)
        generations = None
        if generation_prompts:
            generations = {"prompts": list(generation_prompts), "before": gen_before, "after": gen_after}
            references = reference_texts([r.target_new for r in requests], factbase)
            metrics.update(fluency=fluency(gen_after), fluency_before=fluency(gen_before),
                           consistency=tfidf_similarity(gen_after, references),
                           consistency_before=tfidf_similarity(gen_before, references))
        eval_time += time.perf_counter() - started
    report(1.0, "done")
    return EditOutcome(edit=edit, table=table, metrics=metrics, wall_time_s=edit.stats.wall_time_s,
                       peak_memory_bytes=edit.stats.peak_memory_bytes, memory_kind=edit.stats.memory_kind,
                       probeset=probeset, eval_time_s=eval_time, generations=generations)


def _generate(session: EditSession, prompts: Sequence[str] | None, max_new_tokens: int) -> list[str]:
    if not prompts:
        return []
    with session.active():
        return generate_routed(session.routes(prompts), max_new_tokens)


def reference_texts(targets: Sequence[str], factbase: FactBase | None = None, limit: int = 50) -> list[str]:
    """Text about each target for consistency: its fact-base facts as sentences and corpus lines naming it."""
    factbase = factbase or load_factbase()
    texts: list[str] = []
    for target in targets:
        for fact in factbase.facts:
            if target in (fact.subject, fact.object):
                template = factbase.relations[fact.relation].train_templates[0]
                texts.append(f"{template.replace('{}', fact.subject)} {fact.object}.")
        texts.extend(line for line in load_corpus() if target in line)
    return texts[:limit]
