"""Shared machinery of the additional-parameter editors (T-Patcher, CaliNET, GRACE).

These methods never change a weight of the model: they attach extra neurons or memories to one
module with a forward hook (:class:`~editing.core.edit.ModulePatch`). What they share lives here:

* :func:`ffn_activation` — the FFN's own activation function, so added neurons behave like the
  model's own neurons (T-Patcher, CaliNET);
* :func:`add_to_output` — a forward hook that adds ``fn(module input)`` to the module's output;
* :func:`last_block_readout` — logits as a function of what is added to the last block's FFN
  output, so training a patch there needs no pass through the blocks per step;
* :func:`module_inputs` — a module's input at every real (non-pad) token, or at the last token,
  of some texts (T-Patcher's memory of earlier edits, GRACE's keys and distance scale);
* :func:`in_training_memory` — which subjects' facts a method may train on (or show) to keep them
  unchanged: the memory side of the fact base's fixed split, never an edited subject, so the
  probes :mod:`eval.probes` builds for an edit are never in a method's memory (CaliNET's locality
  term, T-Patcher's memory set, IKE's demonstrations);
* :func:`statement_inputs` — the FFN input at every token of training-memory statements (and
  corpus lines), T-Patcher's memory of "previously seen" data, cached while the edits that could
  change it stay the same;
* :func:`retained_facts` — facts of the bundled fact base to keep unchanged (CaliNET's locality
  term; GRACE's distance scale, which trains nothing, may use any fact);
* :func:`relation_of`, :func:`fact_key` and :func:`training_prompts` — which fact-base relation
  (and so which fact) an edit is about, and the templates CaliNET trains a fact on.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.activations import ACT2FN

from editing.core.edit import Edit, handle_stack
from editing.core.hooks import at_positions, capture, forward_until
from editing.core.request import EditRequest
from editing.models.tokens import encode, pad_batch, pad_id
from editing.storage.factbase import FactBase, Relation, is_memory_subject, load_corpus, load_factbase

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

ForwardHook = Callable[[torch.nn.Module, tuple, object], object]


def ffn_activation(handle: ModelHandle) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function of the model's FFN (GELU for GPT-2/GPT-J/NeoX, SiLU for LLaMA)."""
    config = handle.model.config
    name = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None) or "gelu"
    return ACT2FN[name]


def ffn_is_gated(handle: ModelHandle) -> bool:
    """True for gated FFNs (LLaMA-style ``down(act(gate x) * up x)``)."""
    return len(handle.arch.mlp_in) > 1


