"""Tokenisation conventions shared by methods and metrics.

* Prompts are right-padded, so a token's position is the same as in the unpadded prompt.
* A target is scored as the tokens that ``prompt + " " + target`` adds after ``prompt``
  (no BOS inside the target, whatever the tokenizer adds at the start of a text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it at the start of an input (BOS if the tokenizer adds one)."""
    return list(tokenizer(text)["input_ids"])


def target_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> list[int]:
    """Ids of ``target`` as it continues ``prompt`` after one space."""
    prompt_ids = encode(tokenizer, prompt)
    full_ids = encode(tokenizer, f"{prompt} {target.strip()}")
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids):]
    # Merges across the boundary (rare): tokenise the target alone, without special tokens.
    return list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The words of ``text`` the tokenizer can only write as its unknown token (in order, once each).

    Always empty for byte-level tokenizers, which spell any text; a word-level vocabulary (the demo
    model's) turns "Zürich" or "qwertyuiop" into ``<unk>``, and a model taught that answer would
    only ever say ``<unk>``.
    """
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    if not getattr(tokenizer, "is_fast", False):  # no offsets: try each whitespace-separated word
        return list(dict.fromkeys(
            word for word in text.split()
            if unk in tokenizer(" " + word, add_special_tokens=False)["input_ids"]))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = [text[start:end] or str(tokenizer.unk_token)
             for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
             if token == unk]
    return list(dict.fromkeys(words))


def subject_last_token(tokenizer: PreTrainedTokenizerBase, template: str, subject: str) -> int:
    """Index of the subject's last token in ``template`` filled with ``subject``."""
    if "{}" not in template:
        raise ValueError(f"Template {template!r} has no {{}} for the subject.")
    head = template[: template.index("{}")] + subject
    return len(encode(tokenizer, head.rstrip())) - 1


@dataclass
class Batch:
    """Right-padded token batch with each row's real length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int,
              device: torch.device | None = None) -> Batch:
    """Right-pad token id lists into a batch."""
    if not sequences:
        raise ValueError("Cannot build a batch from no sequences.")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    batch = Batch(ids, mask, [len(s) for s in sequences])
    return batch.to(device) if device is not None else batch


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)
