"""Edit metrics, both families, on the same probes.

* The survey's / EasyEdit's token-level metrics: teacher-forced accuracy of the expected answer
  (reliability, generality, portability) and agreement of post-edit with pre-edit argmax tokens on
  the locality answers (locality).
* CounterFact's probability comparisons (ROME, MEMIT): a probe succeeds when the answer is more
  likely than its contrast — per-token geometric-mean probabilities, i.e. a comparison of mean
  per-token NLL — for efficacy (the request), paraphrase (generality probes) and neighbourhood
  (locality probes: the true answer against the new target); magnitudes are the mean probability
  differences; the score is the harmonic mean of the three success rates.
* Fluency of generations: ROME's weighted bigram/trigram entropy.
* Figures that keep the first two honest (:data:`SCOPE_METRICS`): locality over the neighbours the
  model answered correctly before the edit (agreement credits a neighbour answered "of" both times),
  locality on same-relation neighbours, the share of unrelated facts (random other facts) left
  unchanged, and an edit success that needs the greedy answer to be the new target (efficacy only
  says the new target beats the old one, which a model answering neither can satisfy).

The model-facing numbers come from :mod:`editing.analysis.scoring` (batched); this module turns them into
metrics. :func:`summarize` reads a per-probe table (as built by :mod:`eval.evaluate`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from editing.analysis.scoring import TargetScore, score_targets

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

NAN = float("nan")

#: keys of the metric dict, in display order
TOKEN_METRICS = ("reliability", "generality", "locality", "portability")
COUNTERFACT_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude",
                       "paraphrase_magnitude", "neighborhood_magnitude", "score")
METRIC_KEYS = TOKEN_METRICS + COUNTERFACT_METRICS
#: the same four judged by greedy generation: the share of probes whose continuation contains the
#: probe's answer (:func:`generation_contains`); present when generations were asked for
GENERATION_METRICS = ("reliability_gen", "generality_gen", "locality_gen", "portability_gen")

#: figures beside the token-level ones, in display order (see :func:`summarize`); the ``n_`` keys are counts
SCOPE_METRICS = ("edit_success", "n_efficacy_without_reliability", "locality_known", "n_locality_known",
                 "n_locality", "locality_same_relation", "unrelated_unchanged", "n_unrelated")
#: count keys: summed, not averaged, when several steps are pooled (a batch run's point)
COUNT_KEYS = ("n_efficacy_without_reliability", "n_locality_known", "n_locality", "n_unrelated")
#: the subkind of locality probes that ask the edit's own relation about other subjects
SAME_RELATION_SUBKIND = "neighbourhood"

#: which probe kind each CounterFact family reads
_CF_KINDS = {"efficacy": "reliability", "paraphrase": "generality", "neighborhood": "locality",
             "portability": "portability"}


# -- token-level (survey / EasyEdit) -------------------------------------------------------------
def token_accuracy(hits: Sequence[bool] | np.ndarray) -> float:
    """Share of answer tokens that are the argmax given the gold prefix (teacher forcing)."""
    values = np.asarray(hits, dtype=float)
    return float(values.mean()) if values.size else NAN


def agreement(before_ids: Sequence[int], after_ids: Sequence[int]) -> float:
    """Share of answer positions whose post-edit argmax token equals the pre-edit one.

    Positions missing on either side (a routed prompt tokenised the answer differently) count as
    disagreement.
    """
    width = max(len(before_ids), len(after_ids))
    if width == 0:
        return NAN
    same = sum(int(a == b) for a, b in zip(before_ids, after_ids, strict=False))
    return same / width


def teacher_forced_accuracy(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Token-level accuracy of each answer after its prompt (one batched pass per chunk)."""
    return [score.accuracy for score in score_targets(handle, prompts, answers)]


# -- CounterFact ---------------------------------------------------------------------------------
def per_token_prob(score: TargetScore) -> float:
    """exp(−mean per-token NLL): the length-normalised probability CounterFact compares."""
    return math.exp(-score.mean_nll)


def counterfact_success(p_answer: Sequence[float], p_contrast: Sequence[float]) -> float:
    """Share of probes whose answer beats its contrast (NaN pairs are skipped)."""
    a, c = np.asarray(p_answer, dtype=float), np.asarray(p_contrast, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(c))
    return float((a[keep] > c[keep]).mean()) if keep.any() else NAN


def counterfact_magnitude(p_answer: Sequence[float], p_contrast: Sequence[float]) -> float:
    """Mean of P(answer) − P(contrast) (NaN pairs are skipped)."""
    a, c = np.asarray(p_answer, dtype=float), np.asarray(p_contrast, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(c))
    return float((a[keep] - c[keep]).mean()) if keep.any() else NAN


