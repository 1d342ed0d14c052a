"""MEMIT — Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023; reference kmeng01/memit).

Many facts at once, spread over a range of MLP output projections ("the critical path"):

1. for each request, a residual-stream target ``z`` at the *last* layer of the range is optimised
   so the model predicts the new target (:func:`editing.methods.compute.optimise_values`, site "block",
   the same objective as ROME's ``v*`` with MEMIT's tighter norm clamp);
2. for each layer ``l`` of the range, lowest first, with the updates of earlier layers in place:
   keys ``K`` (averaged over the bare prompt and a group of sampled prefixes), the remaining error
   ``R = (z − z_current) / (layers left)``, and the least-squares update

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹        (C = E[k kᵀ] from :mod:`editing.analysis.stats`, solved in float64)

   applied before the next layer's keys are read (:func:`editing.methods.compute.spread_residuals`).

The edit stores one low-rank ``ParamDelta`` per layer (``R`` and ``(λC + KKᵀ)⁻¹K``, like the
reference's ``deltas``), or the dense matrix when that is smaller. Shallow models (the demo) are
edited at the prompt's last token with λ scaled to ``d_ff`` (:func:`shallow_settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from editing.analysis.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES, corpus_defaults, second_moments
from editing.core.edit import Edit, ParamDelta, WeightDelta
from editing.methods.base import EditMethod, HParams, ProgressFn, register, scaled_layer
from editing.methods.checks import CONTEXT_TOKENS, LAYERS, POSITIVE, SEED, TEXTS, FieldCheck
from editing.methods.compute import (
    LayerSolver,
    LayerUpdate,
    ValueHParams,
    mlp_out_param,
    optimise_values,
    spread_residuals,
)
from editing.methods.context import MEMIT_LENGTH, MEMIT_STARTS, memit_context_templates
from editing.methods.presets import ModelKey, shipped_presets
from editing.methods.rome import STATS_CHECKS, VALUE_CHECKS, is_shallow

if TYPE_CHECKING:
    from editing.core.request import EditRequest
    from editing.models.loader import ModelHandle

#: MEMIT's range as fractions of depth: layers 13..17 of GPT-2 XL's 48
MEMIT_DEPTH_RANGE = (13 / 48, 17 / 48)

#: reference settings for the models MEMIT was published with (GPT-2 XL, GPT-J), keyed by
#: (model_type, n_layers, d_model), as shipped in presets/MEMIT/*.json (AlphaEdit uses them too)
MEMIT_PRESETS: dict[ModelKey, dict[str, Any]] = shipped_presets("MEMIT")


def memit_layers(n_layers: int) -> list[int]:
    """The critical-path range scaled to a depth: 13..17 of 48 layers, widened to at least two
    layers (one layer would make MEMIT a batched ROME). On the 4-layer demo model: layers 0..1."""
    first, last = (scaled_layer(n_layers, f) for f in MEMIT_DEPTH_RANGE)
    if last == first:
        first = max(0, last - 1)
        last = max(last, first + 1) if n_layers > 1 else last
    return list(range(first, last + 1))


#: λ / d_ff for keys at the last token (shallow models). A key drawn from the statistics'
#: distribution has E[kᵀC⁻¹k] = tr(C⁻¹C) = d_ff, so the share of its residual one update writes,
#: (kᵀ(λC)⁻¹k) / (1 + kᵀ(λC)⁻¹k) ≈ 1 / (1 + λ/d_ff), depends on λ/d_ff only: 1/40 writes ≈ 97 %.
#: Last-token keys are typical of the corpus (every fact sentence has one), unlike the rarer
#: subject keys of large models for which the reference's λ = 15,000–20,000 was tuned; with
#: λ = 15,000 on the demo model a batch of 20 edits reaches under 5 % efficacy, with d_ff/40 all.
SHALLOW_LAMBDA_PER_DFF = 1 / 40


#: λ / d_ff for deep models without a reference preset: GPT-J's 15,000 / 16,384. λ weighs the
#: per-token second moment C against the edits' own keys, and the share of a key's residual one
#: update writes grows with kᵀ(λC)⁻¹k, which grows with d_ff: a fixed λ = 15,000 barely writes into
#: a narrow MLP. Measured on SmolLM2-135M (d_ff 1536, layers 8-11, 10 edits at once,
#: scripts/smollm2_study.py memit): λ = 15,000 -> efficacy 2/10, 4,800 -> 6/10, 1,500 -> 10/10.
DEEP_LAMBDA_PER_DFF = 15000 / 16384


def deep_lambda(handle: ModelHandle) -> float:
    """MEMIT's λ for a deep model without a preset: d_ff × :data:`DEEP_LAMBDA_PER_DFF` (1,406 on SmolLM2)."""
    return round(handle.d_ff * DEEP_LAMBDA_PER_DFF)


