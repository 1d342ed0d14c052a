"""CaliNET (Dong et al., Findings of EMNLP 2022, "Calibrating Factual Knowledge in Pretrained
Language Models").

A small calibration FFN ("calibration memory slots", 64 neurons by default as in the paper's
main setting) runs in parallel with the FFN of the chosen layer(s): the layer's FFN output
becomes ``FFN(h) + V_c act(K_c h)`` with the FFN's own activation (gated like the FFN on
LLaMA-style models, ``V_c (act(G_c h) * K_c h)``), at every position. The base model is frozen;
only ``K_c`` and ``V_c`` are trained, for a whole batch of facts at once (hundreds in the paper),
on constructed data: each fact is asked with several templates of its relation, and the loss is
the NLL of the (new) object.

As in the reference code the calibration FFN has no biases and sits in the last layer by default
(T5-base layer 11 of 12). There, the logits follow from the calibration FFN's output through the
final norm and the LM head alone (:class:`editing.methods.patching.LastBlockReadout`), so after one pass
over the data each training step costs no pass through the blocks; other layers train through the
hooked model. Differences, said plainly:

* the paper's facts come with PARAREL paraphrases; here a fact's extra templates are the
  relation's *training* templates from the bundled fact base when the request's relation is
  known (:func:`editing.methods.patching.training_prompts`); otherwise the request's own prompt only;
* a locality term is added (the paper trains on the facts only): KL between the unpatched and
  patched answer distributions of ``locality_facts`` prompts of other subjects (half of them of
  the edited relations) and, as its own group, of the prompts of edits already applied, so a
  batch edit leaves other facts and earlier edits alone; training stops once the facts are
  learnt and each KL is below ``locality_stop`` (and earlier edits keep their answers). Those
  prompts come only from the training memory (:func:`editing.methods.patching.in_training_memory`):
  memory-side subjects, never an edited one. Evaluation draws its neighbour and unrelated probes
  from the other side of the split, so the KL never trains on a fact locality is scored on (it
  did before: the same-relation half was exactly the neighbours :mod:`eval.probes` asks);
* the NLL is averaged over target tokens, full-batch; ``V_c`` starts at zero (the reference starts
  from a random init), so before training the patch changes nothing; Adam with a constant
  learning rate replaces Adafactor with warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from editing.core.edit import Edit, EditError, ModulePatch, handle_stack, register_edit_type
from editing.core.hooks import capture
from editing.core.request import EditRequest
from editing.learning.targets import TargetBatch, masked_kl, target_batch
from editing.methods.base import EditMethod, HParams, ProgressFn, register
from editing.methods.checks import COUNT, LAYERS, NON_NEGATIVE, NON_NEGATIVE_COUNT, POSITIVE, SEED, FieldCheck
from editing.methods.patching import (
    add_to_output,
    fact_key,
    ffn_activation,
    ffn_is_gated,
    last_block_readout,
    relation_of,
    retained_facts,
    training_prompts,
)
from editing.models.loader import ModelHandle
from editing.models.tokens import Batch, encode, pad_batch, pad_id


@register_edit_type
@dataclass(eq=False)
class CalibrationFFN(ModulePatch):
    """A calibration FFN beside the FFN of each layer in ``layers``.

    ``weights`` holds ``"<layer>.keys"`` and ``"<layer>.values"`` (``(n_slots, d_model)`` each) and,
    for gated FFNs, ``"<layer>.gates"``.
    """

    layers: tuple[int, ...] = ()
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def patched_layers(self) -> tuple[int, ...]:
        """Blocks whose FFN output the edit changes (their FFN inputs stay as they were)."""
        return self.layers

    @property
    def n_slots(self) -> int:
        """Calibration neurons per layer."""
        return int(self.weights[f"{self.layers[0]}.keys"].shape[0]) if self.layers else 0

    def contribution(self, layer: int, hidden: torch.Tensor,
                     act: Any) -> torch.Tensor:
        """What the calibration FFN of ``layer`` adds to the FFN output for inputs ``hidden``."""
        def w(part: str) -> torch.Tensor:
            return self.weights[f"{layer}.{part}"].to(hidden.device, hidden.dtype)

        inner = hidden @ w("keys").T
        if f"{layer}.gates" in self.weights:
            inner = act(hidden @ w("gates").T) * inner
        else:
            inner = act(inner)
        return inner @ w("values")

    def hooks(self, handle: ModelHandle) -> list[tuple[str, Any]]:
        act = ffn_activation(handle)
        return [(handle.arch.mlp_name(layer), add_to_output(lambda h, _layer=layer: self.contribution(_layer, h, act)))
                for layer in self.layers]

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def config(self) -> dict[str, Any]:
        return {"layers": list(self.layers)}

    @classmethod
    def from_parts(cls, common: dict[str, Any], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> CalibrationFFN:
        return cls(layers=tuple(int(x) for x in config["layers"]), weights=dict(tensors), **common)


@dataclass
class CaliNETHParams(HParams):
    """CaliNET's hyper-parameters.

    ``layers`` receive a calibration FFN of ``n_slots`` neurons each (paper: 64 slots in the last
    layer); each fact is trained on ``n_templates`` templates; ``locality_facts`` prompts of other
    subjects keep their answer distribution (next token after the prompt) through a KL term
    weighted ``locality_coef`` (training-memory subjects only, so never a probe of the edit).
    Training is full-batch and stops once every training prompt predicts
    its target with mean NLL below ``stop_loss`` and the KL is below ``locality_stop`` (or after
    ``max_steps``).
    """

    layers: tuple[int, ...] = (0,)
    n_slots: int = 64
    n_templates: int = 4
    lr: float = 1e-2
    max_steps: int = 300
    stop_loss: float = 0.1
    locality_facts: int = 600
    locality_coef: float = 10.0
    locality_stop: float = 0.005
    init_std: float = 0.0  # 0: 1/sqrt(d_model)
    seed: int = 0

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layers": LAYERS,
        "n_slots": COUNT,
        "n_templates": COUNT,
        "lr": POSITIVE,
        "max_steps": COUNT,
        "stop_loss": NON_NEGATIVE,
        "locality_facts": NON_NEGATIVE_COUNT,  # 0: no locality term
        "locality_coef": NON_NEGATIVE,
        "locality_stop": NON_NEGATIVE,
        "init_std": NON_NEGATIVE,
        "seed": SEED,
    }

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> CaliNETHParams:
        """The paper calibrates the last layer's FFN."""
        return cls(layers=(handle.n_layers - 1,))


