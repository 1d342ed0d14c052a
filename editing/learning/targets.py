"""Teacher-forced ``prompt + target`` batches and their per-row scores.

The learned editors (MEND, KE) and the methods that fine-tune on the edit's target (FT, CaliNET,
GRACE, T-Patcher) all tokenise an edit the way :mod:`editing.analysis.scoring` scores it and read the
target's NLL, token accuracy or the KL to the unedited predictions from one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editing.analysis.scoring import check_length
from editing.models.tokens import encode, pad_batch, pad_id, target_ids

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle


@dataclass
class TargetBatch:
    """Right-padded ``prompt + target`` sequences and which logits score which target token.

    ``scored[b, s]`` is True where the logits at position ``s`` predict a target token, which
    is then ``labels[b, s]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: torch.Tensor
    labels: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: slice) -> TargetBatch:
        """The sub-batch of some rows (same padding width)."""
        return TargetBatch(self.input_ids[index], self.attention_mask[index], self.scored[index], self.labels[index])


def target_batch(handle: ModelHandle, pairs: Sequence[tuple[str, str]]) -> TargetBatch:
    """Tokenise ``(prompt, target)`` pairs the way :mod:`editing.analysis.scoring` scores them."""
    tok = handle.tokenizer
    prompts = [encode(tok, prompt) for prompt, _ in pairs]
    targets = [target_ids(tok, prompt, target) for prompt, target in pairs]
    seqs = [p + t for p, t in zip(prompts, targets, strict=True)]
    check_length(handle, seqs)
    batch = pad_batch(seqs, pad_id(tok), handle.device)
    scored = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    labels = torch.zeros_like(batch.input_ids)
    for row, (p_ids, t_ids) in enumerate(zip(prompts, targets, strict=True)):
        start = len(p_ids) - 1
        scored[row, start: start + len(t_ids)] = True
        labels[row, start: start + len(t_ids)] = torch.tensor(t_ids, device=labels.device)
    return TargetBatch(batch.input_ids, batch.attention_mask, scored, labels)


def target_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """``(rows,)`` mean negative log-likelihood of each row's target tokens (on the logits' device:
    the last layer's, where a device_map shards the model)."""
    labels, mask = batch.labels.to(logits.device), batch.scored.to(logits.device).float()
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
    return -(logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def target_hits(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """``(rows,)`` fraction of each row's target tokens that are the argmax (token accuracy)."""
    scored = batch.scored.to(logits.device)
    hits = (logits.argmax(-1) == batch.labels.to(logits.device)) & scored
    return hits.float().sum(-1) / scored.float().sum(-1).clamp(min=1)


def masked_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(pre ‖ post) between next-token distributions."""
    pre = torch.log_softmax(pre_logits.float(), dim=-1)
    post = torch.log_softmax(post_logits.float(), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    weights = mask.float()
    return (kl * weights).sum() / weights.sum().clamp(min=1)
