"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

MEND edits with one fine-tuning gradient, transformed by small trained networks. For a linear
layer the gradient of a token's loss is the rank-1 outer product ``δ uᵀ`` of the layer input
``u`` and the gradient ``δ`` at its output; MEND never forms it. Per weight shape, one network
``g`` maps the normalised pair ``(u, δ)`` (concatenated) to a new pair ``(ũ, δ̃)``; the
pseudo-gradient is ``∇̃W = Σ_t δ̃_t ũ_tᵀ`` over the edit's tokens and the update is
``W̃ = W − α_ℓ ∇̃W`` with a learned step ``α_ℓ`` per edited weight. ``g`` is a stack of
low-rank residual layers ``z + relu(s_ℓ ⊙ (U V z + b) + o_ℓ)`` with ``U`` zero-initialised, so
before training MEND is a normalised gradient step; the per-weight scale ``s_ℓ`` and offset
``o_ℓ`` let weights of the same shape share ``g``. Training minimises
``c_edit · L_edit + c_loc · L_loc``: the NLL of the new target on the edit prompt and its
paraphrases after the update, and the KL between the pre- and post-edit predictions on
unrelated prompts; gradients flow through the update into ``g`` and ``α``.

An edit is one forward/backward pass on the edit prompt plus the transform, stored as
low-rank factors: rank ≤ number of tokens carrying gradient (rank 1 per token, as in the paper's
note on sequence models), summed over the requests of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

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
    seeded_generator,
    shift_edit,
    train_gradient_editor,
)
from editing.methods.base import EditMethod, HParams, ProgressFn, register
from editing.methods.checks import POSITIVE, FieldCheck
from editing.train import EditRecord, Trainer, register_trainer

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

NAME = "MEND"


# ---------------------------------------------------------------------------------------------
# The editor network
# ---------------------------------------------------------------------------------------------
class ModalResidualLayer(nn.Module):
    """``z + relu(s_m ⊙ (U V z + b) + o_m)`` for weight ``m`` of the shared shape.

    ``U`` starts at zero, so the layer starts as the identity (MEND's initialisation).
    """

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator) -> None:
        super().__init__()
        inner = min(rank, dim)
        self.up = nn.Parameter(torch.zeros(dim, inner))
        # MEND draws V from N(0, 1); scaled by 1/sqrt(dim) here so that the first updates of U
        # change the output by O(learning rate) whatever the width.
        self.down = nn.Parameter(torch.randn(inner, dim, generator=generator) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.down.T) @ self.up.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return z + pre.clamp(min=0)  # clamp, not relu: the gradient at exactly 0 must pass (U = 0 at init)


class GradientTransform(nn.Module):
    """MEND's network for one weight shape: acts on the concatenated normalised ``[u; δ]``."""

    def __init__(self, in_dim: int, out_dim: int, n_modes: int, rank: int, n_hidden: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.layers = nn.ModuleList(
            ModalResidualLayer(in_dim + out_dim, rank, n_modes, generator) for _ in range(n_hidden + 1)
        )

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], dim=-1)
        for layer in self.layers:
            z = layer(z, mode)
        return z[..., : self.in_dim], z[..., self.in_dim:]


