"""Probes: the prompts an edit is judged on, and how they are built for a fact.

A :class:`Probe` is a prompt with the answer expected after the edit and its kind:

* ``reliability`` — the edit request itself (should now give the new target);
* ``generality`` — paraphrases of the request (should also give the new target);
* ``locality`` — neighbouring facts (same relation, other subjects) that must keep their answer;
  neighbour and unrelated probes come only from probe-side subjects, never from the training
  memory of CaliNET, T-Patcher or IKE (:func:`editing.storage.factbase.is_memory_subject`);
* ``portability`` — consequences of the edit (2-hop chains through the new object, aliases,
  inverse relations, logical implications) that should follow it;
* ``unrelated`` — facts of other relations about other subjects (must not change).

``contrast`` is the competing answer of CounterFact's probability comparisons: the old answer for
in-scope probes, the edit's new target for locality probes (None where nothing sensible exists).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from editing.core.request import EditRequest
from editing.storage.factbase import FactBase, Relation, is_memory_subject, load_factbase

PROBE_KINDS = ("reliability", "generality", "locality", "portability", "unrelated")
IN_SCOPE_KINDS = ("reliability", "generality", "portability")
PORTABILITY_SUBKINDS = ("multi-hop", "subject-alias", "inverse", "logical", "reasoning")
PROBE_SOURCES = ("factbase", "dataset", "user")

#: short id prefixes per kind ("gen-2" is the third generality probe)
KIND_PREFIX = {"reliability": "rel", "generality": "gen", "locality": "loc", "portability": "port",
               "unrelated": "unrel"}


@dataclass
class Probe:
    """One prompt an edit is judged on (``prompt`` has the subject filled in)."""

    id: str
    prompt: str
    answer: str
    kind: str
    subkind: str | None = None
    subject: str | None = None
    request_index: int = 0
    source: str = "factbase"
    contrast: str | None = None  # competing answer for CounterFact's P(answer) > P(contrast)
    aliases: tuple[str, ...] = ()  # other accepted spellings of the answer (kept for reference)

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"Unknown probe kind {self.kind!r}; choose one of {', '.join(PROBE_KINDS)}.")
        if not self.prompt.strip() or not self.answer.strip():
            raise ValueError("A probe needs a prompt and an answer.")
        if self.source not in PROBE_SOURCES:
            raise ValueError(f"Unknown probe source {self.source!r}; choose one of {', '.join(PROBE_SOURCES)}.")
        self.aliases = tuple(self.aliases)

    @property
    def in_scope(self) -> bool:
        """Whether a good edit should change this probe's answer."""
        return self.kind in IN_SCOPE_KINDS

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Probe:
        """The probe :meth:`to_dict` describes."""
        return cls(**{**data, "aliases": tuple(data.get("aliases", ()))})


@dataclass
class ProbeSet:
    """The probes of one edit (or of several edits applied together)."""

    requests: list[EditRequest]
    probes: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        ids = [p.id for p in self.probes]
        if len(ids) != len(set(ids)):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"Probe ids must be unique within a probe set; repeated: {duplicates}.")

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self):
        return iter(self.probes)

    def by_kind(self, kind: str) -> list[Probe]:
        """The probes of one kind, in order."""
        if kind not in PROBE_KINDS:
            raise ValueError(f"Unknown probe kind {kind!r}; choose one of {', '.join(PROBE_KINDS)}.")
        return [p for p in self.probes if p.kind == kind]

    def get(self, probe_id: str) -> Probe:
        """The probe with that id (KeyError if none)."""
        for probe in self.probes:
            if probe.id == probe_id:
                return probe
        raise KeyError(f"No probe {probe_id!r} in this probe set.")

    def add(self, prompt: str, answer: str, kind: str, subkind: str | None = None) -> Probe:
        """Add a probe a person typed; it gets a fresh id and source ``"user"``."""
        prompt, answer = " ".join(prompt.split()), " ".join(answer.split())
        subject = next((r.subject for r in self.requests if r.subject in prompt), None)
        request_index = next((i for i, r in enumerate(self.requests) if r.subject == subject), 0)
        contrast = None
        if self.requests:
            request = self.requests[request_index]
            # the same competing answers the fact base gives its own probes of that kind
            contrast = request.target_new if kind == "locality" else \
                request.target_true if kind in ("reliability", "generality") else None
            if contrast is not None and contrast == answer:
                contrast = None
        probe = Probe(id=self._fresh_id("user"), prompt=prompt, answer=answer, kind=kind, subkind=subkind,
                      subject=subject, request_index=request_index, source="user", contrast=contrast)
        self.probes.append(probe)
        return probe

    def remove(self, probe_id: str) -> None:
        """Drop the probe with that id (nothing happens if there is none)."""
        self.probes = [p for p in self.probes if p.id != probe_id]

    def _fresh_id(self, prefix: str) -> str:
        taken = {p.id for p in self.probes}
        index = sum(1 for p in self.probes if p.id.startswith(prefix + "-"))
        while f"{prefix}-{index}" in taken:
            index += 1
        return f"{prefix}-{index}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly requests and probes."""
        return {"requests": [r.to_dict() for r in self.requests], "probes": [p.to_dict() for p in self.probes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeSet:
        """The probe set :meth:`to_dict` describes."""
        return cls([EditRequest.from_dict(r) for r in data["requests"]],
                   [Probe.from_dict(p) for p in data["probes"]])


# ---------------------------------------------------------------------------------------------
# Building probes from the fact base
# ---------------------------------------------------------------------------------------------
_WORD = re.compile(r"[\w'-]+")


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text.replace("{}", " "))}