def counterfact_comparison(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str],
                           contrasts: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per-token probabilities of each prompt's answer and contrast, batched."""
    p_answer = [per_token_prob(s) for s in score_targets(handle, prompts, answers)]
    p_contrast = [per_token_prob(s) for s in score_targets(handle, prompts, contrasts)]
    return p_answer, p_contrast


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean of the non-NaN values (0 if any is 0; NaN if none)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return NAN
    if any(v <= 0 for v in kept):
        return 0.0
    return len(kept) / sum(1.0 / v for v in kept)


# -- does the model *say* it ----------------------------------------------------------------------
def _normalised_words(text: str) -> list[str]:
    # accents folded too: a model that writes "Bogota" says "Bogotá"
    folded = "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))
    return re.findall(r"\w+", folded)


def generation_contains(text: str, target: str) -> bool:
    """Whether a generated ``text`` says ``target``: its words appear, consecutively, in the text.

    Case, accents, punctuation and spacing are ignored ("the city of rome." says "Rome", "Bogota"
    says "Bogotá"), but words must match whole ("Romania" does not say "Rome"). This is the
    "real-world" judgement of an edit — greedy generation, not teacher forcing — that the "mirage"
    study (ACL 2025) found far below teacher-forced accuracy. An empty target is never said.
    """
    wanted = _normalised_words(target)
    said = _normalised_words(text)
    if not wanted:
        return False
    width = len(wanted)
    return any(said[i: i + width] == wanted for i in range(len(said) - width + 1))


# -- fluency and consistency of generations --------------------------------------------------------
_TOKEN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of a text."""
    return _TOKEN.findall(text.lower())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency: the mean of weighted n-gram entropies (bits) of one text.

    Repetitive text has low entropy. ROME tokenises with NLTK; a regex word/punctuation split
    stands in for it here.
    """
    tokens = words(text)
    entropies = []
    for n, weight in zip(ns, weights, strict=True):
        grams = Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        if total == 0:
            entropies.append(0.0)
            continue
        freqs = np.array(list(grams.values()), dtype=float) / total
        entropies.append(weight * float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(entropies))


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy of a set of generations (NaN for none)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else NAN


def tfidf_similarity(texts: Sequence[str], references: Sequence[str]) -> float:
    """Cosine similarity of the TF-IDF vectors of ``texts`` and ``references`` (each joined).

    ROME's consistency compares generations with Wikipedia text about the new target, with IDF
    fitted on Wikipedia; here the IDF is fitted on the documents given (the generations and the
    reference texts), which is the simplification a small offline corpus allows.
    """
    docs = [words(t) for t in (*texts, *references)]
    if not texts or not references:
        return NAN
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for d in docs for w in d))}
    if not vocab:
        return NAN
    df = np.zeros(len(vocab))
    for doc in docs:
        for w in set(doc):
            df[vocab[w]] += 1
    idf = np.log((1 + len(docs)) / (1 + df)) + 1  # smoothed IDF

    def vector(parts: Sequence[str]) -> np.ndarray:
        counts = np.zeros(len(vocab))
        for text in parts:
            for w in words(text):
                counts[vocab[w]] += 1
        v = counts * idf
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    return float(vector(texts) @ vector(references))


# -- a per-probe table into the metric dict ---------------------------------------------------------
def _mean(series: pd.Series) -> float:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else NAN


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """All metrics of a per-probe table (columns of :func:`eval.evaluate.outcome_table`).

    Needs ``kind``, ``acc_before/after``, ``agreement`` and the CounterFact columns
    ``pcf_answer_before/after`` and ``pcf_contrast_before/after``. NaN where a kind has no probe.
    """
    out: dict[str, float] = {}
    kinds = table["kind"] if len(table) else pd.Series([], dtype=str)

    def rows(kind: str) -> pd.DataFrame:
        return table[kinds == kind]

    for when in ("after", "before"):
        suffix = "" if when == "after" else "_before"
        for kind in ("reliability", "generality", "portability"):
            out[kind + suffix] = _mean(rows(kind)[f"acc_{when}"]) if len(table) else NAN
        for family, kind in _CF_KINDS.items():
            part = rows(kind) if len(table) else table
            answer = part[f"pcf_answer_{when}"] if len(part) else []
            contrast = part[f"pcf_contrast_{when}"] if len(part) else []
            out[f"{family}_score{suffix}"] = counterfact_success(answer, contrast)
            out[f"{family}_magnitude{suffix}"] = counterfact_magnitude(answer, contrast)
        out["score" + suffix] = harmonic_mean(
            out[f"{f}_score{suffix}"] for f in ("efficacy", "paraphrase", "neighborhood"))
    for kind in ("locality", "unrelated"):
        out[kind] = _mean(rows(kind)["agreement"]) if len(table) else NAN
    out.update(scope_summary(table))
    if "gen_hit_after" in table.columns:
        out.update(generation_summary(table))
    ordered = {key: out[key] for key in METRIC_KEYS}
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    return ordered


