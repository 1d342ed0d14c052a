"""ROME — Rank-One Model Editing (Meng et al., "Locating and Editing Factual Associations in GPT",
NeurIPS 2022; reference implementation kmeng01/rome).

One MLP output projection ``W`` (at ~0.35 of the depth, where causal tracing finds the subject's
facts) is treated as a key–value memory, and one new association ``k* → v*`` is inserted with
the rank-one update

    Ŵ = W + Λ uᵀ,   u = C⁻¹k* / |C⁻¹k*|,   Λ = (v* − W k) / (k · u)

where ``C = E[k kᵀ]`` is the second moment of keys over a corpus (:mod:`editing.analysis.stats`), ``k*`` is
the subject's key averaged over context templates (:mod:`editing.methods.context`) and ``v*`` is the MLP
output that makes the model say the new target (:func:`editing.methods.compute.optimise_values`).

Subtleties of the reference kept here (see :func:`compute_rome_update`):

* the key ``k`` of the denominator and of ``W k`` is the *bare* prompt's, while ``u`` uses the
  context-averaged ``k*``, so the update writes exactly ``v*`` for the bare prompt;
* ``u`` is normalised after applying ``C⁻¹`` (``mom2_adjustment=False`` skips ``C⁻¹``);
* prompts are right-padded and positions indexed explicitly; targets are ``" " + target`` without
  BOS; the KL term is taken at the subject's last token of ``"{} is a"``;
* ``C⁻¹k*`` is solved in float64 (the reference inverts in float32; the difference is rounding).

Several requests are written one after another, each computed with the earlier ones applied (as
the reference's ``apply_rome_to_model`` does); the edit stores the rank-r factors.

Where to edit follows ROME's own rule — edit where causal tracing locates the recall: the
subject's last token at ~0.35 of the depth for deep models (the paper's setting), but the
prompt's last token at layer 0 for shallow models such as the 4-layer demo model, which recalls
its facts there (:data:`SHALLOW_MAX_LAYERS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from editing.analysis.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES, corpus_defaults, second_moment
from editing.core.edit import Edit, WeightDelta
from editing.methods.base import EditMethod, HParams, ProgressFn, register, scaled_layer
from editing.methods.checks import (
    CONTEXT_TOKENS,
    COUNT,
    LAYER,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Choice,
    FieldCheck,
    Flag,
    Items,
    Number,
    Row,
    Text,
)
from editing.methods.compute import (
    FACT_TOKENS,
    ValueHParams,
    ValueResult,
    low_rank_delta,
    mlp_key_value,
    mlp_out_param,
    optimise_values,
)
from editing.methods.context import ROME_LENGTH_PARAMS, fill, rome_context_templates
from editing.methods.presets import ModelKey, shipped_presets

if TYPE_CHECKING:
    from editing.core.request import EditRequest
    from editing.models.loader import ModelHandle

#: ROME's layer as a fraction of depth: layer 17 of GPT-2 XL's 48
ROME_DEPTH_FRACTION = 17 / 48

#: Models up to this depth are edited at the prompt's last token, in the first layers. Causal
#: tracing of the 4-layer demo model (tests/editing/test_trace.py) finds its facts recalled at the
#: last token by the first MLP — restoring the subject's states brings back little — so a model
#: this shallow has no room for the subject enrichment ROME relies on in GPT-2 XL, and edits at the
#: subject's last token cannot change its answers (measured: under 1 % efficacy at any layer).
#: Only the demo model was traced; the bound 6 is a conservative guess for other small models.
SHALLOW_MAX_LAYERS = 6

#: the reference's settings for the models it was published with (GPT-2 XL, GPT-J), keyed by
#: (model_type, n_layers, d_model), as shipped in presets/ROME/*.json (a user's preset folder is
#: read by for_model, not here); every other model scales the layer with its depth
ROME_PRESETS: dict[ModelKey, dict[str, Any]] = shipped_presets("ROME")


#: the target-vector optimisation's settings, shared by ROME, MEMIT and AlphaEdit
VALUE_CHECKS: dict[str, FieldCheck] = {
    "v_num_grad_steps": COUNT,
    "v_lr": POSITIVE,
    "v_weight_decay": NON_NEGATIVE,
    "kl_factor": NON_NEGATIVE,
    "clamp_norm_factor": POSITIVE,  # |δ| ≤ clamp · |v_init|: zero or NaN leaves nothing to write
    "fact_token": Choice(FACT_TOKENS),
}
#: the second-moment statistics' corpus (a name, a file or "hf:...") and sample count
STATS_CHECKS: dict[str, FieldCheck] = {"mom2_corpus": Text(empty_ok=False), "mom2_n_samples": COUNT}
#: context templates sampled per length (the reference samples 10)
TEMPLATE_COUNT = Number(1, 100, whole=True)


def is_shallow(handle: ModelHandle) -> bool:
    """True for models edited at the last token (see :data:`SHALLOW_MAX_LAYERS`)."""
    return handle.n_layers <= SHALLOW_MAX_LAYERS


@dataclass
class ROMEHyperParams(HParams):
    """ROME's settings; names follow the reference's ``ROMEHyperParams``."""

    layer: int = 5
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    fact_token: str = "subject_last"  # the lookup position: subject_last, subject_first or last
    mom2_adjustment: bool = True
    mom2_corpus: str = DEFAULT_CORPUS
    mom2_n_samples: int = DEFAULT_SAMPLES
    context_template_length_params: list[list[int]] = field(
        default_factory=lambda: [list(p) for p in ROME_LENGTH_PARAMS])
    context_seed: int = 0

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layer": LAYER,
        **VALUE_CHECKS,
        "mom2_adjustment": Flag(),
        **STATS_CHECKS,
        # (tokens, count) pairs: each sampled text must leave room for the prompt and its target
        "context_template_length_params": Items(Row((CONTEXT_TOKENS, TEMPLATE_COUNT), ("tokens", "count"))),
        "context_seed": SEED,
    }

    preset_names: ClassVar[tuple[str, ...]] = ("ROME",)

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> ROMEHyperParams:
        """The subject's last token at 17/48 of the depth for deep models (SmolLM2-135M: layer 11
        of 30, confirmed by causal tracing, see scripts/smollm2_study.py); the last token at layer
        0 for shallow ones (the 4-layer demo model, where causal tracing puts the recall, see
        :data:`SHALLOW_MAX_LAYERS`). GPT-2 XL and GPT-J take the reference's layer from their
        preset files (presets/ROME/).

        Statistics come from real prose for models with an open vocabulary and from the bundled
        corpus for the demo model (:func:`editing.analysis.stats.corpus_defaults`)."""
        corpus = corpus_defaults(handle)
        if is_shallow(handle):
            return cls(layer=0, fact_token="last", **corpus)
        return cls(layer=scaled_layer(handle.n_layers, ROME_DEPTH_FRACTION), **corpus)


@dataclass
class RomeUpdate:
    """Every intermediate quantity of one ROME update (float32, on the edited layer's device).

    Names follow the paper and kmeng01/rome: ``u`` is the reference's ``left_vector``, ``right``
    its ``right_vector``; ``v_star`` is ``target`` in ``compute_v`` and ``v_current`` its
    ``cur_output``.
    """

    request: EditRequest
    layer: int
    param_name: str
    k_star: torch.Tensor  # (d_ff,) key averaged over the context templates
    k_bare: torch.Tensor  # (d_ff,) key of the bare prompt (used in the denominator)
    u: torch.Tensor  # (d_ff,) C⁻¹k* normalised (k*/|k*| without mom2_adjustment)
    v_init: torch.Tensor  # (d_model,) MLP output before optimisation
    v_star: torch.Tensor  # (d_model,) optimised MLP output
    v_current: torch.Tensor  # (d_model,) W k_bare + b
    right: torch.Tensor  # (d_model,) (v* − v_current) / (k_bare · u)
    target_prob: float  # mean P(target) over the context prompts at the end of the optimisation

    def update_out_in(self) -> torch.Tensor:
        """ΔW as a dense ``(d_model, d_ff)`` matrix: ``right ⊗ u``."""
        return torch.outer(self.right, self.u)


def compute_rome_updates(handle: ModelHandle, requests: list[EditRequest], hparams: ROMEHyperParams | None = None,
                         second_moment_matrix: torch.Tensor | None = None,
                         context_templates: list[str] | None = None,
                         progress: ProgressFn | None = None, values: ValueResult | None = None) -> list[RomeUpdate]:
    """Compute (not apply) ROME's update for each request *independently*, all against the model's
    current weights (their ``v*`` are optimised in one batch; see
    :func:`editing.methods.compute.optimise_values`). :class:`ROME` itself writes several requests one
    after another; this is for evaluating many single edits quickly.

    ``second_moment_matrix`` (``C``, ``(d_ff, d_ff)``) and ``context_templates`` (``"{}"`` first,
    each holding one ``{}``) default to :func:`editing.analysis.stats.second_moment` and
    :func:`editing.methods.context.rome_context_templates`; pass the reference's own to compare updates
    number for number (docs/reference-comparison.md). ``values`` are ``v*`` already optimised for
    these requests, layer and templates (:func:`editing.methods.compute.optimise_values`, site ``"mlp"``),
    e.g. to compare statistics without re-optimising (scripts/smollm2_study.py).
    """
    hp = hparams or ROMEHyperParams.for_model(handle)
    layer = hp.layer
    progress = progress or (lambda _f, _m: None)
    if context_templates is None:
        context_templates = rome_context_templates(handle, hp.context_template_length_params, hp.context_seed)
    if not context_templates or context_templates[0] != "{}":
        raise ValueError('ROME context templates start with the bare "{}".')
    # k*: each subject's key averaged over all context templates (the reference's compute_u).
    templates = [fill(t, r.prompt) for r in requests for t in context_templates]
    subjects = [r.subject for r in requests for _ in context_templates]
    keys, _ = mlp_key_value(handle, layer, templates, subjects, hp.fact_token)
    k_star = keys.view(len(requests), len(context_templates), -1).mean(1)
    if hp.mom2_adjustment:
        if second_moment_matrix is None:
            second_moment_matrix = second_moment(
                handle, layer, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples,
                progress=lambda f, m: progress(0.3 * f, m))
        c = second_moment_matrix.to(k_star.device, torch.float64)
        u = torch.linalg.solve(c, k_star.double().T).T.float()
    else:
        u = k_star.clone()
    u = u / u.norm(dim=1, keepdim=True)
    if values is None:
        values = optimise_values(handle, requests, layer, "mlp", context_templates, ValueHParams.of(hp),
                                 progress=lambda f, m: progress(0.3 + 0.65 * f, m))
    elif values.target.shape[0] != len(requests):
        raise ValueError(f"{values.target.shape[0]} precomputed values for {len(requests)} requests.")
    # The bare prompt's key and current output: the update then maps exactly k_bare -> v*.
    k_bare, v_current = mlp_key_value(handle, layer, [r.prompt for r in requests], [r.subject for r in requests],
                                      hp.fact_token)
    updates = []
    for i, request in enumerate(requests):
        right = (values.target[i] - v_current[i]) / torch.dot(k_bare[i], u[i])
        updates.append(RomeUpdate(
            request=request, layer=layer, param_name=mlp_out_param(handle, layer), k_star=k_star[i],
            k_bare=k_bare[i], u=u[i], v_init=values.init[i], v_star=values.target[i], v_current=v_current[i],
            right=right, target_prob=values.target_prob[i]))
    return updates


def compute_rome_update(handle: ModelHandle, request: EditRequest, hparams: ROMEHyperParams | None = None,
                        second_moment_matrix: torch.Tensor | None = None,
                        context_templates: list[str] | None = None,
                        progress: ProgressFn | None = None) -> RomeUpdate:
    """Compute (not apply) ROME's update for one request against the model's current weights.

    Returns every intermediate quantity (:class:`RomeUpdate`). ``second_moment_matrix`` and
    ``context_templates`` default as in :func:`compute_rome_updates`; pass the reference's own to
    compare number for number (docs/reference-comparison.md).
    """
    return compute_rome_updates(handle, [request], hparams, second_moment_matrix, context_templates, progress)[0]


def rome_edit(handle: ModelHandle, updates: list[RomeUpdate], hparams: ROMEHyperParams) -> WeightDelta:
    """The (unapplied) edit writing ``updates`` into their layer, stored as rank-r factors."""
    name = updates[0].param_name
    delta = low_rank_delta(handle, name, torch.stack([u.right for u in updates], 1),
                           torch.stack([u.u for u in updates], 1))
    info = {
        "layer": updates[0].layer,
        "target_prob": [u.target_prob for u in updates],
        "delta_norm": [float((u.v_star - u.v_current).norm()) for u in updates],
    }
    return WeightDelta(method=ROME.name, requests=[u.request for u in updates], hparams=hparams.to_dict(),
                       deltas={name: delta}, info=info)


@register
class ROME(EditMethod):
    """Rank-one update of one MLP output projection per fact."""

    name = "ROME"
    hparams_class = ROMEHyperParams
    edit_kind = "weight_delta"
    summary = "Rank-one update of one mid-layer MLP projection: inserts key k* → value v* (Meng et al., 2022)."

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, ROMEHyperParams)
        updates: list[RomeUpdate] = []
        applied: list[WeightDelta] = []
        try:
            for index, request in enumerate(requests):
                def step_progress(fraction: float, message: str, _i: int = index) -> None:
                    progress((_i + fraction) / len(requests), f"ROME edit {_i + 1}/{len(requests)}: {message}")

                update = compute_rome_update(handle, request, hparams, progress=step_progress)
                updates.append(update)
                if index < len(requests) - 1:
                    # Later requests are computed against the model with the earlier ones written.
                    step = WeightDelta(method="ROME (computing)", requests=[request], hparams={}, deltas={
                        update.param_name: low_rank_delta(handle, update.param_name, update.right[:, None],
                                                          update.u[:, None])})
                    step.apply(handle)
                    applied.append(step)
        finally:
            for step in reversed(applied):
                step.revert(handle)
        return rome_edit(handle, updates, hparams)
