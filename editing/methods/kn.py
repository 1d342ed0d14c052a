"""Knowledge Neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers").

1. **Attribution.** For each prompt expressing the fact, the integrated gradient of
   P(answer's first token) with respect to every FFN intermediate activation (the input of the
   MLP output projection) at the prompt's last position::

       Attr(a_i) = a_i / m · Σ_{k=1..m} ∂P(answer | a_i ← k/m · a_i) / ∂a_i

   with m = ``steps`` (the paper's Riemann sum, m = 20). As in the authors' code, every
   neuron of one layer is scaled at once and the gradient taken for all of them in one
   backward pass (the paper's formula scales one neuron at a time, which costs d_ff times more).
2. **Refinement.** Per prompt, keep neurons whose attribution exceeds
   ``attribution_threshold`` × that prompt's largest attribution over all layers (t = 0.2 max);
   then keep the neurons kept for at least ``share_threshold`` (p) of the prompts. The prompts
   are the edit prompt plus up to ``n_paraphrases`` of its relation's *training* templates in the
   bundled fact base, filled with the subject (:func:`editing.methods.patching.training_prompts`; held-out
   templates stay unseen, for measuring generalisation). An edit outside the fact base's
   relations is attributed on its own prompt only.
3. **Edit ("erase and update").** Each knowledge neuron's value vector — its column of the MLP
   output projection — becomes ``v − λ1·‖v‖·ê_old + λ2·‖v‖·ê_new``, where ê are the unit
   embeddings of the old and new answers' first tokens (λ1 = 1, λ2 = 8, normalised to the
   value vector's norm as in the authors' editing script).

The update is stored as low-rank factors per layer: the changed value vectors (d_model × k)
times k one-hot selection rows (k × d_ff), transposed for GPT-2's Conv1D storage.

Simplifications and choices, also listed in the README:

* Only the answer's first token is attributed and written (the paper's ParaRel answers are
  single tokens).
* The embeddings are rows of the output embedding (LM head); for tied models (GPT-2, the demo
  model) that is the word embedding the paper uses, and for untied models it is the vector the
  last position is read out with.
* The change is multiplied by the sign of the neuron's activation on the edit prompt, so a
  neuron that fires negatively (possible with SwiGLU) still pushes towards the new answer; for
  GELU neurons attributed positively the activation is positive and nothing changes.
* p adapts as in the authors' code (from 0.7, in steps of 0.05, to leave 2–5 neurons), but per
  edit rather than on average over a relation. A single edit has only a handful of prompts, so
  shares come in coarse steps: when more than ``max_neurons`` remain even at p = 1 the ones with
  the largest mean attribution are kept, and when none reaches p, p drops to the largest share
  any neuron has (the p used is in ``edit.info``). An edit is therefore never empty, unless no
  neuron has a positive attribution at all, which is reported as an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from editing.analysis.scoring import last_token_logprobs
from editing.core.edit import Edit, EditError, ParamDelta, WeightDelta
from editing.core.hooks import at_positions, capture, forward_until, modify
from editing.core.request import EditRequest
from editing.methods.base import EditMethod, HParams, ProgressFn, no_progress, register
from editing.methods.checks import (
    COUNT,
    LAYERS,
    NON_NEGATIVE,
    NON_NEGATIVE_COUNT,
    POSITIVE,
    FieldCheck,
    InvalidHParams,
    Number,
)
from editing.methods.patching import training_prompts
from editing.models.loader import ModelHandle
from editing.models.tokens import encode, pad_batch, pad_id, target_ids


@dataclass
class KNHParams(HParams):
    """Hyper-parameters of KN (defaults: the paper's t = 0.2·max, m = 20, λ1 = 1, λ2 = 8).

    ``layers`` are the layers whose FFN neurons are attributed (default: all, as in the paper).
    ``n_paraphrases`` bounds how many fact-base templates join the edit prompt for refinement.
    """

    layers: tuple[int, ...] = ()
    steps: int = 20
    attribution_threshold: float = 0.2
    share_threshold: float = 0.7
    min_neurons: int = 2
    max_neurons: int = 5
    n_paraphrases: int = 5
    erase_scale: float = 1.0
    update_scale: float = 8.0
    batch_size: int = 128

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layers": LAYERS,
        "steps": COUNT,
        "attribution_threshold": Number(0, 1, low_open=True, why="a fraction of the largest attribution"),
        "share_threshold": Number(0, 1, why="a fraction of the prompts"),
        "min_neurons": COUNT,
        "max_neurons": COUNT,
        "n_paraphrases": NON_NEGATIVE_COUNT,
        "erase_scale": NON_NEGATIVE,
        "update_scale": POSITIVE,  # zero would write nothing and still be reported as an edit
        "batch_size": COUNT,
    }

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> KNHParams:
        """Attribute every layer of ``handle``'s model."""
        return cls(layers=tuple(range(handle.n_layers)))

    def validate_together(self, handle: ModelHandle | None) -> None:
        if self.min_neurons > self.max_neurons:
            raise InvalidHParams(f"Hyper-parameter min_neurons ({self.min_neurons}) must not exceed max_neurons "
                                 f"({self.max_neurons}).")


def last_position_logits(handle: ModelHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """``(rows, vocab)`` logits at one position per row, keeping the autograd graph.

    The forward pass stops after the final norm and the LM head runs only where it is read: the
    full ``(rows, seq, vocab)`` logits of a large vocabulary would dominate memory here.
    """
    final_norm = handle.arch.final_norm
    with capture(handle.model, [final_norm], detach=False) as store:
        forward_until(handle.model, final_norm, input_ids=input_ids, attention_mask=attention_mask)
    hidden = store[final_norm]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    # gathered where the norm ran; only those rows move to the head's device
    at_last = at_positions(hidden, rows, positions).to(handle.module_device(handle.arch.lm_head))
    return handle.module(handle.arch.lm_head)(at_last)


def neuron_attributions(handle: ModelHandle, prompts: Sequence[str], answer_ids: Sequence[int],
                        layers: Sequence[int], steps: int = 20, batch_size: int = 128,
                        progress: ProgressFn = no_progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated-gradients attribution of FFN neurons at each prompt's last position.

    Returns ``(attributions, activations)``, both ``(n_prompts, len(layers), d_ff)`` float32:
    the attribution of P(``answer_ids[p]`` | prompt p) to every intermediate neuron of each
    layer, and the neurons' activations on the unmodified model. Gradients flow to a leaf tensor
    of scaled activations spliced in with :func:`editing.core.hooks.modify`; the model's parameters
    are never given gradients. All (prompt, step) pairs of a layer run as one batch (chunked by
    ``batch_size``).
    """
    if len(prompts) != len(answer_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(answer_ids)} answers.")
    model, arch, tok = handle.model, handle.arch, handle.tokenizer
    device = handle.device
    base = pad_batch([encode(tok, p) for p in prompts], pad_id(tok), device)
    last = torch.tensor([n - 1 for n in base.lengths], device=device)
    n_prompts = len(prompts)
    everyone = torch.arange(n_prompts, device=device)
    names = [arch.mlp_out_name(int(layer)) for layer in layers]
    deepest = arch.mlp_out_name(max(int(layer) for layer in layers))
    with torch.no_grad(), capture(model, names, inputs=True) as store:
        forward_until(model, deepest, **base.model_inputs())
    # each layer's neurons on their own device, gathered on the model's (its first) device
    activations = torch.stack([at_positions(store[name], everyone, last).float().to(device) for name in names], dim=1)

    # Each prompt appears ``steps`` times, scaled by alpha = k / steps for k = 1..steps; prompts go
    # shortest first so that a chunk of rows pads to similar lengths.
    by_length = torch.tensor(sorted(range(n_prompts), key=lambda i: base.lengths[i]), device=device)
    prompt_of_row = by_length.repeat_interleave(steps)
    alpha_of_row = (torch.arange(n_prompts * steps, device=device) % steps + 1).float() / steps
    answers = torch.tensor(list(answer_ids), device=device)
    attributions = torch.zeros_like(activations)
    n_chunks = math.ceil(len(prompt_of_row) / batch_size)
    for li, name in enumerate(names):
        grad_sum = torch.zeros(n_prompts, activations.shape[-1], device=device)
        for chunk in range(n_chunks):
            rows = slice(chunk * batch_size, (chunk + 1) * batch_size)
            owners = prompt_of_row[rows]
            width = int(max(base.lengths[i] for i in owners.tolist()))
            positions = last[owners]
            scaled = (alpha_of_row[rows, None] * activations[owners, li]).requires_grad_(True)
            picks = torch.arange(len(owners), device=device)

            def splice(hidden: torch.Tensor, scaled=scaled, positions=positions, picks=picks) -> torch.Tensor:
                hidden = hidden.clone()  # the layer's input: still on the previous layer's device
                hidden[picks.to(hidden.device), positions.to(hidden.device)] = scaled.to(hidden.device, hidden.dtype)
                return hidden

            with torch.enable_grad(), modify(model, name, splice, inputs=True):
                logits = last_position_logits(handle, base.input_ids[owners, :width],
                                              base.attention_mask[owners, :width], positions)
                prob = logits.float().to(device).softmax(-1)[picks, answers[owners]]
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
            grad_sum.index_add_(0, owners, grad.float())
        attributions[:, li] = activations[:, li] * grad_sum / steps
        progress((li + 1) / len(names), f"KN: attributed layer {layers[li]}")
    return attributions, activations


def refine_neurons(attributions: torch.Tensor, attribution_threshold: float, share_threshold: float,
                   min_neurons: int = 2, max_neurons: int = 5) -> tuple[list[tuple[int, int]], torch.Tensor, float]:
    """The paper's coarse-then-refine selection, with the authors' adaptive sharing threshold.

    ``attributions`` is ``(n_prompts, n_layers, d_ff)``. A neuron is *coarse* for a prompt when
    its attribution exceeds ``attribution_threshold`` × that prompt's largest attribution; it is
    kept when it is coarse for at least a share p of the prompts. As in the authors' code, p
    starts at ``share_threshold`` and moves by 0.05 (at most 6 times) until between
    ``min_neurons`` and ``max_neurons`` neurons remain. With few prompts shares are coarse steps,
    so if more than ``max_neurons`` still remain the ones with the largest mean attribution are
    kept (our addition); if none reaches p, p drops to the largest share any neuron has.

    Returns the kept ``(layer position, neuron)`` pairs (layer position indexes the attributed
    layers), the share of prompts each neuron is coarse for (``(n_layers, d_ff)``), and the p used.
    """
    n_prompts = attributions.shape[0]
    peak = attributions.flatten(1).max(dim=1).values.clamp_min(0)
    coarse = (attributions > (attribution_threshold * peak)[:, None, None]) & (attributions > 0)
    share = coarse.float().sum(0) / n_prompts
    tolerance = 1e-6  # shares are k / n_prompts; p moves in float steps of 0.05

    def selected(p: float) -> torch.Tensor:
        return (share >= p - tolerance) & (share > 0)

    used = share_threshold
    for _ in range(6):
        count = int(selected(used).sum())
        if count < min_neurons and used > 0.05:
            used = round(used - 0.05, 10)
        elif count > max_neurons and used < 1.0:
            used = round(min(1.0, used + 0.05), 10)
        else:
            break
    if not bool(selected(used).any()):
        used = float(share.max())  # nobody reaches p: keep the most shared neurons instead
    mask = selected(used)
    kept = mask.nonzero()
    if len(kept) > max_neurons:
        mean_attribution = attributions.mean(0)[mask]
        kept = kept[mean_attribution.topk(max_neurons).indices]
    pairs = sorted((int(layer), int(neuron)) for layer, neuron in kept.tolist())
    return pairs, share, used


@register
class KN(EditMethod):
    """Knowledge Neurons: integrated-gradients attribution of FFN neurons, value-vector edit."""

    name: ClassVar[str] = "KN"
    hparams_class: ClassVar[type[HParams]] = KNHParams
    edit_kind: ClassVar[str] = "weight_delta"
    summary: ClassVar[str] = ("Finds the FFN neurons that express the fact by integrated gradients over "
                              "paraphrases, then rewrites their value vectors: − old answer + new answer embedding.")

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, KNHParams)
        arch, tok = handle.arch, handle.tokenizer
        layers = [int(layer) for layer in hparams.layers]
        unembed = handle.module(arch.lm_head).weight.detach().float()  # (vocab, d_model)
        # per layer: the changed value vectors (out-in view columns) and the neuron indices
        changes: dict[int, list[tuple[int, torch.Tensor]]] = {}
        neurons_info: list[dict] = []
        per_request: list[dict] = []
        for index, request in enumerate(requests):
            prompts = training_prompts(request, hparams.n_paraphrases + 1)
            new_id = target_ids(tok, request.text, request.target_new)[0]
            if request.target_true is not None:
                old_id = target_ids(tok, request.text, request.target_true)[0]
                answers = [target_ids(tok, p, request.target_true)[0] for p in prompts]
            else:  # no true answer given: the model's own prediction is what gets rewritten
                old_id = int(last_token_logprobs(handle, [request.text])[0].argmax())
                answers = [old_id] * len(prompts)

            def report(fraction: float, message: str, index: int = index) -> None:
                progress((index + fraction) / len(requests) * 0.95, message)

            attributions, activations = neuron_attributions(handle, prompts, answers, layers, hparams.steps,
                                                            hparams.batch_size, report)
            kept, share, used = refine_neurons(attributions, hparams.attribution_threshold,
                                               hparams.share_threshold, hparams.min_neurons, hparams.max_neurons)
            if not kept:
                raise EditError(f"KN found no neuron with a positive attribution to {request.target_true!r} "
                                f"for {request.text!r}; nothing to edit.")
            direction = (hparams.update_scale * _unit(unembed[new_id])
                         - hparams.erase_scale * _unit(unembed[old_id]))
            for layer_pos, neuron in kept:
                layer = layers[layer_pos]
                value = arch.mlp_out_weight(handle.model, layer)[:, neuron].detach().float()
                sign = -1.0 if float(activations[0, layer_pos, neuron]) < 0 else 1.0
                changes.setdefault(layer, []).append((neuron, sign * value.norm() * direction.to(value.device)))
                neurons_info.append({
                    "request": index, "layer": layer, "neuron": neuron,
                    "attribution": float(attributions[:, layer_pos, neuron].mean()),
                    "share": float(share[layer_pos, neuron]),
                    "activation": float(activations[0, layer_pos, neuron]),
                })
            per_request.append({
                "prompts": prompts, "share_threshold_used": used, "n_neurons": len(kept),
                "old_token": tok.decode([old_id]).strip(), "new_token": tok.decode([new_id]).strip(),
            })

        deltas = {f"{arch.mlp_out_name(layer)}.weight": _layer_delta(handle, layer, items)
                  for layer, items in sorted(changes.items())}
        info = {
            "neurons": neurons_info,
            "layers": sorted(changes),
            "requests": per_request,
        }
        return WeightDelta(method=self.name, requests=list(requests), hparams=hparams.to_dict(),
                           deltas=deltas, info=info)


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm().clamp_min(1e-12)


def _layer_delta(handle: ModelHandle, layer: int, items: list[tuple[int, torch.Tensor]]) -> ParamDelta:
    """Low-rank delta of one MLP output projection: value-vector changes × one-hot selection rows."""
    d_ff = handle.d_ff
    values = torch.stack([change for _, change in items], dim=1)  # (d_model, k)
    select = torch.zeros(len(items), d_ff, device=values.device)  # (k, d_ff)
    neurons = torch.tensor([neuron for neuron, _ in items], device=values.device)
    select[torch.arange(len(items), device=values.device), neurons] = 1.0
    if handle.arch.conv1d:  # Conv1D stores (in, out) = (d_ff, d_model): transpose the product
        return ParamDelta.low_rank(select.T.contiguous(), values.T.contiguous())
    return ParamDelta.low_rank(values, select)