@dataclass
class _Kept:
    """Prompts whose answer distributions must not move: their unpatched logits at the answer
    position and a function giving the patched ones."""

    name: str
    base: torch.Tensor  # (n_prompts, vocab)
    logits: Callable[[], torch.Tensor]


@dataclass
class _Readouts:
    """Logits at the scored positions of the training prompts, and the groups of kept prompts."""

    edit_logits: Callable[[], torch.Tensor]  # (n_target_tokens, vocab)
    kept: list[_Kept]


@register
class CaliNET(EditMethod):
    name = "CaliNET"
    hparams_class = CaliNETHParams
    edit_kind = "module_patch"
    summary = "Trains a small calibration FFN beside the last FFN layer on a batch of facts, model frozen."

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, CaliNETHParams)
        generator = torch.Generator().manual_seed(hparams.seed)
        pairs = [(prompt, r.target_new) for r in requests
                 for prompt in training_prompts(r, hparams.n_templates, hparams.seed)]
        batch = target_batch(handle, pairs)
        labels = batch.labels[batch.scored]
        kept = _kept_batches(handle, requests, hparams)

        d_model, gated = handle.d_model, ffn_is_gated(handle)
        std = hparams.init_std or 1.0 / math.sqrt(d_model)
        weights: dict[str, torch.Tensor] = {}
        for layer in hparams.layers:
            for part in (("keys", "gates") if gated else ("keys",)):
                weights[f"{layer}.{part}"] = std * torch.randn(hparams.n_slots, d_model, generator=generator)
            weights[f"{layer}.values"] = torch.zeros(hparams.n_slots, d_model)
        # each layer's slots where that layer runs (a device_map may spread the layers over GPUs)
        weights = {k: v.to(handle.module_device(handle.arch.mlp_name(int(k.split(".")[0])))).requires_grad_(True)
                   for k, v in weights.items()}
        candidate = CalibrationFFN(method=self.name, requests=requests, hparams=hparams.to_dict(),
                                   layers=tuple(int(x) for x in hparams.layers), weights=weights)
        optimizer = torch.optim.Adam(list(weights.values()), lr=hparams.lr)

        progress(0.0, f"CaliNET: {len(pairs)} training prompts for {len(requests)} facts")
        steps, solved, report = 0, False, {}
        try:
            if candidate.layers == (handle.n_layers - 1,):
                readouts = _last_block_readouts(handle, candidate, batch, kept)
            else:
                readouts = _forward_readouts(handle, candidate, batch, kept)
            for steps in range(1, hparams.max_steps + 1):
                edit_logits = readouts.edit_logits()
                edit_labels = labels.to(edit_logits.device)
                edit_loss = torch.nn.functional.cross_entropy(edit_logits.float(), edit_labels)
                loss = edit_loss
                report["edit_nll"] = float(edit_loss.detach())
                solved = report["edit_nll"] < hparams.stop_loss and bool((edit_logits.argmax(-1) == edit_labels).all())
                for group in readouts.kept:
                    # KL per group, so the few earlier edits are not averaged away among many facts
                    post = group.logits()
                    kl = masked_kl(group.base, post, torch.ones(len(post), device=post.device))
                    loss = loss + hparams.locality_coef * kl.to(loss.device)
                    report[f"{group.name}_kl"] = float(kl.detach())
                    solved = solved and report[f"{group.name}_kl"] < hparams.locality_stop
                    if group.name == "earlier_edits":  # and they must still give their answers
                        solved = solved and bool((post.argmax(-1) == group.base.argmax(-1)).all())
                if solved:
                    break
                if not torch.isfinite(loss):
                    raise EditError(f"CaliNET's training diverged at step {steps}; try a lower lr (now {hparams.lr}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if steps % 20 == 0:
                    progress(steps / hparams.max_steps, f"CaliNET: step {steps}, NLL {report['edit_nll']:.3f}")
        finally:
            if candidate.is_applied:
                candidate.revert(handle)
        final = {k: v.detach().clone() for k, v in weights.items()}
        return CalibrationFFN(method=self.name, requests=requests, hparams=hparams.to_dict(),
                              layers=candidate.layers, weights=final,
                              info={**report, "steps": steps, "solved": solved, "training_prompts": len(pairs),
                                    "slots_per_layer": hparams.n_slots})


def kept_prompts(handle: ModelHandle, requests: list[EditRequest], hparams: CaliNETHParams) -> dict[str, list[str]]:
    """Prompts whose answers must not move: facts of the training memory ("locality"; half of them
    of the edited relations, the neighbours a batch edit most easily drags along, half of any
    relation) and the prompts of the edits already applied ("earlier_edits", which keep their new
    answers).

    The facts come from :func:`editing.methods.patching.retained_facts` with the requests, so none is a
    probe of these edits (neighbours and unrelated facts are drawn from the other subjects).
    """
    if hparams.locality_coef <= 0:
        return {}
    groups: dict[str, list[str]] = {}
    if hparams.locality_facts > 0:
        relations = sorted({rel.id for rel in (relation_of(r) for r in requests) if rel is not None})
        half = hparams.locality_facts // 2 if relations else 0
        facts = retained_facts(requests, half, seed=hparams.seed + 1, relations=relations) if half else []
        facts += retained_facts(requests, hparams.locality_facts - len(facts), seed=hparams.seed + 2)
        groups["locality"] = list(dict.fromkeys(prompt for prompt, _ in facts))
    # An earlier edit of the same fact is being replaced; earlier edits of other facts must hold.
    same_fact = {fact_key(r) for r in requests}
    earlier = [r.text for edit in handle_stack(handle) for r in edit.requests
               if fact_key(r) not in same_fact]
    if earlier:
        groups["earlier_edits"] = list(dict.fromkeys(earlier))
    return groups


def _kept_batches(handle: ModelHandle, requests: list[EditRequest], hparams: CaliNETHParams) -> dict[str, Batch]:
    """:func:`kept_prompts`, tokenised and padded per group."""
    tok = handle.tokenizer
    return {name: pad_batch([encode(tok, p) for p in prompts], pad_id(tok), handle.device)
            for name, prompts in kept_prompts(handle, requests, hparams).items()}


def _last_positions(batch: Batch) -> torch.Tensor:
    """Mask of each row's last real token (where a fact prompt's answer is predicted)."""
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    mask[torch.arange(len(batch.lengths)), torch.tensor(batch.lengths) - 1] = True
    return mask


def _last_block_readouts(handle: ModelHandle, candidate: CalibrationFFN, batch: TargetBatch,
                         kept: dict[str, Batch]) -> _Readouts:
    """Readouts for a calibration FFN in the last block: one pass over the data, then each step
    only runs the calibration FFN, the final norm and the head on the positions that matter."""
    layer = candidate.layers[0]
    mlp_name, act = handle.arch.mlp_name(layer), ffn_activation(handle)

    def readout(inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        with capture(handle.model, [mlp_name], inputs=True) as store:
            at_mask = last_block_readout(handle, inputs).at(mask)
        ffn_inputs = store[mlp_name][mask.to(store[mlp_name].device)]
        return lambda: at_mask.logits(candidate.contribution(layer, ffn_inputs, act))

    groups = []
    for name, prompts in kept.items():
        logits = readout(prompts.model_inputs(), _last_positions(prompts))
        with torch.no_grad():
            groups.append(_Kept(name, logits().detach(), logits))  # values are zero: unpatched
    return _Readouts(readout(batch.model_inputs(), batch.scored), groups)


def _forward_readouts(handle: ModelHandle, candidate: CalibrationFFN, batch: TargetBatch,
                      kept: dict[str, Batch]) -> _Readouts:
    """Readouts through full forward passes with the candidate hooked in (any layers)."""
    def logits_of(prompts: Batch) -> Callable[[], torch.Tensor]:
        mask = _last_positions(prompts)
        return lambda: handle.model(**prompts.model_inputs()).logits[mask]

    groups = []
    with torch.no_grad():
        for name, prompts in kept.items():
            groups.append(_Kept(name, logits_of(prompts)(), logits_of(prompts)))
    candidate.apply(handle)  # reverted by the caller
    return _Readouts(lambda: handle.model(**batch.model_inputs()).logits[batch.scored], groups)
