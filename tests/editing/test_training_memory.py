"""The training memory of CaliNET, T-Patcher, IKE, SERAC, MEND and KE never holds a probe of the
edit being judged.

Locality is scored on neighbour and unrelated probes (:mod:`eval.probes`); a method trained to keep
those very facts unchanged would be scored on its own training data. One rule
(:func:`editing.methods.patching.in_training_memory`) splits the fact base's subjects into a probe side and
a memory side; these tests build the probes as the evaluation does, for several seeds and far more
neighbours than the default, and check that no method's memory touches any of their subjects. The
learned editors train once for all edits, so theirs is also checked against the probes of every
held-out evaluation case (``python -m eval run --data demo``).
"""

from __future__ import annotations

import pytest

import editing.learning.learned as learned
import editing.methods.serac as serac
from editing.core.request import EditRequest
from editing.learning.learned import QUICK_TRAINING
from editing.methods.calinet import CaliNETHParams, kept_prompts
from editing.methods.ike import build_pool
from editing.methods.patching import in_training_memory, statement_inputs
from editing.models.tiny import tiny_model
from editing.storage.factbase import is_memory_subject, load_factbase
from editing.train import edit_records, train_editor
from eval.datasets import factbase_cases
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


class _Caught(Exception):
    """Stops SERAC's trainer once its training data is built."""


def heldout_case_probes() -> tuple[set[str], set[str]]:
    """(subjects, prompts) of every probe of every held-out demo case (``eval run --data demo``,
    two case seeds), and of generous probe sets of the first 20 held-out edits."""
    factbase = load_factbase()
    probes = [p for seed in (0, 1) for case in factbase_cases(factbase, seed=seed) for p in case.probes]
    subjects = {p.subject for p in probes if p.subject is not None}
    for record in edit_records("heldout")[:20]:
        subjects |= probe_subjects(record.request)
    return subjects, {p.prompt for p in probes}


def test_serac_trains_on_no_subject_or_prompt_of_a_held_out_case(monkeypatch, tmp_path):
    """SERAC's classifier and counterfactual model learn every fact their records mention (edits,
    paraphrases, locality facts, hard negatives), once for all edits: none may be about a subject
    that a held-out case edits or probes. Before issue 19 127 of 145 neighbour probes of 30
    held-out cases were about training subjects, and all were routed to the unchanged model."""
    seen: dict[str, list] = {}
    build_examples = serac.scope_examples

    def examples(records, *args, **kwargs):
        seen["records"] = records
        return build_examples(records, *args, **kwargs)

    def stop(_encoder, built, *_rest):
        seen["examples"] = built
        raise _Caught

    monkeypatch.setattr(serac, "scope_examples", examples)
    monkeypatch.setattr(serac, "train_classifier", stop)
    monkeypatch.setattr(serac, "sentence_encoder", lambda *_args: None)  # the classifier never runs
    handle = tiny_model("gpt2")
    with pytest.raises(_Caught):
        serac.train_serac(handle, serac.default_config(handle), tmp_path, lambda _f, _m: None)
    records, built = seen["records"], seen["examples"]
    assert len(records) >= 300 and len(built) == len(records)
    # the counterfactual model trains on the records' edit prompts and paraphrases
    trained_subjects = {r.request.subject for r in records} | {key[0] for e in built for _q, key in e.queries}
    trained_prompts = {q for e in built for q, _key in e.queries} | {e.edit_text for e in built} | \
        {p for r in records for p in r.paraphrases}
    probed_subjects, probed_prompts = heldout_case_probes()
    assert not trained_subjects & probed_subjects
    assert not trained_prompts & probed_prompts
    assert all(in_training_memory(s) for s in trained_subjects)  # the one rule, not a second split


def test_mend_and_ke_keep_unchanged_only_training_memory_facts(monkeypatch, isolated_cache):
    """Locality facts of training records (and the same-relation neighbours the locality term
    may add) are about memory-side subjects of the training split; those of held-out records,
    which the training report scores, about probe-side subjects."""
    factbase = load_factbase()
    subject_of = {factbase.relations[f.relation].train_templates[0].replace("{}", f.subject): f.subject
                  for f in factbase.facts}
    heldout_subjects = {r.request.subject for r in edit_records("heldout")}
    train = edit_records("train")
    kept = {subject_of[prompt] for r in train for prompt, _answer in r.locality}
    assert len(kept) >= 100 and all(in_training_memory(s) for s in kept) and not kept & heldout_subjects
    probed = {subject_of[prompt] for r in edit_records("heldout") for prompt, _answer in r.locality}
    assert probed and not any(is_memory_subject(s) for s in probed)

    neighbours: list[tuple[str, str]] = []
    build_batch = learned.record_batch

    def batch(handle, records, n_paraphrases=2, rows=None):
        neighbours.extend(pair for row in rows or () for pair in row)
        return build_batch(handle, records, n_paraphrases, rows)

    monkeypatch.setattr(learned, "record_batch", batch)
    subjects = {r.request.text: r.request.subject for r in train}
    for method in ("MEND", "KE"):
        neighbours.clear()
        train_editor(tiny_model("gpt2"), method, {**QUICK_TRAINING, "n_neighbours": 2, "steps": 4})
        assert neighbours and all(in_training_memory(subjects[prompt]) for prompt, _answer in neighbours)


def _relation(request: EditRequest) -> str:
    from editing.methods.patching import relation_of

    relation = relation_of(request)
    assert relation is not None
    return relation.id
