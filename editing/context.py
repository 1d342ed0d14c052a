"""Context templates: short prefixes sampled from the model, put before an edit prompt.

ROME and MEMIT average the key ``k*`` (and fit the target value) over the bare prompt ``"{}"`` and
the same prompt after a few short texts the model itself writes, so the edit holds in context.
The prefixes are sampled once per model (top-k sampling, k = 5, as the reference's
``generate_fast``), then cached on disk under ``cache_dir("context")`` and in memory.

* ROME: ``"{}"`` plus 10 texts of 5 tokens and 10 of 10 tokens, each sampled from the
  begin-of-text token (the reference's ``[[5, 10], [10, 10]]``), written ``"<text>. {}"``.
* MEMIT: two groups, ``["{}"]`` and one 10-token text started from each of "The", "Therefore",
  "Because", "I", "You". A start word the tokenizer cannot represent (the demo's word-level
  vocabulary lacks most of them) is replaced by the begin-of-text token.

Lengths count tokens including the start, as the reference's ``max_out_len`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from editing.paths import cache_dir
from editing.stats import short_digest, weights_digest
from editing.tokens import encode, pad_batch, pad_id

if TYPE_CHECKING:
    from editing.models import ModelHandle

ROME_LENGTH_PARAMS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
MEMIT_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
MEMIT_LENGTH = 10
TOP_K = 5

_MEMORY: dict[str, list] = {}


def _start_token(handle: ModelHandle) -> int:
    tok = handle.tokenizer
    for candidate in (tok.bos_token_id, tok.eos_token_id, pad_id(tok)):
        if candidate is not None:
            return int(candidate)
    raise ValueError("The tokenizer has neither a BOS nor an EOS token to start sampling from.")


def _start_ids(handle: ModelHandle, start: str | None) -> list[int]:
    """Token ids a sample starts from: the begin-of-text token, or ``start``'s tokens when the
    tokenizer knows the word."""
    bos = _start_token(handle)
    if start is None:
        return [bos]
    ids = encode(handle.tokenizer, start)
    unk = handle.tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        return [bos]
    return ids


@torch.no_grad()
def sample_texts(handle: ModelHandle, starts: Sequence[list[int]], length: int, seed: int = 0,
                 top_k: int = TOP_K) -> list[str]:
    """Top-k samples continuing each start (token ids) to ``length`` tokens, decoded without
    special tokens."""
    generator = torch.Generator().manual_seed(seed)
    seqs = [list(s) for s in starts]
    tok = handle.tokenizer
    while True:
        growing = [i for i, s in enumerate(seqs) if len(s) < length]
        if not growing:
            break
        batch = pad_batch([seqs[i] for i in growing], pad_id(tok), handle.device)
        logits = handle.model(**batch.model_inputs()).logits
        last = torch.tensor([n - 1 for n in batch.lengths], device=logits.device)
        probs = torch.softmax(logits[torch.arange(len(growing), device=logits.device), last].float(), dim=-1)
        top_p, top_ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        picks = torch.multinomial((top_p / top_p.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
        chosen = top_ids.cpu().gather(1, picks)[:, 0].tolist()
        for row, token in zip(growing, chosen, strict=True):
            seqs[row].append(int(token))
    texts = []
    for seq in seqs:
        text = tok.decode(seq, skip_special_tokens=True)
        # Braces would clash with the "{}" subject slot; newlines would split the prompt.
        texts.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
    return texts


def _cache_key(handle: ModelHandle, kind: str, params: object, seed: int) -> str:
    # Keyed by the embedding (never changed by weight edits), so a session's edits do not cause
    # new samples: the templates are generated once per model, as in the reference.
    embed = weights_digest(handle, [f"{handle.arch.embed}.weight"])
    return short_digest(handle.fingerprint(), embed, kind, json.dumps(params), str(seed))


def _cached(handle: ModelHandle, kind: str, params: object, seed: int, use_cache: bool, make) -> list:
    key = _cache_key(handle, kind, params, seed)
    if use_cache and key in _MEMORY:
        return json.loads(json.dumps(_MEMORY[key]))  # a copy: callers may mutate
    path = cache_dir("context") / f"{kind}-{key}.json"
    if use_cache and path.exists():
        value = json.loads(path.read_text())
    else:
        value = make()
        if use_cache:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(value, indent=1))
            tmp.replace(path)
    _MEMORY[key] = value
    return json.loads(json.dumps(value))


def rome_context_templates(handle: ModelHandle, length_params: Sequence[Sequence[int]] = ROME_LENGTH_PARAMS,
                           seed: int = 0, use_cache: bool = True) -> list[str]:
    """``["{}", "<sampled text>. {}", ...]`` for ROME (``length_params``: (tokens, count) pairs)."""
    params = [list(map(int, p)) for p in length_params]

    def make() -> list[str]:
        templates = ["{}"]
        for index, (length, count) in enumerate(params):
            starts = [_start_ids(handle, None)] * count
            templates += [f"{text}. {{}}" for text in sample_texts(handle, starts, length, seed + index)]
        return templates

    return _cached(handle, "rome", params, seed, use_cache, make)


def memit_context_templates(handle: ModelHandle, length: int = MEMIT_LENGTH,
                            starts: Sequence[str] = MEMIT_STARTS, seed: int = 0,
                            use_cache: bool = True) -> list[list[str]]:
    """``[["{}"], ["<sampled text>. {}", ...]]`` for MEMIT: the bare prompt and one group of
    prefixed prompts (keys are averaged within each group, then over groups)."""
    params = {"length": int(length), "starts": list(starts)}

    def make() -> list[list[str]]:
        ids = [_start_ids(handle, start) for start in starts]
        return [["{}"], [f"{text}. {{}}" for text in sample_texts(handle, ids, length, seed)]]

    return _cached(handle, "memit", params, seed, use_cache, make)


def fill(context_template: str, prompt: str) -> str:
    """Put an edit prompt (itself holding ``{}`` for the subject) into a context template."""
    return context_template.replace("{}", prompt, 1)
