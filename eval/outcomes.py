"""What an edit really did, in the words a person reads: does the model now *say* the target, how
likely is the whole target, which outcome each probe had, and why some probes are missing.

These helpers sit beside :mod:`eval.evaluate`: the dashboard's Playground and Scope map use them so that every figure
they show has one definition here, testable without a browser. Whether a generation says a target
is judged once, by :func:`eval.metrics.generation_contains`, in
:func:`eval.evaluate.with_generations`; this module only reads those columns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from editing.analysis.scoring import generate_routed, score_routes
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.storage.factbase import FactBase, load_factbase
from eval.probes import ProbeSet, match_relation

#: greedy tokens generated per prompt for the before/after texts (long enough for " the city of Rome")
GENERATION_TOKENS = 24
#: greedy tokens read when the model's own answer stands in for an empty true target
ANSWER_TOKENS = 8

# -- the outcome of one probe -------------------------------------------------------------------------
REACHED = "changed to the expected answer"
ELSEWHERE = "changed to something else"
STUCK = "unchanged, should have changed"
BROKEN = "changed, not intended"
KEPT = "unchanged, as intended"
#: every outcome, in-scope ones first
OUTCOMES = (REACHED, ELSEWHERE, STUCK, BROKEN, KEPT)
#: the outcomes a perfectly scoped edit produces
INTENDED_OUTCOMES = (REACHED, KEPT)


def gives_answer(accuracy: float | None) -> bool:
    """Whether a model whose teacher-forced accuracy on an answer is ``accuracy`` answers it.

    Accuracy 1 means every answer token is the argmax given the tokens before it, i.e. greedy
    decoding from the prompt produces exactly the answer first. Anything less (a two-token target
    half right, a continuation that starts with " the") does not give the answer.
    """
    return accuracy is not None and not math.isnan(float(accuracy)) and float(accuracy) >= 1.0 - 1e-9


def probe_outcome(in_scope: bool, changed: bool, answers_expected: bool) -> str:
    """One of :data:`OUTCOMES` for a probe.

    In-scope probes (the edit, paraphrases, consequences) have three outcomes: they now give the
    expected answer, their top prediction changed to something else (a portability probe expecting
    "Rome" that now answers "Italy"), or it did not change. Only the first is what the edit
    intended. Out-of-scope probes should keep their top prediction.
    """
    if in_scope:
        if answers_expected:
            return REACHED
        return ELSEWHERE if changed else STUCK
    return BROKEN if changed else KEPT


def is_intended(outcome: str) -> bool:
    """Whether ``outcome`` is what a perfectly scoped edit does."""
    return outcome in INTENDED_OUTCOMES


# -- probabilities of the whole target and of its tokens ----------------------------------------------
@dataclass(frozen=True)
class TokenProbs:
    """P(target | prompt) token by token (teacher-forced): each token given the prompt and the
    target's tokens before it."""

    tokens: tuple[str, ...]
    probs: tuple[float, ...]

    @property
    def whole(self) -> float:
        """P(whole target): the product over its tokens."""
        return math.prod(self.probs) if self.probs else math.nan

    @property
    def geometric_mean(self) -> float:
        """The per-token geometric mean CounterFact compares (exp of the mean log-probability)."""
        if not self.probs:
            return math.nan
        if any(p <= 0 for p in self.probs):
            return 0.0
        return math.exp(sum(math.log(p) for p in self.probs) / len(self.probs))


def token_probs(session: EditSession, prompt: str, target: str) -> TokenProbs:
    """P of each token of ``target`` after ``prompt`` with the session's edits active (routed, so
    inference-wrapper edits are read as they answer)."""
    with session.active():
        route = session.routes([prompt])[0]
        score = score_routes([route], [target])[0]
    tokenizer = route.handle.tokenizer
    tokens = tuple(tokenizer.decode([int(i)]).strip() or repr(tokenizer.decode([int(i)])) for i in score.token_ids)
    return TokenProbs(tokens, tuple(float(v) for v in score.logprobs.exp().tolist()))


def format_prob(value: float | None) -> str:
    """A probability that never reads 0.000 when it is not zero: 0.431, 0.0042, 3.1e-07."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = float(value)
    if value == 0:
        return "0"
    if value >= 0.01:
        return f"{value:.3f}"
    if value >= 0.0001:
        return f"{value:.4f}"
    return f"{value:.1e}"


# -- what the model says --------------------------------------------------------------------------------
def continuations(session: EditSession, prompts: Sequence[str], max_new_tokens: int = GENERATION_TOKENS) -> list[str]:
    """Greedy continuations of ``prompts`` with the session's edits active (text after each prompt)."""
    prompts = list(prompts)
    if not prompts:
        return []
    with session.active():
        return generate_routed(session.routes(prompts), max_new_tokens)


