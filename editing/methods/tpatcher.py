"""T-Patcher (Huang et al., ICLR 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Each mistake is corrected by one new neuron appended to the FFN of the last layer: a key ``k``,
a bias ``b`` and a value ``v``. The FFN's output becomes ``FFN(h) + act(h·k + b) v`` with the FFN's
own activation, at every position. The neuron is trained with three losses (paper, Sec. 3.2):

* the **edit loss**: NLL of the new target, teacher-forced;
* the **activation loss** ``exp(act_margin − a)`` at the edit prompt's last token, so the patch
  fires there (pre-activation ``a = h·k + b`` above the margin);
* the **memory loss** on retained examples — every token of ``memory_facts`` fact-base
  statements (data the model was trained on: the paper's "previously seen training data") of the
  training memory (:func:`editing.methods.patching.in_training_memory`: memory-side subjects, none about
  an edited subject — the same rule as CaliNET's locality term; evaluation takes its neighbours
  and unrelated facts from the other subjects, so the memory never holds a probe of the edit,
  where a sample of the whole fact base held about 43% of them), plus the inputs of every edit already applied
  (the paper's memory update for sequential editing): the top-k of ``exp(a_mem − memory_margin)``
  keeps the patch silent (``a_mem < memory_margin``, below zero) and the top-k of
  ``exp(a_mem − a_edit + gap_margin)`` keeps the edit's activation well above the memory's.

Training stops, as in the reference, once the edit is predicted and the activation loss is below
``act_loss_stop`` — and, in addition, once every memory token is below ``memory_margin`` — or after
``max_steps`` (``info["converged"]`` says which). A batch of requests adds one neuron per request,
each with its own activation loss; sequential edits stack one :class:`TPatch` per apply, so the
number of neurons grows by one per edit (:func:`count_patch_neurons`).

Differences from the reference, said plainly:

* Adam with a constant learning rate of 0.1 (the reference: 1e-2 with a plateau schedule and up
  to 2,000 steps, validation-based early stopping), so an edit takes about a second;
* the key starts at ``(q − μ)/‖q − μ‖²`` with bias ``−μ·k`` (``q`` the FFN input at the prompt's
  last token, ``μ`` the memory mean) rather than ``q/‖q‖²``: both give activation 1 on the edit,
  but hidden states share a large common component, and centring starts the memory near 0
  instead of near 1; the value starts at zero (an untrained patch changes nothing);
* the activation loss is taken at the prompt's last token only (the reference's seq2seq setting
  fires on every decoder token): later target tokens are left to the edit loss, since forcing the
  patch on at a target's first token would make it fire on every text containing that word;
* the memory is a few hundred fact-base statements rather than a 40k-example training set; the
  corpus can be added (``memory_corpus``) but it mentions most subjects, and silencing the patch on
  all of it costs the edits themselves on this small model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from editing.core.edit import Edit, EditError, ModulePatch, handle_stack, register_edit_type
from editing.core.hooks import capture
from editing.core.request import EditRequest
from editing.learning.targets import target_batch, target_hits, target_nll
from editing.methods.base import EditMethod, HParams, ProgressFn, register
from editing.methods.checks import (
    COUNT,
    FINITE,
    LAYER,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    FieldCheck,
    Flag,
    InvalidHParams,
    Maybe,
)
from editing.methods.patching import (
    add_to_output,
    fact_key,
    ffn_activation,
    last_block_readout,
    module_inputs,
    statement_inputs,
)
from editing.models.loader import ModelHandle


@register_edit_type
@dataclass(eq=False)
class TPatch(ModulePatch):
    """Neurons appended to one layer's FFN: ``FFN(h) + act(h Kᵀ + b) V`` at every position.

    ``keys`` and ``values`` are ``(n_neurons, d_model)``, ``biases`` ``(n_neurons,)``; the model's
    weights are untouched (the neurons live in a forward hook on the FFN module).
    """

    layer: int = 0
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    biases: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))

    @property
    def n_neurons(self) -> int:
        return int(self.keys.shape[0])

    @property
    def patched_layers(self) -> tuple[int, ...]:
        """Blocks whose FFN output the patch changes (their FFN inputs stay as they were)."""
        return (self.layer,)

    def pre_activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """``h·k + b`` of every neuron for FFN inputs ``hidden`` (``(..., d) -> (..., n_neurons)``)."""
        keys = self.keys.to(hidden.device, hidden.dtype)
        return hidden @ keys.T + self.biases.to(hidden.device, hidden.dtype)

    def contribution(self, hidden: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What the neurons add to the FFN output for FFN inputs ``hidden``."""
        return act(self.pre_activations(hidden)) @ self.values.to(hidden.device, hidden.dtype)

    def hooks(self, handle: ModelHandle) -> list[tuple[str, Any]]:
        act = ffn_activation(handle)
        return [(handle.arch.mlp_name(self.layer), add_to_output(lambda hidden: self.contribution(hidden, act)))]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "biases": self.biases, "values": self.values}

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer}

    @classmethod
    def from_parts(cls, common: dict[str, Any], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> TPatch:
        return cls(layer=int(config["layer"]), keys=tensors["keys"], biases=tensors["biases"],
                   values=tensors["values"], **common)


def count_patch_neurons(edits: list[Edit] | tuple[Edit, ...]) -> int:
    """Total T-Patcher neurons in a stack of edits (the paper's patch-size measure)."""
    return sum(edit.n_neurons for edit in edits if isinstance(edit, TPatch))


@dataclass
class TPatcherHParams(HParams):
    """T-Patcher's hyper-parameters (margins and loss weights from the reference implementation).

    ``layer`` is the FFN that receives the neurons (the last one, as in the paper); ``act_margin``,
    ``memory_margin`` and ``gap_margin`` are the reference's ``act_margin_val`` (0),
    ``margin_val2`` (−3) and ``margin_val1`` (3); ``memory_coef`` its ``mlc`` (5 for FEVER, 10 for
    zsRE); ``memory_top_k`` the top-k of the memory loss. The memory holds ``memory_facts``
    training-memory statements (None: all 546 about the bundled fact base's memory-side subjects;
    more memory gives better locality but lower generality and slower convergence) and, with
    ``memory_corpus``, the corpus lines about memory-side subjects only. ``act_loss_stop`` is the
    reference's ``act_loss_thd``.
    """

    layer: int = 0
    lr: float = 0.1
    weight_decay: float = 0.01
    max_steps: int = 300
    act_margin: float = 0.0
    memory_margin: float = -3.0
    gap_margin: float = 3.0
    act_coef: float = 1.0
    memory_coef: float = 10.0
    memory_facts: int | None = 450
    memory_corpus: bool = False
    memory_top_k: int = 1000
    act_loss_stop: float = 0.1
    seed: int = 0

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layer": LAYER,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "max_steps": COUNT,
        "act_margin": FINITE,
        "memory_margin": FINITE,
        "gap_margin": NON_NEGATIVE,
        "act_coef": NON_NEGATIVE,
        "memory_coef": NON_NEGATIVE,
        "memory_facts": Maybe(COUNT),  # None: every training-memory statement
        "memory_corpus": Flag(),
        "memory_top_k": COUNT,
        "act_loss_stop": NON_NEGATIVE,
        "seed": SEED,
    }

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> TPatcherHParams:
        """The paper patches the last FFN layer."""
        return cls(layer=handle.n_layers - 1)

    def validate_together(self, handle: ModelHandle | None) -> None:
        if self.memory_margin >= self.act_margin:
            raise InvalidHParams(f"Hyper-parameter memory_margin ({self.memory_margin:g}) must be below act_margin "
                                 f"({self.act_margin:g}): the patch must fire on the edit only.")


