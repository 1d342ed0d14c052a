"""Probability scoring: the one place where prompts meet logits.

Every metric and every method that needs P(target | prompt), teacher-forced token hits or
top next-token predictions calls these batched functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from editing.models.tokens import encode, pad_batch, pad_id, target_ids

if TYPE_CHECKING:
    from editing.core.edit import Route
    from editing.models.loader import ModelHandle

DEFAULT_BATCH = 32
T = TypeVar("T")


@dataclass
class TargetScore:
    """How well a model predicts ``target`` after ``prompt`` (teacher-forced)."""

    token_ids: list[int]
    logprobs: torch.Tensor  # (n_target_tokens,) float32 log P of each target token
    hits: torch.Tensor  # (n_target_tokens,) bool: the argmax was that token
    predicted: torch.Tensor | None = None  # (n_target_tokens,) argmax ids (locality agreement compares them)
    top: list[TokenProb] | None = None  # top-k next tokens after the prompt, when asked for

    @property
    def logprob(self) -> float:
        """log P(whole target)."""
        return float(self.logprobs.sum())

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per target token (CounterFact's comparison)."""
        return float(-self.logprobs.mean())

    @property
    def prob(self) -> float:
        return float(self.logprobs.sum().exp())

    @property
    def first_token_prob(self) -> float:
        return float(self.logprobs[0].exp())

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens predicted by argmax (the survey's token-level accuracy)."""
        return float(self.hits.float().mean())


@dataclass
class TokenProb:
    token: str
    token_id: int
    prob: float


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def score_targets(handle: ModelHandle, prompts: Sequence[str], targets: Sequence[str],
                  batch_size: int = DEFAULT_BATCH, top_k: int = 0) -> list[TargetScore]:
    """Teacher-forced log-probabilities and argmax hits of each target after its prompt.

    With ``top_k`` each score also lists the ``top_k`` likeliest next tokens after the prompt (the
    same pass: the first target position is predicted from the prompt alone).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
    tok = handle.tokenizer
    out: list[TargetScore] = []
    for chunk in _chunks(list(zip(prompts, targets, strict=True)), batch_size):
        prompt_ids = [encode(tok, p) for p, _ in chunk]
        tgt_ids = [target_ids(tok, p, t) for p, t in chunk]
        seqs = [p + t for p, t in zip(prompt_ids, tgt_ids, strict=True)]
        check_length(handle, seqs)
        batch = pad_batch(seqs, pad_id(tok), handle.device)
        logits = handle.model(**batch.model_inputs()).logits.float()
        for row, (p_ids, t_ids) in enumerate(zip(prompt_ids, tgt_ids, strict=True)):
            positions = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids), device=logits.device)
            row_logits = logits[row, positions]
            wanted = torch.tensor(t_ids, device=logits.device)
            log_dist = torch.log_softmax(row_logits, dim=-1)
            logprobs = log_dist.gather(1, wanted[:, None])[:, 0]
            predicted = row_logits.argmax(-1)
            top = None
            if top_k > 0:
                values, ids = log_dist[0].topk(min(top_k, row_logits.shape[-1]))
                top = [TokenProb(tok.decode([i]).strip(), i, v)
                       for v, i in zip(values.exp().tolist(), ids.tolist(), strict=True)]
            out.append(TargetScore(t_ids, logprobs.cpu(), (predicted == wanted).cpu(), predicted.cpu(), top))
    return out


@torch.no_grad()
def last_token_logprobs(handle: ModelHandle, prompts: Sequence[str],
                        batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """``(n_prompts, vocab)`` log-distribution of the token after each prompt."""
    tok = handle.tokenizer
    rows = []
    for chunk in _chunks(list(prompts), batch_size):
        seqs = [encode(tok, p) for p in chunk]
        check_length(handle, seqs)
        batch = pad_batch(seqs, pad_id(tok), handle.device)
        logits = handle.model(**batch.model_inputs()).logits.float()
        last = torch.tensor([n - 1 for n in batch.lengths], device=logits.device)
        rows.append(torch.log_softmax(logits[torch.arange(len(seqs)), last], dim=-1).cpu())
    return torch.cat(rows)


def top_predictions(handle: ModelHandle, prompts: Sequence[str], k: int = 5) -> list[list[TokenProb]]:
    """The ``k`` most likely next tokens of each prompt with their probabilities."""
    logprobs = last_token_logprobs(handle, prompts)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    tok = handle.tokenizer
    return [
        [TokenProb(tok.decode([int(i)]).strip(), int(i), float(v.exp())) for v, i in zip(vrow, irow, strict=True)]
        for vrow, irow in zip(values, ids, strict=True)
    ]


@torch.no_grad()
def continue_sequences(handle: ModelHandle, seqs: Sequence[Sequence[int]], max_new_tokens: int,
                       pick: Callable[[torch.Tensor], list[int]], stop_token: int | None = None) -> list[list[int]]:
    """The tokens that continue each sequence, chosen one step at a time by ``pick`` (the last
    position's logits, ``(rows, vocab)`` → one token per row).

    Sequences of equal length run together, so nothing is padded and every token sits at exactly
    the position it has alone (edits that act per position rely on that); each step runs only the
    newest token against the model's key/value cache. A row stops before ``stop_token`` or at the
    model's context; at most ``max_new_tokens`` tokens are added.
    """
    new: list[list[int]] = [[] for _ in seqs]
    groups: dict[int, list[int]] = {}
    for row, seq in enumerate(seqs):
        groups.setdefault(len(seq), []).append(row)
    for start_length, rows in sorted(groups.items()):
        budget = min(max_new_tokens, handle.max_length - start_length)
        if budget <= 0:
            continue
        stopped: set[int] = set()
        out = handle.model(input_ids=torch.tensor([list(seqs[r]) for r in rows], device=handle.device),
                           use_cache=True)
        for step in range(budget):
            chosen = pick(out.logits[:, -1])
            for row, token in zip(rows, chosen, strict=True):
                if row in stopped:
                    continue
                if stop_token is not None and token == stop_token:
                    stopped.add(row)
                else:
                    new[row].append(int(token))
            if len(stopped) == len(rows) or step == budget - 1:
                break
            step_ids = torch.tensor(chosen, device=handle.device)[:, None]
            out = handle.model(input_ids=step_ids, cache=out.cache, use_cache=True)
    return new


def _greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(-1).tolist()


@torch.no_grad()
def generate(handle: ModelHandle, prompts: Sequence[str], max_new_tokens: int = 8,
             batch_size: int = DEFAULT_BATCH) -> list[str]:
    """Greedy continuations (text after the prompt), stopping at EOS or the model's context.

    Prompts of equal token length are run together, unpadded, and extended from the key/value
    cache (:func:`continue_sequences`): a continuation costs one token's forward pass per step
    instead of the whole prefix. ``batch_size`` is kept for callers' compatibility.
    """
    del batch_size
    tok = handle.tokenizer
    continuations = continue_sequences(handle, [encode(tok, p) for p in prompts], max_new_tokens, _greedy,
                                       stop_token=tok.eos_token_id)
    return [tok.decode(tokens).strip() for tokens in continuations]


class PromptTooLong(ValueError):
    """A prompt (with its target) does not fit the model's context."""


def check_length(handle: ModelHandle, seqs: Sequence[Sequence[int]]) -> None:
    """Raise :class:`PromptTooLong` when a token sequence exceeds the model's context."""
    longest = max(len(s) for s in seqs)
    if longest > handle.max_length:
        raise PromptTooLong(
            f"A prompt with its target is {longest} tokens; the model reads at most {handle.max_length}."
        )


# -- routed scoring (inference-wrapper edits send some queries elsewhere) --------------------------
def _grouped(routes: Sequence[Route], compute: Callable[[ModelHandle, list[str], list[int]], list[T]]) -> list[T]:
    results: list[T | None] = [None] * len(routes)
    groups: dict[int, list[int]] = {}
    for index, route in enumerate(routes):
        groups.setdefault(id(route.handle), []).append(index)
    for indices in groups.values():
        handle = routes[indices[0]].handle
        values = compute(handle, [routes[i].prompt for i in indices], indices)
        for index, value in zip(indices, values, strict=True):
            results[index] = value
    return results  # type: ignore[return-value]


def score_routes(routes: Sequence[Route], targets: Sequence[str], top_k: int = 0) -> list[TargetScore]:
    """:func:`score_targets` for routed queries, batched per answering model."""
    return _grouped(routes, lambda h, prompts, idx: score_targets(h, prompts, [targets[i] for i in idx],
                                                                  top_k=top_k))


def top_predictions_routed(routes: Sequence[Route], k: int = 5) -> list[list[TokenProb]]:
    return _grouped(routes, lambda h, prompts, _idx: top_predictions(h, prompts, k))


def generate_routed(routes: Sequence[Route], max_new_tokens: int = 8) -> list[str]:
    return _grouped(routes, lambda h, prompts, _idx: generate(h, prompts, max_new_tokens))