_BREAK = re.compile(r"[.,;:!?\n()\[\]\"]|\s[-–—]\s")
_LEADING = {"the", "a", "an"}
_CLAUSE = {"and", "or", "but", "in", "at", "of", "on", "by", "to", "for", "from", "with", "as", "who", "which",
           "that", "where", "when", "while", "since", "until", "is", "was", "are", "were", "has", "had", "its"}
_MAX_ANSWER_WORDS = 3


def short_answer(continuation: str, known_answers: Sequence[str] = ()) -> str:
    """The answer a greedy ``continuation`` starts with.

    A known answer (e.g. a fact-base object: "United Kingdom", "Bosnia and Herzegovina") the
    continuation starts with wins, longest first; otherwise the words before the first sentence
    break or clause word, without a leading article, at most three words. "" when nothing is left.
    """
    words = re.findall(r"\w[\w'-]*", continuation.casefold())
    best = ""
    for answer in known_answers:
        wanted = re.findall(r"\w[\w'-]*", answer.casefold())
        if wanted and words[: len(wanted)] == wanted and len(answer) > len(best):
            best = answer
    if best:
        return best
    head = _BREAK.split(continuation.strip(), maxsplit=1)[0].split()
    while head and head[0].casefold() in _LEADING:
        head = head[1:]
    kept: list[str] = []
    for word in head:
        if kept and word.casefold() in _CLAUSE:
            break
        kept.append(word)
        if len(kept) == _MAX_ANSWER_WORDS:
            break
    return " ".join(kept).strip(" '\"")


def model_answer(session: EditSession, prompt: str, factbase: FactBase | None = None) -> tuple[str, str]:
    """The model's own answer to ``prompt`` (with the session's edits active) and the greedy
    continuation it was read from."""
    factbase = factbase or load_factbase()
    text = continuations(session, [prompt], ANSWER_TOKENS)[0]
    objects = {f.object for f in factbase.facts}
    return short_answer(text, sorted(objects)), text


@dataclass(frozen=True)
class TrueTarget:
    """Which true target an edit is judged against, and where it came from."""

    request: EditRequest  # with ``target_true`` filled in where one could be found
    source: str  # "typed", "model" or "none"
    continuation: str = ""  # the model's greedy continuation when the model's answer was read

    def describe(self) -> str:
        """One sentence for the page."""
        true = self.request.target_true
        if self.source == "typed":
            return f"True target: **{true}** (typed)."
        if self.source == "model":
            return (f"True target: **{true}** — the model's own answer before the edit (the box was empty); "
                    f"it continued the prompt with “{self.continuation}”.")
        said = f" It continued the prompt with “{self.continuation}”." if self.continuation else ""
        return ("True target: none — the box was empty and the model's own answer could not be told apart from "
                f"the new target, so the probability comparisons (efficacy, paraphrase) have nothing to compare "
                f"against.{said}")


def resolve_true_target(session: EditSession, request: EditRequest, factbase: FactBase | None = None) -> TrueTarget:
    """``request`` with its true target: the typed one, else the model's own answer before the edit.

    Nothing is carried over from another fact: an empty true target is read from the model (with
    the session's earlier edits active). When the model already answers the new target (or says
    nothing usable), the request keeps no true target.
    """
    if request.target_true:
        return TrueTarget(request, "typed")
    answer, text = model_answer(session, request.text, factbase)
    if not answer or answer.casefold() == request.target_new.casefold():
        return TrueTarget(request, "none", text)
    return TrueTarget(EditRequest(request.prompt, request.subject, request.target_new, answer), "model", text)