def _memory(handle: ModelHandle, requests: list[EditRequest], hparams: TPatcherHParams) -> torch.Tensor:
    """FFN inputs at every token of the retained data: training-memory statements (and corpus
    lines) about none of the edited subjects (:meth:`~editing.methods.patching.StatementInputs.for_requests`),
    plus the inputs of every edit already applied (but not earlier edits of the same facts)."""
    statements = statement_inputs(handle, hparams.layer, hparams.memory_facts, hparams.seed,
                                  with_corpus=hparams.memory_corpus)
    same_fact = {fact_key(r) for r in requests}
    earlier = [f"{r.text} {r.target_new}" for edit in handle_stack(handle) for r in edit.requests
               if fact_key(r) not in same_fact]
    parts = [statements.for_requests(requests)]
    if earlier:
        parts.append(module_inputs(handle, handle.arch.mlp_name(hparams.layer), earlier))
    return torch.cat(parts)


def _top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat.topk(min(k, flat.numel())).values.mean()


@register
class TPatcher(EditMethod):
    name = "T-Patcher"
    hparams_class = TPatcherHParams
    edit_kind = "module_patch"
    summary = "Appends one trained neuron per edit to the last FFN layer, firing only on the edit's input."

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, TPatcherHParams)
        torch.manual_seed(hparams.seed)
        mlp_name = handle.arch.mlp_name(hparams.layer)
        device = handle.module_device(mlp_name)  # the patch trains where its layer runs
        progress(0.0, "T-Patcher: reading the memory set")
        memory = _memory(handle, requests, hparams)

        batch = target_batch(handle, [(r.text, r.target_new) for r in requests])
        # On the last block (the paper's choice) the logits follow from the neurons' output through
        # the final norm and head alone; elsewhere each step runs the model with the patch hooked.
        readout = None
        with torch.no_grad(), capture(handle.model, [mlp_name], inputs=True) as store:
            if hparams.layer == handle.n_layers - 1:
                readout = last_block_readout(handle, batch.model_inputs())
            else:
                handle.model(**batch.model_inputs())
        queries = store[mlp_name].to(device).float()  # (rows, seq, d); the patch leaves its own input
        scored = batch.scored.to(device)
        # Each request's first scored position is its prompt's last token: the key starts there.
        first = scored.float().argmax(-1)
        q_last = queries[torch.arange(len(requests), device=device), first]
        # The reference starts from k = q/‖q‖², b = 0 (activation 1 on the edit). Hidden states share
        # a large common component, so that key fires almost as much on every memory token; centring
        # on the memory mean μ keeps the activation 1 on the edit but starts the memory near 0.
        centred = q_last - memory.mean(0)
        keys = (centred / centred.pow(2).sum(-1, keepdim=True)).clone().requires_grad_(True)
        biases = (-(memory.mean(0) * keys).sum(-1)).detach().clone().requires_grad_(True)
        values = torch.zeros(len(requests), handle.d_model, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([keys, biases, values], lr=hparams.lr, weight_decay=hparams.weight_decay)
        # Neuron j must fire at the last prompt token of row j (its own request). Later target
        # positions are left to the edit loss: a target's second token often follows from its first
        # alone, and forcing the patch on there would make it fire on every text with that token.
        own = torch.zeros_like(scored, dtype=torch.float)
        own[torch.arange(len(requests), device=own.device), first] = 1.0

        candidate = TPatch(method=self.name, requests=requests, hparams=hparams.to_dict(),
                           layer=hparams.layer, keys=keys, biases=biases, values=values)
        act = ffn_activation(handle)
        steps, converged, report = 0, False, {}
        if readout is None:
            candidate.apply(handle)
        try:
            for steps in range(1, hparams.max_steps + 1):
                if readout is not None:
                    logits = readout.logits(candidate.contribution(queries, act)).to(device)
                else:
                    logits = handle.model(**batch.model_inputs()).logits.to(device)
                edit_loss = target_nll(logits, batch).mean()
                pre_edit = candidate.pre_activations(queries)  # (rows, seq, neurons)
                own_act = pre_edit.diagonal(dim1=0, dim2=2).T  # (rows, seq): neuron j on row j
                act_loss = (torch.exp(hparams.act_margin - own_act) * own).sum() / own.sum()
                edit_min = torch.where(own.bool(), own_act, torch.full_like(own_act, float("inf"))).amin(-1)
                pre_memory = candidate.pre_activations(memory)  # (tokens, neurons)
                silent = _top_k_mean(torch.exp((pre_memory - hparams.memory_margin).clamp(max=30)),
                                     hparams.memory_top_k)
                gap = _top_k_mean(torch.exp((pre_memory - edit_min + hparams.gap_margin).clamp(max=30)),
                                  hparams.memory_top_k)
                loss = edit_loss + hparams.act_coef * act_loss + hparams.memory_coef * (silent + gap)
                with torch.no_grad():
                    report = {"edit_nll": float(edit_loss), "edit_activation_min": float(edit_min.min()),
                              "memory_activation_max": float(pre_memory.max())}
                    # The reference stops once the edit is fixed and the activation loss is small;
                    # we also wait until every retained token is below the memory margin.
                    converged = (bool((target_hits(logits, batch) == 1).all())
                                 and float(act_loss) < hparams.act_loss_stop
                                 and report["memory_activation_max"] < hparams.memory_margin)
                if converged:
                    break
                if not torch.isfinite(loss):
                    raise EditError(f"T-Patcher's training diverged at step {steps}; try a lower lr "
                                    f"(now {hparams.lr}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if steps % 25 == 0:
                    progress(steps / hparams.max_steps, f"T-Patcher: step {steps}, edit NLL {report['edit_nll']:.3f}")
        finally:
            if candidate.is_applied:
                candidate.revert(handle)
        return TPatch(method=self.name, requests=requests, hparams=hparams.to_dict(), layer=hparams.layer,
                      keys=keys.detach().clone(), biases=biases.detach().clone(), values=values.detach().clone(),
                      info={**report, "steps": steps, "converged": converged, "neurons": len(requests),
                            "memory_tokens": int(memory.shape[0])})
