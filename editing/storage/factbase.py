"""The bundled fact base (data/factbase.json): relations, templates, facts and 2-hop chains."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from editing.storage.paths import DATA_DIR

FACTBASE_PATH = DATA_DIR / "factbase.json"
CORPUS_PATH = DATA_DIR / "corpus.txt"


@dataclass(frozen=True)
class Relation:
    id: str
    subject_type: str
    object_type: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    question: str


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class Composition:
    """A 2-hop relation: ``second(first(subject))``, asked with its own templates."""

    id: str
    first: str
    second: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Chain:
    """One 2-hop fact: subject -first-> bridge -second-> answer."""

    composition: Composition
    subject: str
    bridge: str
    answer: str


class FactBase:
    """Read-only access to the fact base."""

    def __init__(self, relations: dict[str, Relation], facts: list[Fact],
                 compositions: list[Composition], digest: str) -> None:
        self.relations = relations
        self.facts = facts
        self.compositions = compositions
        self.digest = digest

    @cached_property
    def _index(self) -> dict[tuple[str, str], str]:
        return {(f.subject, f.relation): f.object for f in self.facts}

    def object_of(self, subject: str, relation: str) -> str | None:
        return self._index.get((subject, relation))

    @cached_property
    def _by_relation(self) -> dict[str, list[Fact]]:
        grouped: dict[str, list[Fact]] = {}
        for fact in self.facts:
            grouped.setdefault(fact.relation, []).append(fact)
        return grouped

    def facts_of(self, relation: str) -> list[Fact]:
        """The relation's facts, in fact-base order."""
        return list(self._by_relation.get(relation, []))

    def objects_of(self, relation: str) -> list[str]:
        """The relation's distinct objects, in the order they first occur."""
        return list(dict.fromkeys(f.object for f in self._by_relation.get(relation, [])))

    def facts_about(self, subject: str) -> list[Fact]:
        return [f for f in self.facts if f.subject == subject]

    @cached_property
    def subjects(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.facts))

    def relations_for_type(self, subject_type: str) -> list[Relation]:
        return [r for r in self.relations.values() if r.subject_type == subject_type]

    def chains(self, subject: str, first_object: str | None = None) -> list[Chain]:
        """2-hop chains starting at ``subject``; with ``first_object`` the first hop is taken
        to land there instead (what the chain becomes after an edit)."""
        out = []
        for comp in self.compositions:
            bridge = first_object if first_object is not None else self.object_of(subject, comp.first)
            if bridge is None or (first_object is not None and self.object_of(subject, comp.first) is None):
                continue
            answer = self.object_of(bridge, comp.second)
            if answer is not None:
                out.append(Chain(comp, subject, bridge, answer))
        return out


def _load(path: Path) -> FactBase:
    raw = path.read_bytes()
    data = json.loads(raw)
    relations = {
        r["id"]: Relation(r["id"], r["subject_type"], r["object_type"], tuple(r["train_templates"]),
                          tuple(r["heldout_templates"]), r.get("question", ""))
        for r in data["relations"]
    }
    facts = []
    for index, f in enumerate(data["facts"]):
        if f.get("relation") not in relations:
            raise ValueError(f"{path}: fact {index} has unknown relation {f.get('relation')!r}.")
        facts.append(Fact(f["subject"], f["relation"], f["object"]))
    compositions = [Composition(c["id"], c["first"], c["second"], tuple(c["templates"]))
                    for c in data.get("compositions", [])]
    return FactBase(relations, facts, compositions, hashlib.sha256(raw).hexdigest()[:16])


@lru_cache(maxsize=4)
def load_factbase(path: str | Path = FACTBASE_PATH) -> FactBase:
    """The fact base at ``path`` (the bundled one by default), parsed once per process."""
    return _load(Path(path))


def load_corpus(path: str | Path = CORPUS_PATH) -> list[str]:
    """Lines of a plain-text corpus (blank lines dropped)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=1 << 16)
def is_memory_subject(subject: str) -> bool:
    """Whether ``subject`` is on the *training-memory* side of the fixed split of subjects.

    Methods that train to keep facts unchanged or show them as examples (CaliNET's locality term,
    T-Patcher's memory set, IKE's demonstrations; :func:`editing.methods.patching.in_training_memory`) take
    them only from memory subjects, and :mod:`eval.probes` draws neighbour and unrelated probes only
    from the other subjects: no method is scored on a fact it was trained to keep, whatever the
    probe seed or count. The split is a stable hash of the name (Python's ``hash()`` is salted per
    process), so it also holds across fact bases: the real-world fact sources of pretrained models
    share subjects with the bundled one. About half the subjects (267 of 517 bundled) are memory.
    """
    return int(hashlib.sha256(f"memory|{subject}".encode()).hexdigest(), 16) % 2 == 0