def _similarity(a: str, b: str) -> float:
    """Jaccard overlap of the words of two templates (how a typed prompt is matched to a relation)."""
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def _norm_template(template: str) -> str:
    return " ".join(template.lower().split()).rstrip(" .:?")


def match_relation(request: EditRequest, factbase: FactBase, min_similarity: float = 0.5) -> Relation | None:
    """The fact-base relation a request is about.

    An exact template match wins; otherwise the relation of the subject's own facts whose
    templates are most similar to the prompt; for unknown subjects, the most similar relation
    overall when it is clearly similar (``min_similarity``), else None.
    """
    wanted = _norm_template(request.prompt)
    for relation in factbase.relations.values():
        if any(_norm_template(t) == wanted for t in relation.train_templates + relation.heldout_templates):
            return relation
    own = {f.relation for f in factbase.facts_about(request.subject)}
    candidates = [r for r in factbase.relations.values() if r.id in own] or list(factbase.relations.values())

    def best(relation: Relation) -> float:
        return max(_similarity(request.prompt, t) for t in relation.train_templates + relation.heldout_templates)

    scored = sorted(candidates, key=best, reverse=True)
    if not scored:
        return None
    if own:
        return scored[0]  # the subject is known: one of its own relations is the best guess
    return scored[0] if best(scored[0]) >= min_similarity else None


def probes_for_request(request: EditRequest, factbase: FactBase | None = None, n_neighbours: int = 5,
                       n_unrelated: int = 5, seed: int = 0, n_paraphrases: int = 3,
                       n_relation_specificity: int = 0) -> ProbeSet:
    """Probes of one edit request, built from the bundled fact base and its templates.

    Reliability is the request itself. When the request's relation is known (its prompt is one
    of a relation's templates, or the subject is in the fact base): generality fills the
    relation's held-out templates (then other training templates) with the subject; locality asks
    the same prompt about other subjects of the relation (their own true objects; subjects whose
    object is the new target are skipped, since their answer would not tell an edit apart);
    portability asks 2-hop chains through the NEW object ("Eiffel Tower → Italy" asks for the
    capital of the country the Eiffel Tower is in: Rome). Unrelated probes are facts of other
    relations about other subjects. ``n_relation_specificity`` adds locality probes about the
    subject's other relations (KnowEdit's relation specificity). Never raises on unknown facts.

    Neighbour and unrelated probes are drawn only from the probe side of the fact base's fixed
    split of subjects (:func:`editing.storage.factbase.is_memory_subject`): methods that train to keep
    facts unchanged (CaliNET, T-Patcher) or show them as demonstrations (IKE) take theirs from the
    other side, so no locality figure is measured on facts a method was trained to keep.
    """
    factbase = factbase or load_factbase()
    rng = random.Random(f"{seed}|{request.subject}|{request.prompt}|{request.target_new}")
    relation = match_relation(request, factbase)
    true_object = factbase.object_of(request.subject, relation.id) if relation else None
    old_answer = request.target_true or true_object
    if old_answer == request.target_new:
        old_answer = None
    probes: list[Probe] = [Probe("rel-0", request.text, request.target_new, "reliability",
                                 subject=request.subject, contrast=old_answer)]
    if relation is not None:
        probes += _generality(request, relation, n_paraphrases, old_answer)
        probes += _neighbours(request, relation, factbase, n_neighbours, rng, old_answer)
        probes += _portability(request, relation, factbase)
    if n_relation_specificity:
        probes += _relation_specificity(request, relation, factbase, n_relation_specificity, rng)
    probes += _unrelated(request, relation, factbase, n_unrelated, rng)
    return ProbeSet([request], probes)


def _generality(request: EditRequest, relation: Relation, n: int, old_answer: str | None) -> list[Probe]:
    own = _norm_template(request.prompt)
    ordered = [t for t in dict.fromkeys(relation.heldout_templates + relation.train_templates)
               if _norm_template(t) != own]
    return [Probe(f"gen-{i}", t.replace("{}", request.subject), request.target_new, "generality",
                  subject=request.subject, contrast=old_answer)
            for i, t in enumerate(ordered[:n])]