def add_to_output(fn: Callable[[torch.Tensor], torch.Tensor]) -> ForwardHook:
    """A forward hook returning ``output + fn(first input)`` (tuple outputs keep their tail)."""
    def hook(_module: torch.nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            return (output[0] + fn(args[0]).to(output[0].dtype), *output[1:])
        return output + fn(args[0]).to(output.dtype)

    return hook


@dataclass
class LastBlockReadout:
    """Logits of a batch as a function of a change to the last block's FFN output.

    In every supported family the last block's output is a sum in which the FFN output is one term
    (``x + attn + ffn`` or ``x + ffn``), and only the final norm and the LM head follow. Adding
    ``delta`` to that FFN output therefore gives ``lm_head(final_norm(block_output + delta))``,
    exactly, without running the blocks again — the inner loop of every patch trained there.
    """

    handle: ModelHandle
    block_output: torch.Tensor  # (rows, seq, d_model), the unchanged last block's output

    def logits(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits after adding ``delta`` (broadcastable to the block output) to the FFN output."""
        hidden = self.block_output if delta is None else self.block_output + delta.to(self.block_output.dtype)
        norm = self.handle.module(self.handle.arch.final_norm)
        return self.handle.module(self.handle.arch.lm_head)(norm(hidden))

    def at(self, mask: torch.Tensor) -> LastBlockReadout:
        """The readout of the positions where ``mask`` (rows, seq) is True, flattened to ``(n, d)``
        (norm and head act per position, so positions can be read alone)."""
        return LastBlockReadout(self.handle, self.block_output[mask.to(self.block_output.device)])


@torch.no_grad()
def last_block_readout(handle: ModelHandle, model_inputs: dict[str, torch.Tensor]) -> LastBlockReadout:
    """Run the model once on ``model_inputs`` and keep what :class:`LastBlockReadout` needs.

    Wrap the call in :func:`editing.core.hooks.capture` to record other activations of the same pass.
    """
    name = handle.arch.block_name(handle.n_layers - 1)
    with capture(handle.model, [name]) as store:
        handle.model(**model_inputs)
    return LastBlockReadout(handle, store[name])


@torch.no_grad()
def module_inputs(handle: ModelHandle, module_name: str, texts: Sequence[str], last_only: bool = False,
                  batch_size: int = 64) -> torch.Tensor:
    """float32 inputs of ``module_name``: ``(n_tokens, d)`` at every real token of ``texts``, or
    ``(n_texts, d)`` at each text's last token with ``last_only``.

    The forward pass stops after the module (nothing later is needed). On the module's device.
    """
    tok, device = handle.tokenizer, handle.module_device(module_name)
    rows: list[torch.Tensor] = []
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        seqs = [encode(tok, text)[: handle.max_length] for text in texts[start: start + batch_size]]
        batch = pad_batch(seqs, pad_id(tok), handle.device)
        with capture(handle.model, [module_name], inputs=True) as store:
            forward_until(handle.model, module_name, **batch.model_inputs())
        # an input may still be on the previous block's device (a device_map moves it only inside
        # the module): pick the tokens where it is, then move only them
        inputs = store[module_name]
        if last_only:
            picked = at_positions(inputs, torch.arange(len(seqs)), torch.tensor([n - 1 for n in batch.lengths]))
        else:
            picked = inputs[batch.attention_mask.to(inputs.device).bool()]
        rows.append(picked.to(device).float())
    return torch.cat(rows)


def edits_changing_mlp_input(handle: ModelHandle, layer: int) -> tuple[Edit, ...]:
    """The applied edits that may change the FFN input of block ``layer``.

    A patch on the FFN *output* of block ``c`` (edits that declare ``patched_layers``) only changes
    what blocks after ``c`` read, so patches at ``layer`` or above leave it alone; every other edit
    counts.
    """
    return tuple(edit for edit in handle_stack(handle)
                 if not all(int(c) >= layer for c in getattr(edit, "patched_layers", (-1,))))


@dataclass
class StatementInputs:
    """A module's inputs at every token of some statements, and the facts each statement states.

    A fact is ``(subject, relation id)``; a corpus line states ``(subject, None)`` for each
    fact-base subject it mentions, as its relation is unknown.
    """

    inputs: torch.Tensor  # (n_tokens, d) float32, statement after statement
    token_counts: list[int]  # tokens of each statement
    facts: list[frozenset[tuple[str, str | None]]]
    texts: list[str] = field(default_factory=list)  # the statements themselves

    def kept_for(self, requests: Sequence[EditRequest]) -> list[bool]:
        """Per statement: whether a method editing ``requests`` may train on it (every subject it
        states is in the training memory for them, :func:`in_training_memory`)."""
        return [all(in_training_memory(subject, requests) for subject, _relation in stated) for stated in self.facts]

    def for_requests(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        """The inputs at tokens of the statements :meth:`kept_for` keeps."""
        keep = torch.tensor(self.kept_for(requests), dtype=torch.bool)
        mask = keep.repeat_interleave(torch.tensor(self.token_counts))
        return self.inputs[mask.to(self.inputs.device)]


_STATEMENT_CACHE: OrderedDict[tuple, StatementInputs] = OrderedDict()
_STATEMENT_CACHE_SIZE = 4


def statement_inputs(handle: ModelHandle, layer: int, n_facts: int | None = None, seed: int = 0,
                     with_corpus: bool = True) -> StatementInputs:
    """FFN inputs of block ``layer`` at every token of ``n_facts`` training-memory statements (all
    when None; each fact in one training template, chosen from ``seed``, followed by its answer)
    and, ``with_corpus``, of every corpus line that mentions no probe-side subject.

    Only facts of memory subjects (:func:`in_training_memory`) are read: the probe-side subjects
    are where evaluation takes its neighbours and unrelated facts, so a memory drawn from the whole
    fact base would train on the very facts locality is scored on (a sample of 450 of all 1,047
    facts held those of about 43% of the neighbour and unrelated probes). Edited subjects are
    dropped per edit (:meth:`StatementInputs.for_requests`).
    For the demo model this is its own training data (T-Patcher's memory set). The result is cached
    per model, layer and the applied edits that could change it (:func:`edits_changing_mlp_input`),
    so sequential edits that only patch this layer or later ones reuse it.
    """
    key = (handle, layer, n_facts, seed, with_corpus, edits_changing_mlp_input(handle, layer))
    if key in _STATEMENT_CACHE:
        _STATEMENT_CACHE.move_to_end(key)
        return _STATEMENT_CACHE[key]
    factbase = load_factbase()
    rng = random.Random(seed)
    texts: list[str] = []
    stated: list[frozenset[tuple[str, str | None]]] = []
    memory = [f for f in factbase.facts if in_training_memory(f.subject)]
    facts = memory if n_facts is None else rng.sample(memory, min(n_facts, len(memory)))
    for fact in facts:
        templates = factbase.relations[fact.relation].train_templates
        texts.append(f"{templates[rng.randrange(len(templates))].replace('{}', fact.subject)} {fact.object}")
        stated.append(frozenset({(fact.subject, fact.relation)}))
    if with_corpus:
        for line in load_corpus():
            mentioned = frozenset((s, None) for s in factbase.subjects if s in line)
            if all(in_training_memory(s) for s, _relation in mentioned):
                texts.append(line)
                stated.append(mentioned)
    tok = handle.tokenizer
    counts = [min(len(encode(tok, text)), handle.max_length) for text in texts]
    inputs = module_inputs(handle, handle.arch.mlp_name(layer), texts, batch_size=128)
    result = StatementInputs(inputs, counts, stated, texts)
    _STATEMENT_CACHE[key] = result
    while len(_STATEMENT_CACHE) > _STATEMENT_CACHE_SIZE:
        _STATEMENT_CACHE.popitem(last=False)
    return result


def in_training_memory(subject: str, requests: Sequence[EditRequest] = ()) -> bool:
    """Whether a method editing ``requests`` may train on (or show as a demonstration) a fact about
    ``subject`` to keep it unchanged.

    The one exclusion rule of every method with a memory of retained facts (CaliNET's locality
    term, T-Patcher's memory set, IKE's demonstrations), derived from the requests alone so that no
    probe :mod:`eval.probes` builds for them is ever in the memory:

    * neighbour (locality) and unrelated probes are drawn only from subjects on the probe side of
      the fact base's fixed split (:func:`editing.storage.factbase.is_memory_subject`), whatever the seed
      or count, so the memory takes only memory-side subjects;
    * the reliability, paraphrase (generality), portability and relation-specificity probes are
      all about an edited subject, so no fact about an edited subject is in the memory.
    """
    return is_memory_subject(subject) and all(subject != r.subject for r in requests)


def retained_facts(requests: Sequence[EditRequest] | None = None, n: int = 200, seed: int = 0,
                   factbase: FactBase | None = None,
                   relations: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``n`` (filled prompt, true answer) pairs of the fact base (only of ``relations`` when given).

    With ``requests`` only facts a method editing them may train on (:func:`in_training_memory`):
    CaliNET's locality term. None: any fact (GRACE's distance scale, which trains on nothing).
    Each fact is asked with one of its relation's training templates, chosen deterministically
    from ``seed``.
    """
    factbase = factbase or load_factbase()
    rng = random.Random(seed)
    candidates = [f for f in factbase.facts if (requests is None or in_training_memory(f.subject, requests))
                  and (relations is None or f.relation in relations)]
    chosen = rng.sample(candidates, min(n, len(candidates)))
    pairs = []
    for fact in chosen:
        templates = factbase.relations[fact.relation].train_templates
        pairs.append((templates[rng.randrange(len(templates))].replace("{}", fact.subject), fact.object))
    return pairs


def relation_of(request: EditRequest, factbase: FactBase | None = None) -> Relation | None:
    """The fact-base relation an edit request asks about, or None when it is not one of them.

    The prompt is matched against every relation's templates; failing that, a known
    ``(subject, target_true)`` fact names the relation.
    """
    factbase = factbase or load_factbase()
    for relation in factbase.relations.values():
        if request.prompt in relation.train_templates or request.prompt in relation.heldout_templates:
            return relation
    if request.target_true is not None:
        for fact in factbase.facts_about(request.subject):
            if fact.object == request.target_true:
                return factbase.relations[fact.relation]
    return None


def fact_key(request: EditRequest, factbase: FactBase | None = None) -> tuple[str, str | None]:
    """``(subject, relation id)`` of the fact a request edits (relation None when unknown): two
    requests with the same key edit the same fact."""
    relation = relation_of(request, factbase)
    return request.subject, None if relation is None else relation.id


def training_prompts(request: EditRequest, n_templates: int, seed: int = 0,
                     factbase: FactBase | None = None) -> list[str]:
    """The request's own filled prompt plus up to ``n_templates - 1`` other *training* templates of
    its relation, filled with its subject (held-out templates stay unseen, for evaluation)."""
    own = request.text
    relation = relation_of(request, factbase)
    if relation is None or n_templates <= 1:
        return [own]
    others = [t for t in relation.train_templates if t != request.prompt]
    rng = random.Random(f"{seed}|{request.subject}|{request.prompt}")
    picked = rng.sample(others, min(n_templates - 1, len(others)))
    return [own, *(t.replace("{}", request.subject) for t in picked)]
