"""Training data of the gradient-based editors (MEND, KE): the seeded batch order and the
tokenised batches of edit records (edit rows, equivalence and locality probes).

Data only: the networks live in the method modules, the shared math in :mod:`editing.learning.learned`
and the loop in :mod:`editing.learning.training`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editing.learning.targets import TargetBatch, target_batch

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle
    from editing.train import EditRecord


def batch_indices(n_items: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Record indices of training step ``step``: epochs of seeded permutations, so a resumed
    run sees exactly the batches an uninterrupted one would."""
    out = []
    position = step * batch_size
    for offset in range(batch_size):
        epoch, index = divmod(position + offset, n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[index]))
    return out


@dataclass
class RecordBatch:
    """Everything a training step needs for a batch of edit records.

    ``probes`` holds the equivalence rows (each edit prompt and its paraphrases, with the new
    target) followed by the locality rows (unrelated prompts with their answers), so one
    forward pass scores both; ``example`` says which record each probe row belongs to.
    """

    edit: TargetBatch  # each record's edit prompt with its new target
    probes: TargetBatch
    example: torch.Tensor
    n_outer: int  # the first n_outer probe rows are equivalence rows, the rest locality rows
    local_pre_logits: torch.Tensor  # the unedited model's logits on the locality rows


def neighbour_facts(records: Sequence[EditRecord], per_record: int,
                    pool: Sequence[EditRecord] | None = None) -> list[tuple[tuple[str, str], ...]]:
    """For each record, up to ``per_record`` facts of other subjects asked with the same prompt
    template (so of the same relation: CounterFact's "neighbourhood"), as (prompt, true answer).

    They are taken from ``pool`` (default: ``records``) in order, starting after the record
    itself (records outside the pool start one fact further than the previous such record of
    their template), so the choice is deterministic. An edit should leave them alone; random
    unrelated facts alone do not teach an editor that (MEND then moved "The capital of Spain is"
    along with an edit of France's capital). Training passes the training memory as ``pool``.
    """
    pool = records if pool is None else pool
    by_template: dict[str, list[EditRecord]] = {}
    for record in pool:
        if record.request.target_true:
            by_template.setdefault(record.request.prompt, []).append(record)
    outside_pool: dict[str, int] = {}  # records of each template seen that are not in the pool
    out = []
    for record in records:
        group = by_template.get(record.request.prompt, [])
        start = next((i + 1 for i, other in enumerate(group) if other is record), None)
        if start is None:  # spread such records over the group instead of all taking its first facts
            start = outside_pool.get(record.request.prompt, 0)
            outside_pool[record.request.prompt] = start + 1
        chosen: list[tuple[str, str]] = []
        for offset in range(len(group)):
            other = group[(start + offset) % len(group)].request
            if other.subject != record.request.subject and len(chosen) < per_record:
                chosen.append((other.text, str(other.target_true)))
        out.append(tuple(chosen))
    return out


def record_batch(handle: ModelHandle, records: Sequence[EditRecord], n_paraphrases: int = 2,
                 neighbours: Sequence[Sequence[tuple[str, str]]] | None = None) -> RecordBatch:
    """Build the edit batch and the probe batch (equivalence, then locality rows: each record's
    locality facts and its ``neighbours``, see :func:`neighbour_facts`)."""
    edit_pairs, outer_pairs, outer_rows, local_pairs, local_rows = [], [], [], [], []
    for index, record in enumerate(records):
        request = record.request
        edit_pairs.append((request.text, request.target_new))
        for prompt in (request.text, *record.paraphrases[:n_paraphrases]):
            outer_pairs.append((prompt, request.target_new))
            outer_rows.append(index)
        for prompt, answer in (*record.locality, *(neighbours[index] if neighbours else ())):
            local_pairs.append((prompt, answer))
            local_rows.append(index)
    probes = target_batch(handle, outer_pairs + local_pairs)
    n_outer = len(outer_pairs)
    with torch.no_grad():
        local_pre = handle.model(**probes.rows(slice(n_outer, None)).model_inputs()).logits.float()
    return RecordBatch(edit=target_batch(handle, edit_pairs), probes=probes,
                       example=torch.tensor(outer_rows + local_rows), n_outer=n_outer, local_pre_logits=local_pre)