def _neighbours(request: EditRequest, relation: Relation, factbase: FactBase, n: int,
                rng: random.Random, old_answer: str | None) -> list[Probe]:
    # probe-side subjects only: the other side is the methods' training memory
    others = [f for f in factbase.facts_of(relation.id)
              if f.subject != request.subject and f.object != request.target_new and not is_memory_subject(f.subject)]
    # CounterFact draws neighbours that share the edited subject's true object (the hardest to
    # keep apart); take those first, then others of the relation.
    sharing = [f for f in others if f.object == old_answer]
    rest = [f for f in others if f.object != old_answer]
    chosen = rng.sample(sharing, min(n, len(sharing)))
    chosen += rng.sample(rest, min(n - len(chosen), len(rest)))
    return [Probe(f"loc-{i}", request.prompt.replace("{}", f.subject), f.object, "locality", subkind="neighbourhood",
                  subject=f.subject, contrast=request.target_new)
            for i, f in enumerate(chosen)]


def _portability(request: EditRequest, relation: Relation, factbase: FactBase) -> list[Probe]:
    """2-hop questions whose first hop is the edited fact, answered through the new object."""
    if factbase.object_of(request.subject, relation.id) is not None:
        chains = [(c.composition, c.answer) for c in factbase.chains(request.subject, first_object=request.target_new)
                  if c.composition.first == relation.id]
    else:  # a subject the fact base does not know: the chain still follows from the new object
        chains = []
        for comp in factbase.compositions:
            answer = factbase.object_of(request.target_new, comp.second) if comp.first == relation.id else None
            if answer is not None:
                chains.append((comp, answer))
    probes = []
    for comp, answer in chains:
        old_bridge = factbase.object_of(request.subject, comp.first)
        old_answer = factbase.object_of(old_bridge, comp.second) if old_bridge else None
        for template in comp.templates:
            probes.append(Probe(f"port-{len(probes)}", template.replace("{}", request.subject), answer,
                                "portability", subkind="multi-hop", subject=request.subject,
                                contrast=old_answer if old_answer != answer else None))
    return probes


def _relation_specificity(request: EditRequest, relation: Relation | None, factbase: FactBase, n: int,
                          rng: random.Random) -> list[Probe]:
    own = [f for f in factbase.facts_about(request.subject) if relation is None or f.relation != relation.id]
    chosen = rng.sample(own, min(n, len(own)))
    return [Probe(f"loc-rs-{i}", factbase.relations[f.relation].train_templates[0].replace("{}", f.subject),
                  f.object, "locality", subkind="relation-specificity", subject=f.subject)
            for i, f in enumerate(chosen)]


def _unrelated(request: EditRequest, relation: Relation | None, factbase: FactBase, n: int,
               rng: random.Random) -> list[Probe]:
    pool = [f for f in factbase.facts  # probe-side subjects only, as for neighbours
            if f.subject != request.subject and (relation is None or f.relation != relation.id)
            and not is_memory_subject(f.subject)]
    chosen = rng.sample(pool, min(n, len(pool)))
    probes = []
    for i, fact in enumerate(chosen):
        templates = factbase.relations[fact.relation].train_templates
        template = templates[rng.randrange(len(templates))]
        probes.append(Probe(f"unrel-{i}", template.replace("{}", fact.subject), fact.object, "unrelated",
                            subject=fact.subject))
    return probes


def probes_for_requests(requests: Sequence[EditRequest], factbase: FactBase | None = None, **kwargs: Any) -> ProbeSet:
    """Probes of several edits applied together (one :func:`probes_for_request` per request)."""
    return merge_probesets([probes_for_request(r, factbase, **kwargs) for r in requests])


def merge_probesets(sets: Iterable[ProbeSet]) -> ProbeSet:
    """One probe set for edits applied together.

    Request indices are renumbered, ids get an ``e<set>-`` prefix when more than one set is
    merged, and out-of-scope probes about a subject that another set's edit changes are dropped
    (:func:`without_conflicts`).
    """
    sets = without_conflicts(list(sets))
    requests = [r for s in sets for r in s.requests]
    if len(sets) == 1:
        return ProbeSet(list(requests), list(sets[0].probes))
    probes: list[Probe] = []
    offset = 0
    for index, probe_set in enumerate(sets):
        for probe in probe_set.probes:
            probes.append(replace(probe, id=f"e{index}-{probe.id}", request_index=probe.request_index + offset))
        offset += len(probe_set.requests)
    return ProbeSet(requests, probes)


def without_conflicts(sets: Sequence[ProbeSet]) -> list[ProbeSet]:
    """The probe sets without out-of-scope probes whose subject another set's edit changes.

    When edits are applied together or in sequence, a neighbour of one edit may be the subject of
    another; its answer may then rightly change, so it no longer measures locality. Probes about a
    set's own subject (KnowEdit's relation specificity) are kept.
    """
    subjects = [{r.subject for r in s.requests} for s in sets]
    out = []
    for index, probe_set in enumerate(sets):
        others = set().union(*(subj for j, subj in enumerate(subjects) if j != index)) - subjects[index]
        kept = [p for p in probe_set.probes if p.in_scope or p.subject is None or p.subject not in others]
        out.append(probe_set if len(kept) == len(probe_set.probes) else ProbeSet(list(probe_set.requests), kept))
    return out