# -- probes a fact has none of -------------------------------------------------------------------------
def missing_probe_reasons(request: EditRequest, probeset: ProbeSet, factbase: FactBase | None = None
                          ) -> dict[str, str]:
    """Why the probe set of ``request`` has no generality, locality or portability probes (per
    missing kind; empty when every kind is there)."""
    factbase = factbase or load_factbase()
    have = {p.kind for p in probeset.probes}
    missing = [k for k in ("generality", "locality", "portability") if k not in have]
    if not missing:
        return {}
    known = bool(factbase.facts_about(request.subject))
    relation = match_relation(request, factbase)
    reasons: dict[str, str] = {}
    if relation is None:
        why = (f"the fact base has no facts about “{request.subject}”, and the prompt matches none of its "
               f"relations' templates" if not known else "the prompt matches none of the fact base's relations")
        for kind in missing:
            reasons[kind] = why
        return reasons
    name = relation.id.replace("_", " ")
    for kind in missing:
        if kind == "generality":
            reasons[kind] = f"the relation “{name}” has no other templates to paraphrase the prompt with"
        elif kind == "locality":
            reasons[kind] = f"the fact base has no other subject of “{name}” to use as a neighbour"
        else:
            reasons[kind] = (f"the fact base knows no second hop from “{request.target_new}” (nothing about it "
                             f"as a subject of a relation that composes with “{name}”)")
    return reasons


# -- generations of the probes -------------------------------------------------------------------------
#: the probes whose generations say whether the edit "took" in the real world: the edit and its paraphrases
SAYS_KINDS = ("reliability", "generality")


def generated_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a per-probe table (:func:`eval.evaluate.with_generations` columns) whose prompt was
    generated from, with their continuations and whether each says the probe's answer."""
    columns = ["probe_id", "kind", "prompt", "answer", "gen_before", "gen_after", "gen_hit_before", "gen_hit_after"]
    if "gen_after" not in table.columns:
        return pd.DataFrame(columns=columns)
    return table[table["gen_after"].notna()][columns].reset_index(drop=True)


def says_share(table: pd.DataFrame, when: str = "after", kinds: Sequence[str] = SAYS_KINDS) -> float:
    """Share of the generated probes of ``kinds`` whose continuation ``when`` ("before" or "after")
    says the probe's answer (NaN when none was generated)."""
    column = f"gen_hit_{when}"
    if column not in table.columns or not len(table):
        return math.nan
    values = pd.to_numeric(table.loc[table["kind"].isin(kinds), column], errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


# -- the figures beside a tile ---------------------------------------------------------------------------
def _number(metrics: dict[str, float], key: str) -> float:
    value = metrics.get(key)
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def locality_detail(metrics: dict[str, float]) -> str:
    """One or two sentences beside the locality figure (agreement): locality over the neighbours the
    model knew before the edit, and the unrelated facts left unchanged ("" when there is neither).

    Agreement credits a neighbour the model never answered right for keeping its wrong answer;
    :func:`eval.metrics.scope_summary` also reports locality over the known neighbours only.
    """
    parts = []
    total, known = _number(metrics, "n_locality"), _number(metrics, "n_locality_known")
    if not math.isnan(total) and not math.isnan(known):
        total, known = int(total), int(known)
        if known == 0:
            parts.append(f"Locality (known neighbours, n=0): n/a — the model answered none of the {total} "
                         f"neighbour(s) correctly before the edit, so the agreement only says wrong answers stayed "
                         f"wrong.")
        else:
            value = _number(metrics, "locality_known")
            unknown = (f"; the agreement also credits the {total - known} neighbour(s) it never answered right "
                       f"for keeping a wrong answer" if known < total else "")
            parts.append(f"Locality (known neighbours, n={known} of {total}): {value:.0%} — over the neighbours "
                         f"the model answered correctly before the edit{unknown}.")
    unrelated, count = _number(metrics, "unrelated_unchanged"), _number(metrics, "n_unrelated")
    if not math.isnan(unrelated) and not math.isnan(count):
        parts.append(f"Unrelated facts (random other facts) unchanged: {unrelated:.0%} of {int(count)}.")
    return " ".join(parts)


def efficacy_detail(metrics: dict[str, float]) -> str:
    """A sentence beside efficacy when some edit prompt passes it without the model answering the new
    target (efficacy without reliability: the new target beats the true one, the answer is neither);
    "" otherwise."""
    failures = _number(metrics, "n_efficacy_without_reliability")
    if math.isnan(failures) or failures < 1:
        return ""
    success = _number(metrics, "edit_success")
    shown = f"{success:.0%}" if not math.isnan(success) else "n/a"
    return (f"Efficacy without reliability: {int(failures)} edit prompt(s) where the new target beats the true "
            f"one but the model answers neither — failures, so edit success (the greedy answer is the new "
            f"target) is {shown}.")
