"""SERAC's training data: the texts its parts read, the scope classifier's examples and the
counterfactual model's examples, all built from edit records of the training memory.

Data only: the classifier network, the training runs and the edit are in
:mod:`editing.methods.serac`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from editing.core.request import EditRequest
from editing.methods.patching import in_training_memory, relation_of
from editing.models.tokens import encode, target_ids
from editing.storage.factbase import FactBase, load_factbase
from editing.train import EditRecord, edit_records, load_record_file, record_file_factbase

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle


# ---------------------------------------------------------------------------------------------
# Texts the classifier and the counterfactual model read
# ---------------------------------------------------------------------------------------------
def classifier_text(request: EditRequest) -> str:
    """What the scope classifier compares queries with: the edit's filled prompt. As in the
    reference implementation for decoder models, the label is left out of the classifier input."""
    return request.text


def edit_statement(request: EditRequest) -> str:
    """The context the counterfactual model reads before a query: the edit as a sentence."""
    return f"{request.text} {request.target_new} ."


def counterfactual_prompt(request: EditRequest, query: str) -> str:
    return f"{edit_statement(request)} {query}"


# ---------------------------------------------------------------------------------------------
# Scope classifier examples
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScopeExample:
    """One edit with the queries it must cover and the queries it must leave alone.

    Each query carries its fact key (subject, relation), which decides in-scope-ness for every
    edit of a batch, not only its own.
    """

    edit_text: str
    key: tuple[str, str]
    queries: tuple[tuple[str, tuple[str, str]], ...]


def _template_relations(factbase: FactBase) -> dict[str, str]:
    out = {}
    for rel in factbase.relations.values():
        for template in rel.train_templates + rel.heldout_templates:
            out[template] = rel.id
    return out


def scope_examples(records: list[EditRecord], factbase: FactBase, seed: int,
                   hard_negatives: int = 2) -> list[ScopeExample]:
    """Classifier training data: per record its positives (edit prompt, paraphrases) and negatives.

    Besides the records' locality prompts, ``hard_negatives`` same-relation prompts about other
    subjects and as many prompts about the same subject under other relations are added: an
    embedding of "The capital of France is" lies close to both, and both must stay out of scope.
    Negatives use only subjects of ``records``, so held-out subjects stay unseen.
    """
    rng = random.Random(seed)
    by_template = _template_relations(factbase)
    # Locality prompts are facts filled into a relation's first training template.
    filled_keys = {factbase.relations[f.relation].train_templates[0].replace("{}", f.subject): (f.subject, f.relation)
                   for f in factbase.facts}
    subjects = {r.request.subject for r in records}
    facts = [f for f in factbase.facts if f.subject in subjects]
    by_relation: dict[str, list] = {}
    by_subject: dict[str, list] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
        by_subject.setdefault(fact.subject, []).append(fact)

    def filled(fact) -> tuple[str, tuple[str, str]]:
        template = rng.choice(factbase.relations[fact.relation].train_templates)
        return template.replace("{}", fact.subject), (fact.subject, fact.relation)

    examples = []
    for record in records:
        request = record.request
        relation = by_template.get(request.prompt)
        if relation is None:
            continue
        key = (request.subject, relation)
        queries = [(request.text, key), *((p, key) for p in record.paraphrases)]
        for prompt, _answer in record.locality:
            queries.append((prompt, filled_keys.get(prompt, ("", ""))))
        neighbours = [f for f in by_relation.get(relation, []) if f.subject != request.subject]
        siblings = [f for f in by_subject.get(request.subject, []) if f.relation != relation]
        for pool in (neighbours, siblings):
            for fact in rng.sample(pool, min(hard_negatives, len(pool))):
                queries.append(filled(fact))
        examples.append(ScopeExample(classifier_text(request), key, tuple(queries)))
    return examples


# ---------------------------------------------------------------------------------------------
# The records SERAC trains on
# ---------------------------------------------------------------------------------------------
def training_records(config: dict[str, Any], split: str = "train") -> list[EditRecord]:
    """The edit records SERAC trains on (``train``) or is checked on (``heldout``).

    From a record file (``config["data"]``): that file's split. From the bundled fact base:
    training-split edits of training-memory subjects only
    (:func:`editing.methods.patching.in_training_memory`), the first ``n_records`` of them (0: all).

    The classifier learns every fact these records mention (edits, paraphrases, locality facts,
    hard negatives) as in or out of some edit's scope; had it seen the probe-side subjects, where
    :mod:`eval.probes` draws neighbours and unrelated facts, its out-of-scope figures would be
    measured on its training data (before: 127 of 145 neighbour probes of 30 held-out cases were
    about training subjects). Held-out subjects are in no training record either. A record file
    is the caller's promise of the same (``python -m eval.realfacts --training-records --exclude``
    writes one clear of an evaluation's subjects).
    """
    seed, data = int(config["seed"]), config.get("data") or ""
    if data:
        records = load_record_file(data, split)
    elif split == "heldout":
        records = edit_records("heldout", seed=seed)
    else:
        records = [r for r in edit_records("train", seed=seed) if in_training_memory(r.request.subject)]
    n = int(config.get("n_records") or 0)
    return records[:n] if n > 0 and split == "train" else records


def training_factbase(config: dict[str, Any]) -> FactBase:
    """Where SERAC's hard negatives and alternative targets come from: the record file's implied
    fact base (:func:`editing.train.record_file_factbase`) or the bundled one."""
    data = config.get("data") or ""
    return record_file_factbase(data) if data else load_factbase()


# ---------------------------------------------------------------------------------------------
# Counterfactual model examples
# ---------------------------------------------------------------------------------------------
def counterfactual_examples(handle: ModelHandle, records: list[EditRecord], factbase: FactBase, seed: int,
                            targets_per_query: int = 1) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) of ``"{edit statement} {in-scope query}" → new target``.

    With ``targets_per_query`` > 1 each (edit, query) pair is repeated with other new targets of the
    same relation. Without it the model can get by memorising the training edits' targets and then
    ignores the context on unseen edits; with it, only reading the edit from the context works.
    """
    rng = random.Random(f"{seed}-targets")
    tok = handle.tokenizer
    out = []
    for record in records:
        request = record.request
        relation = relation_of(request, factbase)
        # Compared as EditRequest compares targets: a record file may spell one object two ways ("China", "china").
        taken = {request.target_new.casefold(), (request.target_true or "").casefold()}
        candidates = [o for o in (factbase.objects_of(relation.id) if relation else []) if o.casefold() not in taken]
        targets = [request.target_new, *rng.sample(candidates, min(targets_per_query - 1, len(candidates)))]
        for target in targets:
            variant = EditRequest(request.prompt, request.subject, target, request.target_true)
            for query in (request.text, *record.paraphrases):
                prompt = counterfactual_prompt(variant, query)
                ids, tgt = encode(tok, prompt), target_ids(tok, prompt, target)
                if len(ids) + len(tgt) <= handle.max_length:
                    out.append((ids, tgt))
    return out
