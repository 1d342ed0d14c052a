"""KE: KnowledgeEditor (De Cao et al., EMNLP 2021, "Editing Factual Knowledge in Language Models").

A hypernetwork predicts the weight shift of an edit from the fine-tuning gradient, conditioned on
the edit itself. A bidirectional LSTM reads the embeddings of the edit's text ("old answer,
new answer, prompt", the paper's ``pred >> alt || input``) and a feed-forward layer with tanh
turns its final states into a condition vector ``c``. For each edited weight ``W (out × in)``
a small weight-normalised MLP maps ``c`` to vectors ``α_row, β_row ∈ R^out``,
``α_col, β_col ∈ R^in`` and a scalar ``η``; with ``A = softmax(α_row) α_colᵀ`` and
``B = softmax(β_row) β_colᵀ`` the shift is

    ΔW = max_scale · out · σ(η) · (A ⊙ ∇W + B),

where ``∇W`` is the gradient of the NLL of the new target. (KE has no factor ``out``; it makes
the row softmax a mean-1 weighting, without which the shift starts at ~1/out of a gradient step
and cannot grow to a useful size in a short training.) Because the gradient of a sequence
is ``Σ_t δ_t u_tᵀ`` and ``A`` is rank 1, ``A ⊙ ∇W = Σ_t (softmax(α_row) ⊙ δ_t)(α_col ⊙ u_t)ᵀ``:
the shift is kept as low-rank factors (rank ≤ tokens + 1) and never formed densely.

Training follows the paper's constrained objective: minimise the NLL of the new target on the
edit prompt and its paraphrases ("views") subject to KL(pre ‖ post) ≤ margin on other facts,
solved with a Lagrange multiplier updated by gradient ascent (RMSprop, warm-up then linear decay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from editing.analysis.scoring import generate
from editing.core.edit import Edit
from editing.core.request import EditRequest
from editing.learning.editor_data import RecordBatch
from editing.learning.learned import (
    GRADIENT_EDITOR_RUN,
    QUICK_TRAINING,
    GradientEditorHParams,
    GradientEditorMixin,
    GradientFactors,
    LowRankShift,
    default_edit_layers,
    edit_and_locality_losses,
    editor_on,
    mlp_weight_shapes,
    shift_edit,
    train_gradient_editor,
)
from editing.learning.training import lr_warmup_linear
from editing.methods.base import EditMethod, HParams, ProgressFn, register
from editing.methods.checks import POSITIVE, FieldCheck
from editing.models.tokens import pad_id
from editing.train import EditRecord, Trainer, register_trainer

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

NAME = "KE"


# ---------------------------------------------------------------------------------------------
# The hypernetwork
# ---------------------------------------------------------------------------------------------
class FactEncoder(nn.Module):
    """Bidirectional LSTM over token embeddings, final states → tanh feed-forward → condition.

    KE initialises its embedding table from the edited model's and trains it; here the model's
    own table is read (frozen) so the editor stays small on large vocabularies; words of
    held-out subjects would get no training signal anyway.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=1, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden_dim, condition_dim)

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(embeddings, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (final, _) = self.lstm(packed)  # final: (2 directions, batch, hidden)
        return torch.tanh(self.out(torch.cat([final[0], final[1]], dim=-1)))


class ConditionedShift(nn.Module):
    """KE's per-weight conditioner: condition → (α_col, α_row, β_col, β_row, η)."""

    def __init__(self, out_dim: int, in_dim: int, condition_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.out_dim, self.in_dim = out_dim, in_dim
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, 2 * (out_dim + in_dim) + 1)),
        )

    def forward(self, condition: torch.Tensor, grads: GradientFactors, max_scale: float) -> LowRankShift:
        col_a, row_a, col_b, row_b, eta = self.net(condition).split(
            [self.in_dim, self.out_dim, self.in_dim, self.out_dim, 1], dim=-1)
        # The row softmax averages 1/out, so KE's shift starts at ~1/out of a gradient step and
        # grows only as fast as the conditioner's output scale can (KE trains for 200k steps).
        # Scaling by out (a per-weight max_scale) makes the softmax a mean-1 weighting of rows.
        gate = max_scale * self.out_dim * torch.sigmoid(eta)[:, :, None]  # (examples, 1, 1)
        keep = grads.mask[..., None].float()
        # A ⊙ ∇W as one rank-1 term per token, then the additive B as one more term.
        left_grad = row_a.softmax(-1)[:, None, :] * grads.grads * keep
        right_grad = col_a[:, None, :] * grads.inputs
        left = gate * torch.cat([left_grad, row_b.softmax(-1)[:, None, :]], dim=1)
        right = torch.cat([right_grad, col_b[:, None, :]], dim=1)
        return LowRankShift(left=left, right=right)