class RunningMoments(nn.Module):
    """Running mean and variance of a feature vector (Chan et al.'s parallel update), frozen
    outside training; MEND normalises ``u`` and ``δ`` with them before the transform."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        rows = rows.to(self.mean.dtype)  # float64, except where the device has none (MPS)
        n_new = float(rows.shape[0])
        mean_new = rows.mean(0)
        m2_new = ((rows - mean_new) ** 2).sum(0)
        total = self.count + n_new
        shift = mean_new - self.mean
        self.mean += shift * n_new / total
        self.m2 += m2_new + shift**2 * self.count * n_new / total
        self.count.fill_(total)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            raise RuntimeError("MEND's normalisation has seen fewer than 2 gradient rows; train the editor first.")
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((x - self.mean.float()) / (std.float() + 1e-7))


class MENDEditor(nn.Module):
    """The trained part of MEND for a set of weights: shared transforms, moments, step sizes."""

    def __init__(self, weights: dict[str, tuple[int, int]], rank: int, n_hidden: int, edit_lr: float,
                 seed: int) -> None:
        super().__init__()
        self.weight_names = list(weights)
        shapes = list(dict.fromkeys(weights.values()))
        self.shape_key = {name: f"out{shape[0]}_in{shape[1]}" for name, shape in weights.items()}
        self.mode = {name: [n for n in self.weight_names if weights[n] == weights[name]].index(name)
                     for name in self.weight_names}
        generator = seeded_generator(seed)
        self.transforms = nn.ModuleDict({
            f"out{out_dim}_in{in_dim}": GradientTransform(
                in_dim, out_dim, sum(1 for s in weights.values() if s == (out_dim, in_dim)), rank, n_hidden, generator)
            for out_dim, in_dim in shapes
        })
        self.input_moments = nn.ModuleList(RunningMoments(weights[n][1]) for n in self.weight_names)
        self.grad_moments = nn.ModuleList(RunningMoments(weights[n][0]) for n in self.weight_names)
        self.edit_lrs = nn.Parameter(torch.full((len(self.weight_names),), float(edit_lr)))

    def shifts(self, factors: dict[str, GradientFactors], lr_scale: float = 1.0) -> dict[str, LowRankShift]:
        """MEND's update of each weight for each example, as low-rank factors.

        In training mode the normalisation moments first absorb the new gradient rows.
        """
        out: dict[str, LowRankShift] = {}
        for index, name in enumerate(self.weight_names):
            f = factors[name]
            if self.training:
                self.input_moments[index].update(f.inputs[f.mask])
                self.grad_moments[index].update(f.grads[f.mask])
            # Only positions with gradient are transformed (MEND skips zero-gradient rows); the
            # others stay zero and contribute nothing to the update.
            u = self.input_moments[index].normalise(f.inputs[f.mask])
            delta = self.grad_moments[index].normalise(f.grads[f.mask])
            new_u, new_delta = self.transforms[self.shape_key[name]](u, delta, self.mode[name])
            step = self.edit_lrs[index] * lr_scale
            left = f.grads.new_zeros(f.grads.shape).masked_scatter(f.mask[..., None], -step * new_delta)
            right = f.inputs.new_zeros(f.inputs.shape).masked_scatter(f.mask[..., None], new_u)
            out[name] = LowRankShift(left=left, right=right)
        return out


def build_editor(handle: ModelHandle, config: dict[str, Any], device: torch.device | str | None = None) -> MENDEditor:
    """MEND's editor for ``config``, initialised on the CPU (seeded) and placed on ``device`` (default:
    the model's) in float32 (:func:`editing.learning.learned.editor_on`)."""
    editor = MENDEditor(mlp_weight_shapes(handle, config["layers"]), rank=config["rank"],
                        n_hidden=config["n_hidden"], edit_lr=config["edit_lr"], seed=config["seed"])
    return editor_on(editor, handle.device if device is None else device)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def default_config(handle: ModelHandle) -> dict[str, Any]:
    """MEND's training settings for ``handle`` (the paper's c_edit = 0.1, c_loc = 1, one hidden
    layer, identity init; step sizes and learning rates sized for small models)."""
    return {
        "layers": default_edit_layers(handle.n_layers),
        # inner rank of the transform's layers: the reference's 1920 on large models, a quarter
        # of the width (u and δ concatenated) on small ones
        "rank": min(1920, (handle.d_model + handle.d_ff) // 4),
        "n_hidden": 1,
        "edit_lr": 1e-4,  # initial α (learned)
        "lr": 1e-4,  # Adam, transform parameters
        "lr_lr": 1e-4,  # Adam, the per-weight step sizes α
        "c_edit": 0.1,
        "c_loc": 1.0,
        **GRADIENT_EDITOR_RUN,
    }


def train(handle: ModelHandle, config: dict[str, Any], folder: Path, progress: ProgressFn) -> dict[str, Any]:
    """Train MEND's editor on the training edit records; evaluate it on held-out ones."""
    editor = build_editor(handle, config)
    transform_params = [p for n, p in editor.named_parameters() if n != "edit_lrs"]
    optimizer = torch.optim.Adam([{"params": transform_params, "lr": config["lr"]},
                                  {"params": [editor.edit_lrs], "lr": config["lr_lr"]}])

    def objective(_records: Sequence[EditRecord], batch: RecordBatch,
                  factors: dict[str, GradientFactors]) -> tuple[torch.Tensor, dict[str, float]]:
        nll, kl, accuracy = edit_and_locality_losses(handle, batch, editor.shifts(factors))
        loss = config["c_edit"] * nll + config["c_loc"] * kl
        return loss, {"edit_nll": nll.item(), "loc_kl": kl.item(), "edit_acc": accuracy.item()}

    result = train_gradient_editor(handle, MEND(), editor, optimizer, objective, config, folder, progress)
    result["edit_lrs"] = [round(float(v), 6) for v in editor.edit_lrs.detach()]
    return result


register_trainer(Trainer(NAME, default_config, train, quick=QUICK_TRAINING))


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
@dataclass
class MENDHParams(GradientEditorHParams):
    """Edit-time settings; the edited layers and the networks come from the trained editor."""

    lr_scale: float = 1.0  # multiplies the learned step sizes α (1 = as trained)

    checks: ClassVar[dict[str, FieldCheck]] = {"lr_scale": POSITIVE}


@register
class MEND(GradientEditorMixin, EditMethod):
    name = NAME
    hparams_class = MENDHParams
    summary = ("Trained networks transform the rank-1 gradient factors of the last MLP weights into "
               "a one-step low-rank update")

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, MENDHParams)
        editor, folder, factors, losses = self.editor_and_gradient(handle, requests, hparams, build_editor, progress)
        progress(0.6, "MEND: transforming the gradient")
        with torch.no_grad():
            shifts = editor.shifts(factors, lr_scale=hparams.lr_scale)
        # positions without gradient are dropped (the transform's output there is not zero)
        return shift_edit(self.name, handle, requests, hparams, folder, shifts,
                          {name: f.mask for name, f in factors.items()},
                          edit_nll_before=[round(float(v), 4) for v in losses])