def _flags(values: pd.Series) -> pd.Series:
    """1.0 where a value is (numerically) 1, 0.0 below, NaN where unknown."""
    numbers = pd.to_numeric(values, errors="coerce")
    return (numbers >= 1.0 - 1e-9).astype(float).where(numbers.notna())


def _count(mask: pd.Series, rows: pd.DataFrame) -> float:
    # NaN without probes of the kind, so "no such probe" never reads as "none failed"
    return float(mask.sum()) if len(rows) else NAN


def scope_summary(table: pd.DataFrame) -> dict[str, float]:
    """The :data:`SCOPE_METRICS` of a per-probe table (``kind``, ``subkind``, ``acc_before/after``,
    ``agreement`` and the CounterFact ``pcf_*_after`` columns).

    * ``edit_success`` (and ``_before``): share of reliability probes whose greedy answer is the new
      target — every target token is the argmax (teacher-forced accuracy 1, as
      :func:`eval.outcomes.gives_answer`). ``n_efficacy_without_reliability``: reliability probes
      where P(new) beats P(true) (an efficacy success) yet the model does not answer the new target —
      failures that efficacy counts as successes.
    * ``locality_known``: agreement over the locality probes the model answered correctly before the
      edit (accuracy 1 before), as CounterFact's neighbourhood score judges only the true answer;
      ``n_locality_known`` of ``n_locality`` probes. Plain ``locality`` also credits a neighbour whose
      wrong answer stayed wrong.
    * ``locality_same_relation``: agreement over the same-relation neighbours (subkind
      ``neighbourhood``: the edit's relation asked about other subjects).
    * ``unrelated_unchanged``: share of unrelated probes (random other facts: other relations, other
      subjects) whose answer is unchanged — every answer token's argmax the same; ``n_unrelated``.
    """
    empty = pd.Series([], dtype=float)
    kinds = table["kind"] if len(table) else pd.Series([], dtype=str)

    def rows(kind: str) -> pd.DataFrame:
        return table[kinds == kind] if len(table) else table

    def column(part: pd.DataFrame, name: str) -> pd.Series:
        return part[name] if len(part) and name in part.columns else empty

    out: dict[str, float] = {}
    edits = rows("reliability")
    says = _flags(column(edits, "acc_after"))
    out["edit_success"] = _mean(says)
    out["edit_success_before"] = _mean(_flags(column(edits, "acc_before")))
    answer = pd.to_numeric(column(edits, "pcf_answer_after"), errors="coerce")
    contrast = pd.to_numeric(column(edits, "pcf_contrast_after"), errors="coerce")
    compared = answer.notna() & contrast.notna()
    beats = compared & (answer > contrast)
    out["n_efficacy_without_reliability"] = (_count(beats & (says == 0.0), edits)
                                             if compared.any() else NAN)

    neighbours = rows("locality")
    known = _flags(column(neighbours, "acc_before")) == 1.0
    out["locality_known"] = _mean(column(neighbours, "agreement")[known]) if known.any() else NAN
    out["n_locality_known"] = _count(known, neighbours)
    out["n_locality"] = float(len(neighbours)) if len(neighbours) else NAN
    same = column(neighbours, "subkind") == SAME_RELATION_SUBKIND
    out["locality_same_relation"] = _mean(column(neighbours, "agreement")[same]) if same.any() else NAN

    unrelated = rows("unrelated")
    out["unrelated_unchanged"] = _mean(_flags(column(unrelated, "agreement")))
    out["n_unrelated"] = float(len(unrelated)) if len(unrelated) else NAN
    return out


def generation_summary(table: pd.DataFrame) -> dict[str, float]:
    """The by-generation metrics of a per-probe table with ``gen_hit_before/after`` and
    ``gen_contrast_before/after`` columns (1.0, 0.0, or NaN for probes not generated).

    ``<kind>_gen``: the share of the kind's generated probes whose continuation after the edit
    contains the probe's answer — the new target for reliability and generality, the chain's new
    answer for portability, the neighbour's own answer for locality (it kept saying it);
    ``<kind>_gen_before``: the same before the edit; ``<kind>_gen_contrast``: the share whose
    continuation after the edit contains the competing answer (in scope: the old answer still said;
    locality: the new target leaking into a neighbour).
    """
    out: dict[str, float] = {}
    kinds = table["kind"] if len(table) else pd.Series([], dtype=str)
    for metric in GENERATION_METRICS:
        kind = metric.removesuffix("_gen")
        part = table[kinds == kind]
        out[metric] = _mean(part["gen_hit_after"]) if len(part) else NAN
        out[metric + "_before"] = _mean(part["gen_hit_before"]) if len(part) else NAN
        out[metric + "_contrast"] = _mean(part["gen_contrast_after"]) if len(part) else NAN
    return out
