"""Fine-tuning baselines: FT, FT-L (Zhu et al. 2020) and FT-M (EasyEdit).

All three tune the MLP weights of chosen layers with Adam on the edit prompts and store the
result as dense :class:`~editing.core.edit.WeightDelta` entries. They differ in three ways:

* **what is tuned** — FT tunes every MLP projection of its layer; FT-L and FT-M only the MLP
  output projection of one layer (ROME's and EasyEdit's FT baselines);
* **the constraint** — FT-L and FT-M keep ``‖θ − θ₀‖∞ ≤ ε``, projecting the change back into the
  box after every optimiser step (Zhu et al. 2020, "Modifying Memories in Transformer Models");
  FT is unconstrained;
* **the loss**, which is where FT-L and FT-M differ (EasyEdit's ``objective_optimization``):

  - ``prompt_last`` (FT-L, ROME's original FT-L baseline): the model reads the prompt only, and
    the log-probability of *every* target token is taken from the distribution at the prompt's
    last position, averaged over the target tokens. For a one-token target this is the usual
    next-token loss; for a multi-token target it pushes all its tokens at the same position and
    never teacher-forces the continuation.
  - ``target_new`` (FT-M and FT): the model reads ``prompt + target`` and the loss is the
    teacher-forced cross-entropy of each target token at its own position, with the prompt's
    positions masked out (no loss on the prompt tokens), averaged over the target tokens.

  Both average per request first and then over requests, as EasyEdit does.

Gradients come from ``torch.func.functional_call``: the tuned tensors are the *deltas*, fresh
leaves added to the weights inside the call, so the shared model's parameter tensors (and their
``requires_grad`` flags) are never written while the edit is computed; the call only substitutes
``W + Δ`` for the duration of its own forward pass, under the handle's lock. Optimising the delta
instead of the weight gives the same Adam trajectory (weight decay aside) and lets the L∞ projection be exact:
the stored delta lies in ``[-ε, ε]`` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.func import functional_call

from editing.analysis.scoring import check_length
from editing.core.edit import Edit, EditError, ParamDelta, WeightDelta
from editing.core.request import EditRequest
from editing.learning.targets import TargetBatch, target_batch, target_nll
from editing.methods.base import EditMethod, HParams, ProgressFn, register, scaled_layer
from editing.methods.checks import COUNT, LAYERS, NON_NEGATIVE, POSITIVE, Choice, FieldCheck, Flag, Items, Maybe
from editing.models.loader import ModelHandle
from editing.models.tokens import Batch, encode, pad_batch, pad_id, target_ids

OBJECTIVES = ("prompt_last", "target_new")
MODULE_KINDS = ("mlp_in", "mlp_out")


@dataclass
class FTHParams(HParams):
    """Hyper-parameters shared by FT, FT-L and FT-M (defaults here are plain FT's).

    ``layers`` default to a fixed fraction of the depth (``layer_fraction``); ``modules`` picks the
    MLP projections to tune (``mlp_in``: the input projection(s), two for gated MLPs; ``mlp_out``:
    the output projection), with their biases when ``tune_bias`` (ROME's name match selects
    both). ``norm_constraint`` is ε of the L∞ box around the original weights (None:
    unconstrained). ``steps`` are passes over the requests, one Adam step per batch of
    ``batch_size`` requests (ROME's ``num_steps``); training stops early once the mean loss is
    below ``stop_loss``. ``weight_decay`` acts on the delta, i.e. pulls towards the original weights.

    Plain FT tunes the middle layer: ROME's unconstrained FT baselines disagree (layer 1 of 48 on
    GPT-2 XL, 21 of 28 on GPT-J) and on the demo model the middle layer edits reliably without
    breaking unrelated facts.
    """

    layers: tuple[int, ...] = (0,)
    modules: tuple[str, ...] = ("mlp_in", "mlp_out")
    objective: str = "target_new"
    norm_constraint: float | None = None
    steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    stop_loss: float = 1e-2
    tune_bias: bool = True

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layers": LAYERS,
        "modules": Items(Choice(MODULE_KINDS), non_empty=True, distinct=True),
        "objective": Choice(OBJECTIVES),
        "norm_constraint": Maybe(POSITIVE),  # ε of the L∞ box; None: unconstrained
        "steps": COUNT,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "batch_size": COUNT,
        "stop_loss": NON_NEGATIVE,
        "tune_bias": Flag(),
    }

    #: where the tuned layer sits, as a fraction of the depth
    layer_fraction: ClassVar[float] = 0.5
    preset_names: ClassVar[tuple[str, ...]] = ("FT",)

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> FTHParams:
        """Defaults for ``handle``: one layer at ``layer_fraction`` of the depth."""
        return cls(layers=(scaled_layer(handle.n_layers, cls.layer_fraction),))


@dataclass
class FTLHParams(FTHParams):
    """FT-L: one layer's MLP output projection, L∞-constrained, ``prompt_last`` loss.

    ROME's FT-L baseline tunes layer 0 (so ``layer_fraction`` is 0) with ε between 5e-5 and
    2e-3 and lr 5e-4; those presets are used for ROME's models. ε is an absolute bound per
    weight and does not transfer between models, so elsewhere it is derived from the tuned
    weight's scale: ε = ``norm_fraction`` × RMS(W), with lr = ε (Adam moves each weight by about
    lr per step, so the box is reached in a step, as with ROME's GPT-2 XL setting lr = ε).
    ``norm_fraction`` = 0.25 is the value that reaches ≥ 90 % efficacy on the demo model.

    A quarter of the weight's RMS is far too wide a box for a real pretrained model: on
    SmolLM2-135M (ε = 0.048) the edit drags every "... in the city of" prompt to the new answer.
    ROME's presets follow ε ≈ ``size_coef`` / (number of parameters) across GPT-2 medium, large and
    XL (ε·N = 0.71M, 0.77M, 0.78M), so ε is also capped by that law: ε = min(``norm_fraction`` ×
    RMS(W), ``size_coef`` / N). On SmolLM2-135M that gives ε ≈ 5.6e-3 (edit succeeds, "The Louvre
    ... city of" still answers Paris); on the 2.3M-parameter demo model the cap (0.33) is far above
    0.25 × RMS(W) = 0.01, so its default is unchanged.
    """

    modules: tuple[str, ...] = ("mlp_out",)
    objective: str = "prompt_last"
    norm_constraint: float | None = 1e-2
    lr: float = 1e-2

    layer_fraction: ClassVar[float] = 0.0
    norm_fraction: ClassVar[float] = 0.25
    size_coef: ClassVar[float] = 7.5e5
    preset_names: ClassVar[tuple[str, ...]] = ("FT-L",)

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> FTLHParams:
        """ε and lr from the tuned weight's RMS and the model's size (see the class docstring);
        ROME's reference models (GPT-2 medium, large, XL; GPT-J) take ROME's ε and lr from their
        preset files (presets/FT-L/)."""
        layer = scaled_layer(handle.n_layers, cls.layer_fraction)
        if "norm_constraint" in preset and "lr" in preset:
            return cls(layers=(layer,))  # both are the preset's: no need to read the weights
        weight = handle.arch.mlp_out_weight(handle.model, layer).detach().float()
        n_params = sum(p.numel() for p in handle.model.parameters())  # tied weights counted once
        eps = min(cls.norm_fraction * float(weight.pow(2).mean().sqrt()), cls.size_coef / n_params)
        eps = float(f"{eps:.2g}")
        return cls(layers=(layer,), norm_constraint=eps, lr=eps)


@dataclass
class FTMHParams(FTLHParams):
    """FT-M: FT-L's setting with the teacher-forced, prompt-masked ``target_new`` loss."""

    objective: str = "target_new"
    #: its own presets first, then FT-L's (the same ε and lr, EasyEdit's FT-M)
    preset_names: ClassVar[tuple[str, ...]] = ("FT-M", "FT-L")


def tuned_parameter_names(handle: ModelHandle, hparams: FTHParams) -> list[str]:
    """Names of the parameters the fine-tuning methods change for ``hparams``."""
    arch = handle.arch
    names: list[str] = []
    for layer in hparams.layers:
        modules: list[str] = []
        if "mlp_in" in hparams.modules:
            modules.extend(arch.module_name(int(layer), part) for part in arch.mlp_in)
        if "mlp_out" in hparams.modules:
            modules.append(arch.mlp_out_name(int(layer)))
        for module_name in modules:
            module = handle.module(module_name)
            names.append(f"{module_name}.weight")
            if hparams.tune_bias and getattr(module, "bias", None) is not None:
                names.append(f"{module_name}.bias")
    return list(dict.fromkeys(names))


@dataclass
class PromptLastBatch:
    """The prompts alone, and for every target token the row whose last position must predict it."""

    batch: Batch
    rows: torch.Tensor  # (n target tokens,) request of each target token
    positions: torch.Tensor  # (n target tokens,) that request's last prompt position
    token_ids: torch.Tensor  # (n target tokens,)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return self.batch.model_inputs()

    def __len__(self) -> int:
        return len(self.batch.lengths)


def prompt_last_batch(handle: ModelHandle, prompts: Sequence[str], targets: Sequence[str]) -> PromptLastBatch:
    """Inputs of ROME's FT-L loss: every target token is read at the prompt's last position."""
    tok = handle.tokenizer
    sequences = [encode(tok, prompt) for prompt in prompts]
    answers = [target_ids(tok, prompt, target) for prompt, target in zip(prompts, targets, strict=True)]
    check_length(handle, sequences)
    rows = [row for row, answer in enumerate(answers) for _ in answer]
    device = handle.device
    return PromptLastBatch(
        batch=pad_batch(sequences, pad_id(tok), device),
        rows=torch.tensor(rows, device=device),
        positions=torch.tensor([len(sequences[row]) - 1 for row in rows], device=device),
        token_ids=torch.tensor([t for answer in answers for t in answer], device=device),
    )


def prompt_last_nll(logits: torch.Tensor, batch: PromptLastBatch) -> torch.Tensor:
    """``(rows,)`` mean over each request's target tokens of −log P(token | prompt)."""
    token_nll = -logits[batch.rows, batch.positions].float().log_softmax(-1).gather(1, batch.token_ids[:, None])[:, 0]
    n_rows = len(batch)
    total = torch.zeros(n_rows, device=logits.device).index_add_(0, batch.rows, token_nll)
    count = torch.zeros(n_rows, device=logits.device).index_add_(0, batch.rows, torch.ones_like(token_nll))
    return total / count


ObjectiveBatch = PromptLastBatch | TargetBatch


def objective_batch(handle: ModelHandle, prompts: Sequence[str], targets: Sequence[str],
                    objective: str) -> ObjectiveBatch:
    """Inputs of the ``prompt_last`` (FT-L) or ``target_new`` (FT-M, FT) loss for these requests.

    ``target_new`` uses the shared teacher-forced batch of :mod:`editing.learning.learned` (``prompt +
    target``, only the target positions scored), the same tokenisation :mod:`editing.analysis.scoring` scores.
    """
    if objective == "prompt_last":
        return prompt_last_batch(handle, prompts, targets)
    return target_batch(handle, list(zip(prompts, targets, strict=True)))


def objective_loss(logits: torch.Tensor, batch: ObjectiveBatch) -> torch.Tensor:
    """Mean over requests of each request's mean target-token NLL (EasyEdit's reduction)."""
    if isinstance(batch, PromptLastBatch):
        return prompt_last_nll(logits, batch).mean()
    return target_nll(logits, batch).mean()


class _FineTuneBase(EditMethod):
    """Adam on the deltas of the chosen MLP weights; see the module docstring."""

    hparams_class: ClassVar[type[HParams]] = FTHParams
    edit_kind: ClassVar[str] = "weight_delta"

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, FTHParams)
        names = tuned_parameter_names(handle, hparams)
        params = {name: handle.parameter(name) for name in names}
        # float32 copies of the current weights: the optimiser works in float32 whatever the
        # model's dtype, and the shared parameters themselves are never written.
        originals = {name: p.detach().float() for name, p in params.items()}
        deltas = {name: torch.zeros_like(w, requires_grad=True) for name, w in originals.items()}
        optimizer = torch.optim.Adam(list(deltas.values()), lr=hparams.lr, weight_decay=hparams.weight_decay)
        eps = hparams.norm_constraint

        prompts = [r.text for r in requests]
        targets = [r.target_new for r in requests]
        chunks = [
            objective_batch(handle, prompts[i: i + hparams.batch_size], targets[i: i + hparams.batch_size],
                            hparams.objective)
            for i in range(0, len(requests), hparams.batch_size)
        ]

        def loss_of(chunk: ObjectiveBatch) -> torch.Tensor:
            weights = {name: (originals[name] + deltas[name]).to(params[name].dtype) for name in names}
            logits = functional_call(handle.model, weights, args=(), kwargs=chunk.model_inputs()).logits
            return objective_loss(logits, chunk)

        losses: list[float] = []
        steps_run = 0
        with torch.enable_grad():
            for step in range(hparams.steps):
                total = 0.0
                for chunk in chunks:
                    loss = loss_of(chunk)
                    value = loss.detach().item()
                    if not math.isfinite(value):  # NaN >= stop_loss is False: it would end as a zero edit
                        raise EditError(f"{self.name}'s loss became {value} at step {step + 1}; nothing was "
                                        f"applied. Try a lower lr (now {hparams.lr}).")
                    total += value * len(chunk)
                    # As in ROME/EasyEdit: a batch already fitted takes no step.
                    if value >= hparams.stop_loss:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        if eps is not None:
                            with torch.no_grad():  # projection onto the L∞ ball after every step
                                for delta in deltas.values():
                                    delta.clamp_(-eps, eps)
                mean_loss = total / len(requests)
                losses.append(mean_loss)
                steps_run = step + 1
                progress(steps_run / hparams.steps, f"{self.name}: step {steps_run}, loss {mean_loss:.4f}")
                if mean_loss < hparams.stop_loss:
                    break
            with torch.no_grad():
                final_loss = sum(float(loss_of(c)) * len(c) for c in chunks) / len(requests)

        stored = {name: ParamDelta(dense=delta.detach().clone()) for name, delta in deltas.items()}
        info = {
            "tuned_parameters": names,
            "layers": [int(layer) for layer in hparams.layers],
            "objective": hparams.objective,
            "steps_run": steps_run,
            "loss_first": losses[0],
            "loss_final": final_loss,
            "max_abs_delta": max(float(d.detach().abs().max()) for d in deltas.values()),
        }
        return WeightDelta(method=self.name, requests=list(requests), hparams=hparams.to_dict(),
                           deltas=stored, info=info)


@register
class FT(_FineTuneBase):
    """Plain fine-tuning of one layer's MLP on the edit prompts, without a constraint."""

    name: ClassVar[str] = "FT"
    hparams_class: ClassVar[type[HParams]] = FTHParams
    summary: ClassVar[str] = ("Unconstrained fine-tuning of a middle layer's MLP weights on the edit prompts "
                              "(teacher-forced loss on the target tokens).")


@register
class FTL(_FineTuneBase):
    """FT-L (Zhu et al. 2020): one layer's MLP output weights, L∞ constraint, ROME's prompt-last loss."""

    name: ClassVar[str] = "FT-L"
    hparams_class: ClassVar[type[HParams]] = FTLHParams
    summary: ClassVar[str] = ("Fine-tuning of one layer's MLP output weights inside an L∞ ball "
                              "‖θ − θ₀‖∞ ≤ ε; loss on the target read at the prompt's last position.")


@register
class FTM(_FineTuneBase):
    """FT-M (EasyEdit): FT-L with the teacher-forced loss on the target tokens only (prompt masked)."""

    name: ClassVar[str] = "FT-M"
    hparams_class: ClassVar[type[HParams]] = FTMHParams
    summary: ClassVar[str] = ("FT-L with a teacher-forced cross-entropy on the target tokens only, "
                              "the prompt's positions masked out.")
