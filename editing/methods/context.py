"""Context templates: short prefixes sampled from the model, put before an edit prompt.

ROME and MEMIT average the key ``k*`` (and fit the target value) over the bare prompt ``"{}"`` and
the same prompt after a few short texts the model itself writes, so the edit holds in context.
The prefixes are sampled once per model (top-k sampling, k = 5, as the reference's
``generate_fast``), then cached on disk under ``cache_dir("context")`` and in memory.

* ROME: ``"{}"`` plus 10 texts of 5 tokens and 10 of 10 tokens (the reference's
  ``[[5, 10], [10, 10]]``), written ``"<text>. {}"``, each sampled from the begin-of-text token
  when that token starts plain text for the model (GPT-2's and the demo's ``<|endoftext|>``,
  LLaMA's ``<s>``), else from plain start words (:data:`ROME_TEXT_STARTS`, one per sample in
  turn): SmolLM2's begin-of-text token is the chat token ``<|im_start|>``, after which it writes
  chat fragments ("-outfit.. {}") instead of text (:func:`bos_starts_text`).
* MEMIT: two groups, ``["{}"]`` and one 10-token text started from each of "The", "Therefore",
  "Because", "I", "You". A start word the tokenizer cannot represent (the demo's word-level
  vocabulary lacks most of them) is replaced by the begin-of-text token.
* Where the begin-of-text token is no plain-text start, the start words follow the document
  separator ``<|endoftext|>`` (:func:`document_separator`), which decoding drops.

Lengths count tokens including the start, as the reference's ``max_out_len`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from editing.analysis.scoring import continue_sequences
from editing.analysis.stats import short_digest, weights_digest
from editing.models.tokens import encode, pad_batch, pad_id
from editing.storage.files import atomic_write_text
from editing.storage.paths import cache_dir

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

ROME_LENGTH_PARAMS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
#: where ROME's samples start when the begin-of-text token is no plain-text start (frequent
#: sentence openings; each group of samples cycles through them)
ROME_TEXT_STARTS: tuple[str, ...] = ("The", "I", "It", "In", "This", "A", "We", "When", "There", "He")
DOCUMENT_SEPARATOR = "<|endoftext|>"
MEMIT_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
MEMIT_LENGTH = 10
TOP_K = 5

_MEMORY: dict[str, list] = {}


def clear_memory_cache() -> None:
    """Forget templates held in memory (files on disk stay)."""
    _MEMORY.clear()


def _start_token(handle: ModelHandle) -> int:
    tok = handle.tokenizer
    for candidate in (tok.bos_token_id, tok.eos_token_id, pad_id(tok)):
        if candidate is not None:
            return int(candidate)
    raise ValueError("The tokenizer has neither a BOS nor an EOS token to start sampling from.")


def bos_starts_text(handle: ModelHandle) -> bool:
    """Whether the token ROME's samples start from (BOS, else EOS) begins plain text for this model.

    True when the tokenizer puts BOS before every text (LLaMA's ``<s>``) or when the token is the
    document separator of plain-text training (GPT-2's and the demo's ``<|endoftext|>``, no chat
    template mentions it); False when it is a chat-control token that the chat template writes
    (SmolLM2's ``<|im_start|>``), or when there is none.
    """
    tok = handle.tokenizer
    ids = encode(tok, "a")
    if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id:
        return True
    start = tok.bos_token or tok.eos_token
    if not start:
        return False
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(str(value) for value in template.values())
    return str(start) not in str(template)


def document_separator(handle: ModelHandle) -> list[int]:
    """The token that separates documents in plain-text pretraining, as ids to put before a start
    word: ``<|endoftext|>`` when the vocabulary has it (GPT-2-style BPE vocabularies: SmolLM2,
    Qwen2, Pythia), else nothing.

    Without it SmolLM2 treats a lone first word as a fragment: after "The" at position 0 its top
    continuation is "-" (P = 0.42), after ``<|endoftext|>The`` it is " company", " most", " key"...
    The separator is special, so decoding drops it; the templates are plain text.
    """
    tok = handle.tokenizer
    ids = tok.convert_tokens_to_ids([DOCUMENT_SEPARATOR])
    if ids and ids[0] is not None and tok.convert_ids_to_tokens(ids[0]) == DOCUMENT_SEPARATOR:
        return [int(ids[0])]
    return []


def _rome_starts(handle: ModelHandle) -> tuple[str, ...] | None:
    """ROME's plain-text start words for this model, or None to start from the begin-of-text token."""
    return None if bos_starts_text(handle) else ROME_TEXT_STARTS


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


def _top_k_pick(logits: torch.Tensor, top_k: int, generator: torch.Generator) -> list[int]:
    """One top-k sample per row of ``logits`` (``(rows, vocab)``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    picks = torch.multinomial((top_p / top_p.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
    return top_ids.cpu().gather(1, picks)[:, 0].tolist()


def _sample_incremental(handle: ModelHandle, seqs: list[list[int]], length: int, generator: torch.Generator,
                        top_k: int) -> None:
    """Grow ``seqs`` in place to ``length`` tokens, top-k sampled (:func:`editing.analysis.scoring.continue_sequences`:
    rows of equal start length go together, unpadded, from the key/value cache)."""
    by_length: dict[int, list[int]] = {}
    for row, seq in enumerate(seqs):
        by_length.setdefault(len(seq), []).append(row)
    for start_length, rows in sorted(by_length.items()):  # one call per length: each grows by its own amount
        grown = continue_sequences(handle, [seqs[r] for r in rows], length - start_length,
                                   lambda logits: _top_k_pick(logits, top_k, generator))
        for row, tokens in zip(rows, grown, strict=True):
            seqs[row].extend(tokens)


@torch.no_grad()
def sample_texts(handle: ModelHandle, starts: Sequence[list[int]], length: int, seed: int = 0,
                 top_k: int = TOP_K, incremental: bool = False) -> list[str]:
    """Top-k samples continuing each start (token ids) to ``length`` tokens, decoded without
    special tokens.

    By default every step re-reads the whole padded batch (how the demo's cached templates were
    made; kept so they stay byte-identical). ``incremental`` uses the key/value cache instead:
    the same distribution, several times faster for a real model (SmolLM2's 20 ROME samples:
    ~40 s -> ~10 s on two shared cores), though rounding may pick other tokens at near-ties.
    """
    generator = torch.Generator().manual_seed(seed)
    seqs = [list(s) for s in starts]
    tok = handle.tokenizer
    if incremental:
        _sample_incremental(handle, seqs, length, generator, top_k)
    while True:
        growing = [i for i, s in enumerate(seqs) if len(s) < length]
        if not growing:
            break
        batch = pad_batch([seqs[i] for i in growing], pad_id(tok), handle.device)
        logits = handle.model(**batch.model_inputs()).logits
        last = torch.tensor([n - 1 for n in batch.lengths], device=logits.device)
        chosen = _top_k_pick(logits[torch.arange(len(growing), device=logits.device), last], top_k, generator)
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
            atomic_write_text(path, json.dumps(value, indent=1))
    _MEMORY[key] = value
    return json.loads(json.dumps(value))


def rome_context_templates(handle: ModelHandle, length_params: Sequence[Sequence[int]] = ROME_LENGTH_PARAMS,
                           seed: int = 0, use_cache: bool = True) -> list[str]:
    """``["{}", "<sampled text>. {}", ...]`` for ROME (``length_params``: (tokens, count) pairs)."""
    params = [list(map(int, p)) for p in length_params]
    words = _rome_starts(handle)
    separator = document_separator(handle) if words is not None else []

    def make() -> list[str]:
        templates = ["{}"]
        for index, (length, count) in enumerate(params):
            if words is None:
                starts = [_start_ids(handle, None)] * count
            else:  # the separator stands where the reference's BOS does, and counts in the length
                starts = [separator + _start_ids(handle, words[i % len(words)]) for i in range(count)]
            texts = sample_texts(handle, starts, length, seed + index, incremental=words is not None)
            templates += [f"{text}. {{}}" for text in texts]
        return templates

    # Models sampled from BOS keep the original cache key (the demo's templates are unchanged).
    key_params: object = params if words is None else {"length_params": params, "starts": list(words),
                                                        "separator": separator}
    return _cached(handle, "rome", key_params, seed, use_cache, make)


def memit_context_templates(handle: ModelHandle, length: int = MEMIT_LENGTH,
                            starts: Sequence[str] = MEMIT_STARTS, seed: int = 0,
                            use_cache: bool = True) -> list[list[str]]:
    """``[["{}"], ["<sampled text>. {}", ...]]`` for MEMIT: the bare prompt and one group of
    prefixed prompts (keys are averaged within each group, then over groups)."""
    params: dict[str, object] = {"length": int(length), "starts": list(starts)}
    # The reference starts from the bare words; a model whose begin-of-text token is no text start
    # (SmolLM2) gets the document separator before them (not counted in the length: the reference
    # has none), so they start text rather than a fragment. The demo's cache key is unchanged.
    separator = [] if bos_starts_text(handle) else document_separator(handle)
    if separator:
        params["separator"] = separator

    def make() -> list[list[str]]:
        ids = [separator + _start_ids(handle, start) for start in starts]
        texts = sample_texts(handle, ids, length + len(separator), seed, incremental=bool(separator))
        return [["{}"], [f"{text}. {{}}" for text in texts]]

    return _cached(handle, "memit", params, seed, use_cache, make)


def fill(context_template: str, prompt: str) -> str:
    """Put an edit prompt (itself holding ``{}`` for the subject) into a context template."""
    return context_template.replace("{}", prompt, 1)
