"""The training memory of CaliNET, T-Patcher and IKE never holds a probe of the edit being judged.

Locality is scored on neighbour and unrelated probes (:mod:`eval.probes`); a method trained to keep
those very facts unchanged would be scored on its own training data. One rule
(:func:`editing.patching.in_training_memory`) splits the fact base's subjects into a probe side and
a memory side; these tests build the probes as the evaluation does, for several seeds and far more
neighbours than the default, and check that no method's memory touches any of their subjects.
"""

from __future__ import annotations

import pytest

from editing.factbase import is_memory_subject, load_factbase
from editing.methods.calinet import CaliNETHParams, kept_prompts
from editing.methods.ike import build_pool
from editing.patching import in_training_memory, statement_inputs
from editing.request import EditRequest
from editing.tiny import tiny_model
from eval.probes import probes_for_request

REQUESTS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France"),
    EditRequest("{} is a citizen of", "Victor Hugo", "Italy", "France"),
    EditRequest("{} is a city in", "Lyon", "Spain", "France"),
]


def probe_subjects(request: EditRequest) -> set[str]:
    """Every subject any probe of ``request`` is about, over seeds and generous probe counts."""
    subjects = {request.subject}  # reliability, generality, portability, relation specificity
    for seed in range(4):
        probes = probes_for_request(request, seed=seed, n_neighbours=40, n_unrelated=60, n_relation_specificity=3)
        subjects |= {p.subject for p in probes if p.subject is not None}
    return subjects


def prompts_about(subjects: set[str]) -> set[str]:
    """Every template of the fact base filled with each of ``subjects``."""
    factbase = load_factbase()
    templates = {t for r in factbase.relations.values() for t in r.train_templates + r.heldout_templates}
    return {t.replace("{}", s) for s in subjects for t in templates}


def test_the_split_is_stable_and_leaves_both_sides_of_every_relation_populated():
    factbase = load_factbase()
    for relation in factbase.relations:
        sides = [is_memory_subject(f.subject) for f in factbase.facts_of(relation)]
        assert sum(sides) >= 20 and len(sides) - sum(sides) >= 20, relation
    assert is_memory_subject("Louvre Museum") is False  # fixed by the name's hash, not per process
    assert not in_training_memory("France", REQUESTS) and not in_training_memory("Louvre Museum")


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.subject)
def test_calinet_locality_term_trains_on_no_probe_of_the_edit(request_):
    handle = tiny_model("gpt2")
    groups = kept_prompts(handle, [request_], CaliNETHParams.for_model(handle))
    kept = set(groups["locality"])
    assert len(kept) >= 200
    probes = probe_subjects(request_)
    assert not kept & prompts_about(probes)
    # the same-relation half is still there (the neighbours a batch most easily drags along), just
    # about other subjects than the ones locality is scored on
    factbase = load_factbase()
    relation = _relation(request_)
    same_relation = {t.replace("{}", f.subject) for f in factbase.facts_of(relation)
                     for t in factbase.relations[relation].train_templates}
    assert len(kept & same_relation) >= 25


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.subject)
def test_tpatcher_memory_holds_no_probe_of_the_edit(request_):
    handle = tiny_model("gpt2")
    statements = statement_inputs(handle, handle.n_layers - 1, n_facts=450, with_corpus=True)
    kept = statements.kept_for([request_])
    subjects = {s for stated, keep in zip(statements.facts, kept, strict=True) if keep for s, _rel in stated}
    assert sum(kept) >= 300 and not subjects & probe_subjects(request_)
    tokens = statements.for_requests([request_])
    assert tokens.shape[0] == sum(n for n, keep in zip(statements.token_counts, kept, strict=True) if keep)


def test_ike_demonstrations_state_no_probe_of_an_edit():
    """Pool facts and their retain neighbours are all memory-side: a retain demonstration never
    states the true answer of a neighbour or unrelated probe."""
    pool = build_pool(load_factbase())
    assert len(pool) >= 300
    assert all(is_memory_subject(p.subject) for p in pool)
    assert all(is_memory_subject(subject) for p in pool for subject, _prompt, _answer in p.neighbours)
    for request in REQUESTS:
        probes = probe_subjects(request) - {request.subject}
        assert not any(p.subject in probes for p in pool)


def _relation(request: EditRequest) -> str:
    from editing.patching import relation_of

    relation = relation_of(request)
    assert relation is not None
    return relation.id