class KEEditor(nn.Module):
    """The trained part of KE for a set of weights, plus the Lagrange multiplier of training."""

    def __init__(self, weights: dict[str, tuple[int, int]], embed_dim: int, lstm_dim: int, condition_dim: int,
                 hidden_dim: int, max_scale: float, seed: int) -> None:
        super().__init__()
        self.weight_names = list(weights)
        self.max_scale = max_scale
        # nn.LSTM and nn.Linear draw their initial weights from the global generator: seed a
        # private copy of it so building an editor never disturbs the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = FactEncoder(embed_dim, lstm_dim, condition_dim)
            self.shifts_net = nn.ModuleList(
                ConditionedShift(out_dim, in_dim, condition_dim, hidden_dim) for out_dim, in_dim in weights.values()
            )
        self.register_buffer("multiplier", torch.ones(()))  # KE's α for the KL constraint

    def condition(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.encoder(embeddings, lengths)

    def shifts(self, condition: torch.Tensor, factors: dict[str, GradientFactors],
               scale: float = 1.0) -> dict[str, LowRankShift]:
        return {name: net(condition, factors[name], self.max_scale * scale)
                for name, net in zip(self.weight_names, self.shifts_net, strict=True)}


def build_editor(handle: ModelHandle, config: dict[str, Any], device: torch.device | str | None = None) -> KEEditor:
    """KE's hypernetwork for ``config``, initialised on the CPU (seeded) and placed on ``device``
    (default: the model's) in float32 (:func:`editing.learning.learned.editor_on`)."""
    editor = KEEditor(mlp_weight_shapes(handle, config["layers"]), embed_dim=handle.d_model,
                      lstm_dim=config["lstm_dim"], condition_dim=config["condition_dim"],
                      hidden_dim=config["hidden_dim"], max_scale=config["max_scale"], seed=config["seed"])
    return editor_on(editor, handle.device if device is None else device)


def _words(handle: ModelHandle, text: str) -> list[int]:
    return list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])


def condition_ids(handle: ModelHandle, request: EditRequest, old_answer: str) -> list[int]:
    """Token ids of the edit as KE reads it: old answer, new answer, prompt, separated by EOS
    (KE writes ``pred >> alt || input``; a word-level vocabulary has no ``>>`` or ``||``)."""
    separator = handle.tokenizer.eos_token_id
    separator = pad_id(handle.tokenizer) if separator is None else separator
    return [*_words(handle, old_answer), separator, *_words(handle, request.target_new), separator,
            *_words(handle, request.text)]