def shallow_settings(handle: ModelHandle) -> dict:
    """Overrides for shallow models (see :data:`editing.methods.rome.SHALLOW_MAX_LAYERS`): key on
    the prompt's last token, λ = d_ff / 40."""
    if not is_shallow(handle):
        return {}
    return {"fact_token": "last", "mom2_update_weight": handle.d_ff * SHALLOW_LAMBDA_PER_DFF}


@dataclass
class MEMITHyperParams(HParams):
    """MEMIT's settings; names follow the reference's ``MEMITHyperParams``."""

    layers: list[int] = field(default_factory=lambda: [0, 1])
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    fact_token: str = "subject_last"  # the lookup position: subject_last, subject_first or last
    mom2_update_weight: float = 15000.0  # λ
    mom2_corpus: str = DEFAULT_CORPUS
    mom2_n_samples: int = DEFAULT_SAMPLES
    context_length: int = MEMIT_LENGTH
    context_starts: list[str] = field(default_factory=lambda: list(MEMIT_STARTS))
    context_seed: int = 0

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layers": LAYERS,
        **VALUE_CHECKS,
        # λ ≤ 0 does not weigh the old keys at all: (λC + KKᵀ)⁻¹ is then no MEMIT update (a huge
        # negative λ writes nothing and would still be reported as an edit)
        "mom2_update_weight": POSITIVE,
        **STATS_CHECKS,
        "context_length": CONTEXT_TOKENS,
        "context_starts": TEXTS,
        "context_seed": SEED,
    }

    preset_names: ClassVar[tuple[str, ...]] = ("MEMIT",)

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> MEMITHyperParams:
        """The depth-scaled range (SmolLM2: layers 8-11 of 30) with λ scaled to d_ff
        (:func:`deep_lambda`), keyed on the last token with a λ of its own for shallow models
        (:func:`shallow_settings`). GPT-2 XL and GPT-J take the reference's layers and λ from their
        preset files (presets/MEMIT/)."""
        corpus = corpus_defaults(handle)  # real prose for real models, the bundled corpus for the demo
        settings = shallow_settings(handle) or {"mom2_update_weight": float(deep_lambda(handle))}
        return cls(layers=memit_layers(handle.n_layers), **settings, **corpus)


@dataclass
class MemitUpdate:
    """Every intermediate quantity of a MEMIT update (float32; each layer's on its device, ``z`` on
    the last layer's)."""

    requests: list[EditRequest]
    layers: list[int]
    z: torch.Tensor  # (n, d_model) residual targets at the last layer (the reference's zs, transposed)
    z_init: torch.Tensor  # (n, d_model) residuals before optimisation
    target_prob: list[float]
    layer_updates: list[LayerUpdate]  # per layer: keys, residual share, adjusted keys, ΔW
    param_names: dict[int, str]  # layer -> name of the MLP output projection's weight
    # keys read with the update applied (for AlphaEdit): context-averaged, and of the bare prompts
    keys_after: dict[int, torch.Tensor] = field(default_factory=dict)
    bare_keys_after: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def deltas(self) -> dict[str, ParamDelta]:
        """Parameter name -> ΔW in storage shape, one per layer."""
        return {self.param_names[u.layer]: u.delta for u in self.layer_updates}


