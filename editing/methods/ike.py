"""IKE — Zheng et al., "Can We Edit Factual Knowledge by In-Context Learning?" (EMNLP 2023).

In-context editing: no weight changes and no training. For each new fact, IKE retrieves the most
similar facts of a demonstration pool by sentence-embedding similarity (all-MiniLM-L6-v2, see
:mod:`editing.analysis.embeddings`) and turns each into one of three demonstrations, in the paper's ratio
copy : update : retain = 1 : 3 : 4 (shuffled), every one about *another* fact F:

* copy — ``New Fact: F`` then ``Prompt: <F's prompt> <F's new target>``;
* update — a paraphrase of F's prompt answered with F's new target;
* retain — a neighbour prompt (same relation, another subject) answered with its true object.

Demonstrations are ordered by similarity, the most similar next to the query, and the query comes
last as ``New Fact: <edit> Prompt: <query>``: the new fact is the context of every query, as in the
paper. Asked the edit prompt itself, that query *is* a copy; asked a paraphrase or a neighbour, the
model has only the other facts' demonstrations to go by. (Until issue 13 the new fact's own copy
demonstration, ``New Fact: <edit> Prompt: <edit prompt> <new target>``, also stood before every
query — as earlier EasyEdit versions appended it (commented out in its current text-model code),
not the paper's mix: it showed generality and locality queries the answer to copy.) Every query
(paraphrase, neighbour or unrelated) is answered in that context — IKE has no scope classifier;
the retain demonstrations are what teaches the model to leave other facts alone.

The demonstration pool is built from the bundled fact base: counterfactual records of training
subjects (:func:`editing.train.edit_records`) of the training memory
(:func:`editing.methods.patching.in_training_memory`), with retain neighbours of the training memory too,
never the edited subject: evaluation draws neighbour and unrelated probes from the other side of
the split, so a retain demonstration never states the true answer of a locality probe.

Short contexts: the reference uses 32 demonstrations with GPT-J's 2,048 tokens. For models with a
short context (the demo model reads 64 tokens) the defaults switch to a compact format without the
"New Fact:/Prompt:" labels (words the demo vocabulary does not have) and ask for 8 demonstrations.
The edit keeps the largest number of the most similar demonstrations (typed in the paper's ratio
for that number) that fits the model's context with the edit prompt and room for the answer
(``info["demonstrations"]``); when not even one fits, the edit is refused. A longer query drops
the least similar ones until it fits (the route's ``n_demonstrations``). On the demo model one or
two fit.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from editing.analysis.embeddings import (
    ENCODER_KINDS,
    MINILM_NAME,
    SentenceEncoder,
    resolve_encoder_kind,
    sentence_encoder,
    top_k_similar,
)
from editing.core.edit import EditError, InferenceWrapper, Route, register_edit_type
from editing.core.request import EditRequest
from editing.methods.base import EditMethod, HParams, ProgressFn, register
from editing.methods.checks import SEED, Choice, FieldCheck, Number, Text, half_context
from editing.methods.patching import in_training_memory, relation_of
from editing.models.tokens import encode
from editing.storage.factbase import FactBase, load_factbase
from editing.storage.files import atomic_path
from editing.storage.paths import cache_dir
from editing.train import edit_records

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

METHOD = "IKE"
#: the paper's demonstration mix for 32 demonstrations: 4 copy, 12 update, 16 retain
TYPE_RATIO = {"copy": 1, "update": 3, "retain": 4}
SHORT_CONTEXT = 256  # below this many tokens the compact format is the default
MAX_DEMONSTRATIONS = 256  # the paper retrieves 32; far more than any context holds


def new_fact(request: EditRequest) -> str:
    """The edit as a sentence: the filled prompt followed by the new target."""
    return f"{request.text} {request.target_new}"


@dataclass(frozen=True)
class PoolFact:
    """One demonstration source: a counterfactual fact with its paraphrases and neighbours."""

    subject: str
    fact: str  # "prompt target_new"
    prompt: str
    target_new: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[tuple[str, str, str], ...]  # (another subject, a prompt about it, its true answer)


def build_pool(factbase: FactBase, seed: int = 0, n_neighbours: int = 2) -> list[PoolFact]:
    """The demonstration pool: every training-split edit record about a training-memory subject
    (:func:`editing.methods.patching.in_training_memory`), with same-relation neighbours of the memory
    too, so no demonstration states a fact that evaluation probes."""
    rng = random.Random(seed)
    pool = []
    for record in edit_records("train", factbase, seed=seed):
        request = record.request
        relation = relation_of(request, factbase)
        if relation is None or not in_training_memory(request.subject):
            continue
        others = [f for f in factbase.facts_of(relation.id)
                  if f.subject != request.subject and in_training_memory(f.subject)]
        neighbours = []
        for other in rng.sample(others, min(n_neighbours, len(others))):
            template = rng.choice(relation.train_templates)
            neighbours.append((other.subject, template.replace("{}", other.subject), other.object))
        pool.append(PoolFact(request.subject, new_fact(request), request.text, request.target_new,
                             record.paraphrases, tuple(neighbours)))
    return pool


_POOLS: dict[tuple[str, int, str], tuple[list[PoolFact], torch.Tensor]] = {}
_POOL_LOCK = threading.Lock()


def pool_with_keys(encoder: SentenceEncoder, seed: int = 0) -> tuple[list[PoolFact], torch.Tensor]:
    """The pool and the embeddings of its facts, computed once per process. MiniLM keys are also
    cached on disk (the model-based fallback depends on the model's current weights, so it is not)."""
    factbase = load_factbase()
    key = (encoder.name, seed, factbase.digest)
    with _POOL_LOCK:
        if key in _POOLS:
            return _POOLS[key]
        pool = build_pool(factbase, seed)
        digest = hashlib.sha256("\n".join(p.fact for p in pool).encode()).hexdigest()[:12]
        path = cache_dir("ike") / f"pool-{encoder.name}-{digest}.safetensors"
        keys = None
        if encoder.name == MINILM_NAME and path.exists():
            keys = load_file(str(path))["keys"]
        if keys is None:
            keys = encoder.encode([p.fact for p in pool])
            if encoder.name == MINILM_NAME:
                with atomic_path(path) as tmp:  # test workers and servers may write it at once
                    save_file({"keys": keys.contiguous()}, str(tmp))
        _POOLS[key] = (pool, keys)
        return pool, keys


def demonstration_types(k: int, rng: random.Random) -> list[str]:
    """``k`` demonstration types in the paper's 1:3:4 ratio, shuffled."""
    total = sum(TYPE_RATIO.values())
    counts = {name: round(k * share / total) for name, share in TYPE_RATIO.items()}
    counts["retain"] = max(0, k - counts["copy"] - counts["update"])
    types = [name for name, count in counts.items() for _ in range(count)]
    rng.shuffle(types)
    return types


@dataclass
class IKEHParams(HParams):
    """IKE's retrieval and prompt format (the paper's format unless the context is short)."""

    k: int = 32  # demonstrations retrieved (paper: 32); the least similar are dropped to fit the context
    fact_prefix: str = "New Fact: "
    prompt_prefix: str = "\nPrompt: "
    separator: str = "\n\n"
    reserve_tokens: int = 16  # context left free for the answer
    encoder: str = "auto"  # "minilm", "model" (mean hidden states) or "auto"
    seed: int = 0  # demonstration pool and type shuffling

    checks: ClassVar[dict[str, FieldCheck]] = {
        "k": Number(1, MAX_DEMONSTRATIONS, whole=True, why="demonstrations retrieved"),
        "fact_prefix": Text(),
        "prompt_prefix": Text(),
        "separator": Text(),
        # Room left for the answer: a negative reserve lets contexts outgrow the model (every later
        # prediction fails), more than half the context leaves no room for any demonstration.
        "reserve_tokens": Number(1, half_context, whole=True, why="at most half the model's context"),
        "encoder": Choice(ENCODER_KINDS),
        "seed": SEED,
    }

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> IKEHParams:
        if handle.max_length >= SHORT_CONTEXT:
            return cls(k=32 if handle.max_length >= 2048 else 16)
        # Compact: "F . P A . " — three separator tokens per demonstration instead of label words.
        return cls(k=8, fact_prefix="", prompt_prefix=" . ", separator=" . ",
                   reserve_tokens=max(4, handle.max_length // 16))

    def demonstration(self, fact: str, prompt: str, answer: str) -> str:
        return f"{self.fact_prefix}{fact}{self.prompt_prefix}{prompt} {answer}{self.separator}"

    def query_prefix(self, fact: str) -> str:
        return f"{self.fact_prefix}{fact}{self.prompt_prefix}"


def select_demonstrations(request: EditRequest, fact_vector: torch.Tensor, pool: list[PoolFact],
                          keys: torch.Tensor, hparams: IKEHParams, n: int | None = None) -> list[tuple[str, float]]:
    """The ``n`` (default ``k``) demonstrations for one new fact (embedded as ``fact_vector``) as
    (text, similarity), least similar first, typed copy/update/retain in the paper's ratio for ``n``.

    Every demonstration is about another fact: pool facts and neighbours outside the training
    memory for this request (:func:`~editing.methods.patching.in_training_memory`: the edited subject) are
    skipped, as a fact about the edited subject would contradict the edit.
    """
    n = hparams.k if n is None else n
    sims, order = top_k_similar(fact_vector.reshape(1, -1), keys, min(len(pool), n + 16))
    chosen = [(pool[i], float(s)) for s, i in zip(sims[0].tolist(), order[0].tolist(), strict=True)
              if in_training_memory(pool[i].subject, [request])][:n]
    rng = random.Random(f"{hparams.seed}|{request.text}|{request.target_new}")
    demos = []
    for (fact, sim), kind in zip(chosen, demonstration_types(len(chosen), rng), strict=True):
        if kind == "copy":
            prompt, answer = fact.prompt, fact.target_new
        elif kind == "update" and fact.paraphrases:
            prompt, answer = rng.choice(fact.paraphrases), fact.target_new
        else:
            neighbours = [(p, a) for subject, p, a in fact.neighbours if in_training_memory(subject, [request])]
            prompt, answer = rng.choice(neighbours) if neighbours else (fact.prompt, fact.target_new)
        demos.append((hparams.demonstration(fact.fact, prompt, answer), sim))
    demos.reverse()  # most similar next to the query
    return demos


def fitting_demonstrations(handle: ModelHandle, request: EditRequest, fact_vector: torch.Tensor,
                           pool: list[PoolFact], keys: torch.Tensor, hparams: IKEHParams) -> list[tuple[str, float]]:
    """The most demonstrations (at most ``k``) that fit the model's context before the edit prompt's
    query with ``reserve_tokens`` to spare, typed in the paper's ratio for that number.

    Raises :class:`~editing.core.edit.EditError` when not even one fits: IKE without a demonstration is
    not the paper's method, and the model would not know what the context is for.
    """
    query = hparams.query_prefix(new_fact(request)) + request.text
    query_tokens = len(encode(handle.tokenizer, query))
    shortest = None
    for n in range(min(hparams.k, len(pool)), 0, -1):
        demos = select_demonstrations(request, fact_vector, pool, keys, hparams, n)
        tokens = len(encode(handle.tokenizer, "".join(text for text, _sim in demos) + query))
        if demos and tokens + hparams.reserve_tokens <= handle.max_length:
            return demos
        if len(demos) == 1:
            shortest = tokens - query_tokens
    needed = f"; the most similar demonstration needs {shortest} more" if shortest is not None else ""
    raise EditError(
        f"IKE cannot edit with {handle.name}'s context of {handle.max_length} tokens: the new fact and the "
        f"edit prompt take {query_tokens} tokens and {hparams.reserve_tokens} are kept for the answer{needed}, "
        "so not even one demonstration fits. Shorten the prompt or target, lower reserve_tokens, or use a model "
        "with a longer context.")


@dataclass
class IkeRoute(Route):
    """A query answered in IKE's context; ``base`` is the route before IKE prefixed it.

    ``similarity`` (query vs. the chosen edit's prompt) is None when it was not needed, i.e. when
    only one new fact was a candidate; a later IKE edit computes it from ``edit_prompt`` if it must.
    """

    edit_prompt: str = ""
    similarity: float | None = None
    n_demonstrations: int = 0
    base: Route | None = None


@register_edit_type
@dataclass(eq=False)
class IkeEdit(InferenceWrapper):
    """Per request: its retrieved demonstrations (those that fit the context) and the query prefix.

    ``prompt_keys`` embed each request's filled prompt (without the new target, which would pull
    the comparison towards other facts with that target); a batch edit answers each query with the
    context of the request whose prompt is most similar to it.
    """

    contexts: list[dict[str, Any]] = field(default_factory=list)
    encoder_kind: str = "minilm"
    reserve_tokens: int = 16
    prompt_keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    kind: ClassVar[str] = "inference_wrapper"

    def context_for(self, index: int, tokenizer, prompt: str, max_length: int) -> tuple[str, int]:
        """The prefix for request ``index`` before ``prompt``, keeping as many of the most similar
        demonstrations as fit ``max_length`` with ``reserve_tokens`` to spare; returns (prefix, n).

        Only other facts' demonstrations precede the new fact: edits saved before issue 13 also hold
        the new fact's own copy demonstration (``own_demonstration``), which is no longer used.
        """
        context = self.contexts[index]
        demos = list(context["demonstrations"])
        while True:
            prefix = "".join(demos) + context["query_prefix"]
            if not demos or len(encode(tokenizer, prefix + prompt)) + self.reserve_tokens <= max_length:
                return prefix, len(demos)
            demos.pop(0)  # least similar first

    def _encoder(self, handle: ModelHandle) -> SentenceEncoder:
        return sentence_encoder(handle, self.encoder_kind)

    def _keys(self, encoder: SentenceEncoder) -> torch.Tensor:
        if self.prompt_keys.shape[-1] != encoder.dim:  # saved with another encoder: embed again
            self.prompt_keys = encoder.encode([r.text for r in self.requests])
        return self.prompt_keys

    def prepare_routes(self, handle: ModelHandle, prompts: list[str]) -> None:
        """Embed many queries in one batch (the encoder caches them for :meth:`route`)."""
        if len(self.requests) > 1:
            self._encoder(handle).encode(prompts)

    def route(self, handle: ModelHandle, route: Route) -> Route:
        if route.handle is not handle:
            return route  # SERAC sent this query to its counterfactual model: answered there as is
        incoming = route if isinstance(route, IkeRoute) and route.base is not None else None
        base = incoming.base if incoming is not None else route
        assert base is not None
        query = base.prompt[base.prefix_chars:]
        index, similarity = 0, None
        if len(self.requests) > 1 or incoming is not None:
            encoder = self._encoder(handle)
            query_vector = encoder.encode([query])
            best, best_index = (query_vector @ self._keys(encoder).T)[0].max(0)
            index, similarity = int(best_index), float(best)
            if incoming is not None:
                # One new fact per context: the most similar over every stacked IKE edit, the newest
                # winning ties.
                theirs = incoming.similarity
                if theirs is None:
                    theirs = float(query_vector[0] @ encoder.encode([incoming.edit_prompt])[0])
                if theirs > similarity:
                    return incoming
        prefix, n_demos = self.context_for(index, handle.tokenizer, base.prompt, handle.max_length)
        return IkeRoute(handle=base.handle, prompt=prefix + base.prompt,
                        prefix_chars=len(prefix) + base.prefix_chars, routed_by=self.method,
                        edit_prompt=self.requests[index].text, similarity=similarity,
                        n_demonstrations=n_demos, base=base)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_keys": self.prompt_keys}

    def config(self) -> dict[str, Any]:
        return {"contexts": self.contexts, "encoder_kind": self.encoder_kind, "reserve_tokens": self.reserve_tokens}

    @classmethod
    def from_parts(cls, common: dict[str, Any], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> IkeEdit:
        return cls(prompt_keys=tensors["prompt_keys"], **config, **common)


@register
class IKE(EditMethod):
    name = METHOD
    hparams_class = IKEHParams
    edit_kind = "inference_wrapper"
    summary = ("In-context editing: the new fact plus copy/update/retain demonstrations retrieved by "
               "sentence-embedding similarity are put before every query; no weights change.")

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> IkeEdit:
        assert isinstance(hparams, IKEHParams)
        kind = resolve_encoder_kind(hparams.encoder)
        encoder = sentence_encoder(handle, kind)
        progress(0.1, f"IKE: embedding the demonstration pool ({encoder.name})")
        pool, keys = pool_with_keys(encoder, hparams.seed)
        fact_vectors = encoder.encode([new_fact(r) for r in requests])
        contexts = []
        for number, request in enumerate(requests):
            progress(0.5 + 0.5 * number / len(requests), f"IKE: retrieving demonstrations {number + 1}/{len(requests)}")
            demos = fitting_demonstrations(handle, request, fact_vectors[number], pool, keys, hparams)
            contexts.append({
                "demonstrations": [text for text, _sim in demos],
                "similarities": [round(sim, 4) for _text, sim in demos],
                "query_prefix": hparams.query_prefix(new_fact(request)),
            })
        used = [len(c["demonstrations"]) for c in contexts]
        return IkeEdit(method=self.name, requests=list(requests), hparams=hparams.to_dict(), contexts=contexts,
                       encoder_kind=kind, reserve_tokens=hparams.reserve_tokens,
                       prompt_keys=encoder.encode([r.text for r in requests]),
                       # how many demonstrations each new fact's context holds (asked: k; what fits the
                       # model's context with the edit prompt); longer queries may drop more
                       info={"encoder": encoder.name, "pool_size": len(pool), "demonstrations_asked": hparams.k,
                             "demonstrations": used,
                             "context_tokens": handle.max_length})