def embed_conditions(handle: ModelHandle, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded embeddings (from the model's own table, no gradient) and lengths."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id(handle.tokenizer), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
    table = handle.module(handle.arch.embed)
    with torch.no_grad():
        embeddings = table(ids.to(handle.device)).float()
    return embeddings, torch.tensor([len(s) for s in sequences])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def default_config(handle: ModelHandle) -> dict[str, Any]:
    """KE's training settings for ``handle``: the paper's architecture (LSTM 128 per direction,
    conditioner hidden 128) with a smaller condition vector for small models; RMSprop."""
    return {
        "layers": default_edit_layers(handle.n_layers),
        "lstm_dim": 128,
        "condition_dim": min(1024, 4 * handle.d_model),
        "hidden_dim": 128,
        "max_scale": 1.0,  # KE's BART setting, applied per row (see ConditionedShift)
        "lr": 3e-4,
        "lr_multiplier": 0.1,  # KE's lr_alpha
        "kl_margin": 1e-3,  # KE's margin_kl_max (the paper anneals it; kept fixed here)
        "warmup": 200,
        **GRADIENT_EDITOR_RUN,
    }


def _record_conditions(handle: ModelHandle, records: list[EditRecord]) -> list[list[int]]:
    return [condition_ids(handle, r.request, r.request.target_true or "") for r in records]


def train(handle: ModelHandle, config: dict[str, Any], folder: Path, progress: ProgressFn) -> dict[str, Any]:
    """Train KE's hypernetwork on the training edit records; evaluate it on held-out ones."""
    editor = build_editor(handle, config)
    optimizer = torch.optim.RMSprop(editor.parameters(), lr=config["lr"], centered=True)

    def objective(records: Sequence[EditRecord], batch: RecordBatch,
                  factors: dict[str, GradientFactors]) -> tuple[torch.Tensor, dict[str, float]]:
        condition = editor.condition(*embed_conditions(handle, _record_conditions(handle, records)))
        nll, kl, accuracy = edit_and_locality_losses(handle, batch, editor.shifts(condition, factors))
        multiplier = float(editor.multiplier)  # a constant of this step's loss
        loss = nll + multiplier * (kl - config["kl_margin"])
        # Dual ascent on the multiplier (KE: gradient ascent on α, clipped at 0).
        editor.multiplier.add_(config["lr_multiplier"] * (kl.item() - config["kl_margin"])).clamp_(min=0.0)
        return loss, {"edit_nll": nll.item(), "loc_kl": kl.item(), "edit_acc": accuracy.item(),
                      "multiplier": multiplier}

    warmup = min(config["warmup"], config["steps"] // 10 + 1)
    return train_gradient_editor(handle, KE(), editor, optimizer, objective, config, folder, progress,
                                 lr_at=lr_warmup_linear(warmup, config["steps"]))


register_trainer(Trainer(NAME, default_config, train, quick=QUICK_TRAINING))


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
@dataclass
class KEHParams(GradientEditorHParams):
    """Edit-time settings; the edited layers and the hypernetwork come from the trained editor."""

    scale: float = 1.0  # multiplies the predicted shift (1 = as trained)

    checks: ClassVar[dict[str, FieldCheck]] = {"scale": POSITIVE}


@register
class KE(GradientEditorMixin, EditMethod):
    name = NAME
    hparams_class = KEHParams
    summary = ("A hypernetwork conditioned on the fact (LSTM) gates the fine-tuning gradient of the last "
               "MLP weights into a weight shift")

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, KEHParams)
        # KE edits one fact at a time; a batch is the sum of each request's shift, all computed
        # at the current weights in one pass (as MEND does; chaining them, each gradient taken
        # after the earlier shifts, edited fewer facts of a batch in our tests).
        editor, folder, factors, _ = self.editor_and_gradient(handle, requests, hparams, build_editor, progress)
        old_answers = [r.target_true or "" for r in requests]
        missing = [i for i, answer in enumerate(old_answers) if not answer]
        if missing:  # KE conditions on the model's current answer where the request gives none
            for index, answer in zip(missing, generate(handle, [requests[i].text for i in missing], 4), strict=True):
                old_answers[index] = answer
        progress(0.6, "KE: predicting the weight shift")
        with torch.no_grad():
            sequences = [condition_ids(handle, r, old) for r, old in zip(requests, old_answers, strict=True)]
            shifts = editor.shifts(editor.condition(*embed_conditions(handle, sequences)), factors, scale=hparams.scale)
        # rows without gradient are exact zeros: dropped by summed_deltas' default
        return shift_edit(self.name, handle, requests, hparams, folder, shifts)