def memit_solver(handle: ModelHandle, moments: dict[int, torch.Tensor], weight: float) -> LayerSolver:
    """MEMIT's per-layer solve: ``(λC + K Kᵀ)⁻¹ K`` in float64."""
    def solve(layer: int, keys: torch.Tensor, _resid: torch.Tensor) -> torch.Tensor:
        c = moments[layer].to(keys.device, torch.float64)
        return torch.linalg.solve(weight * c + keys @ keys.T, keys)

    return solve


def compute_memit_update(handle: ModelHandle, requests: list[EditRequest], hparams: MEMITHyperParams | None = None,
                         second_moments_by_layer: dict[int, torch.Tensor] | None = None,
                         context_templates: list[list[str]] | None = None, progress: ProgressFn | None = None,
                         solver: LayerSolver | None = None, method: str = "MEMIT",
                         keys_after: bool = False) -> MemitUpdate:
    """Compute (not apply) MEMIT's update for ``requests`` against the model's current weights.

    ``second_moments_by_layer`` (layer -> ``C``) and ``context_templates`` (``[["{}"], [prefixed,
    ...]]``) default to :func:`editing.analysis.stats.second_moments` and
    :func:`editing.methods.context.memit_context_templates`; pass the reference's to compare number for
    number. ``solver`` replaces MEMIT's per-layer solve (AlphaEdit). The model is left as found.
    """
    hp = hparams or MEMITHyperParams.for_model(handle)
    progress = progress or (lambda _f, _m: None)
    layers = sorted(hp.layers)
    if context_templates is None:
        context_templates = memit_context_templates(handle, hp.context_length, hp.context_starts, hp.context_seed)
    if solver is None:
        if second_moments_by_layer is None:
            second_moments_by_layer = second_moments(handle, layers, corpus=hp.mom2_corpus,
                                                     n_samples=hp.mom2_n_samples,
                                                     progress=lambda f, m: progress(0.2 * f, m))
        solver = memit_solver(handle, second_moments_by_layer, hp.mom2_update_weight)
    flat = [t for group in context_templates for t in group]
    values = optimise_values(handle, requests, layers[-1], "block", flat, ValueHParams.of(hp),
                             progress=lambda f, m: progress(0.2 + 0.6 * f, f"{method}: {m}"))
    spread = spread_residuals(handle, requests, layers, values.target, context_templates, solver, method,
                              progress=lambda f, m: progress(0.8 + 0.2 * f, m), keys_after=keys_after,
                              fact_token=hp.fact_token)
    return MemitUpdate(requests=list(requests), layers=layers, z=values.target, z_init=values.init,
                       target_prob=values.target_prob, layer_updates=spread.updates,
                       param_names={layer: mlp_out_param(handle, layer) for layer in layers},
                       keys_after=spread.keys_after, bare_keys_after=spread.bare_keys_after)


@register
class MEMIT(EditMethod):
    """Batch editing spread over a range of MLP output projections."""

    name = "MEMIT"
    hparams_class = MEMITHyperParams
    edit_kind = "weight_delta"
    summary = ("Writes many facts at once: residual targets at the top of a layer range, spread over "
               "its MLP projections by least squares (Meng et al., 2023).")

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, MEMITHyperParams)
        update = compute_memit_update(handle, requests, hparams, progress=progress)
        return WeightDelta(method=self.name, requests=list(requests), hparams=hparams.to_dict(),
                           deltas=update.deltas, info=memit_info(update))


def memit_info(update: MemitUpdate) -> dict:
    """JSON summary of an update for the edit's ``info``."""
    return {
        "layers": update.layers,
        "target_prob": update.target_prob,
        "z_delta_norm": [float(v) for v in (update.z - update.z_init).norm(dim=1)],
    }
