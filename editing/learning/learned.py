"""Shared machinery of the learned weight editors (MEND, KE).

Both editors read the fine-tuning gradient of the edit and turn it into a weight shift. For a
linear map ``y = W u`` the gradient of a loss over a sequence is ``∇W = Σ_t δ_t u_tᵀ``: a sum of
rank-1 outer products of the layer's input ``u_t`` and the loss gradient ``δ_t`` at its output,
one per token. Both editors work on these factors and produce shifts that are again sums of
outer products, so:

* :func:`gradient_factors` captures ``(u_t, δ_t)`` for chosen weights in one forward/backward
  pass, without ever forming a dense gradient;
* :class:`LowRankShift` holds a shift ``Δ = leftᵀ right`` per example and :func:`shifted` runs the
  model as if ``W + Δ_b`` were its weights for the rows of example ``b`` (forward hooks, so the
  base weights are never written and a training batch can hold many independent edits);
* :func:`to_param_delta` stores a shift as the low-rank factors of a :class:`ParamDelta` in the
  parameter's storage shape (GPT-2's Conv1D keeps ``(in, out)``).

The module also holds what MEND and KE share around those: their training settings and step
(:data:`GRADIENT_EDITOR_RUN`, :func:`train_gradient_editor`, run by the one loop of
:mod:`editing.learning.training`), the held-out evaluation (:func:`evaluate_editor`), the lookup of
trained editors (:class:`TrainedEditorMixin`, also SERAC's), and the edit-time side
(:class:`GradientEditorHParams`, :class:`GradientEditorMixin`, :func:`shift_edit`). Their
training data is built by :mod:`editing.learning.editor_data`, the teacher-forced target batches
by :mod:`editing.learning.targets`.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from editing.analysis.scoring import score_targets
from editing.core.edit import EditError, ParamDelta, WeightDelta
from editing.learning.editor_data import RecordBatch, batch_indices, neighbour_facts, record_batch
from editing.learning.targets import TargetBatch, masked_kl, target_batch, target_hits, target_nll
from editing.learning.training import (
    LrSchedule,
    load_trained,
    train_loop,
)
from editing.methods.base import HParams, ProgressFn
from editing.methods.checks import CHECKPOINT, FieldCheck
from editing.methods.patching import in_training_memory
from editing.train import checkpoint_config, checkpoint_problem, trained_checkpoint, training_records

if TYPE_CHECKING:
    from editing.core.request import EditRequest
    from editing.methods.base import EditMethod
    from editing.models.loader import ModelHandle
    from editing.train import EditRecord

#: the part of a MEND/KE checkpoint folder that is the editor (:mod:`editing.learning.training`'s layout)
EDITOR_PART = "editor"
#: its trained weights
EDITOR_TENSORS = f"{EDITOR_PART}.safetensors"


# ---------------------------------------------------------------------------------------------
# Which weights an editor edits
# ---------------------------------------------------------------------------------------------
def default_edit_layers(n_layers: int) -> list[int]:
    """The last few blocks: 3 on deep models (MEND's and KE's choice for GPT-style models), half
    of the blocks on shallow ones (the last 2 of 4 on the demo model)."""
    count = min(3, max(1, n_layers // 2))
    return list(range(n_layers - count, n_layers))


def mlp_weight_names(handle: ModelHandle, layers: Sequence[int]) -> list[str]:
    """Parameter names of every MLP projection (input ones, then output) of ``layers``."""
    arch = handle.arch
    return [f"{arch.module_name(layer, part)}.weight" for layer in layers for part in (*arch.mlp_in, arch.mlp_out)]


def mlp_weight_shapes(handle: ModelHandle, layers: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every MLP projection of ``layers`` (:func:`mlp_weight_names`' order): the
    weights an editor is built for."""
    return {name: out_in_shape(handle, name) for name in mlp_weight_names(handle, layers)}


def module_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def out_in_shape(handle: ModelHandle, weight_name: str) -> tuple[int, int]:
    """``(out, in)`` of a projection, whatever its storage layout."""
    out_dim, in_dim = handle.arch.weight_out_in(handle.module(module_of(weight_name))).shape
    return int(out_dim), int(in_dim)


# ---------------------------------------------------------------------------------------------
# Per-example low-rank weight shifts, applied by hooks
# ---------------------------------------------------------------------------------------------
@dataclass
class LowRankShift:
    """Per-example shifts of one ``(out, in)`` weight: ``Δ_b = left[b]ᵀ @ right[b]``.

    ``left`` is ``(examples, rank, out)`` and ``right`` ``(examples, rank, in)``.
    """

    left: torch.Tensor
    right: torch.Tensor

    def dense(self, example: int = 0) -> torch.Tensor:
        """``(out, in)`` matrix of one example's shift (tests and diagnostics)."""
        return self.left[example].T @ self.right[example]


def _forward_hook_with_input(module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    # editing.core.hooks.modify sees only the output; a weight shift needs the module's input too.
    def hook(_module, args, output):
        return fn(args[0], output)

    return module.register_forward_hook(hook)


@contextmanager
def shifted(handle: ModelHandle, shifts: dict[str, LowRankShift],
            example_of_row: torch.Tensor | None = None) -> Iterator[None]:
    """Run the model as if each weight were ``W + Δ`` for the rows of each example.

    ``example_of_row[r]`` says which example's shift applies to batch row ``r`` (default: row r
    uses example r). ``(W + Δ) u = W u + leftᵀ (right u)``, so the hook adds the shift's output
    without forming ``Δ``; gradients flow into the factors.
    """
    handles = []

    def make(shift: LowRankShift):
        def add(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            rows = example_of_row if example_of_row is not None else torch.arange(inputs.shape[0])
            # the editor's device to the module's (they differ when a device_map shards the model)
            left = shift.left[rows.to(shift.left.device)].to(output.device)
            right = shift.right[rows.to(shift.right.device)].to(inputs.device)
            coeff = torch.einsum("bsi,bri->bsr", inputs.float(), right)
            return output + torch.einsum("bsr,bro->bso", coeff, left).to(output.dtype)

        return add

    try:
        for name, shift in shifts.items():
            handles.append(_forward_hook_with_input(handle.module(module_of(name)), make(shift)))
        yield
    finally:
        for h in handles:
            h.remove()


def editor_on(editor: nn.Module, device: torch.device | str) -> nn.Module:
    """``editor`` moved to ``device`` (the model's), its parameters in float32 whatever the model's
    dtype.

    Editors are built on the CPU, so their seeded initialisation (CPU generators) is the same on
    every device, and then moved: their inputs (the gradient factors, the embedded conditions) are
    on the model's device, so an editor left on the CPU fails beside a GPU model. They compute in
    float32 — the factors are float32, and :func:`shifted` casts a shift to the model's dtype only
    where it joins the model's activations — so a bfloat16/float16 model trains and applies them
    unchanged. Float64 buffers (MEND's running moments) stay float64, except on MPS, which has no
    float64.
    """
    device = torch.device(device)
    for module in editor.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        if device.type == "mps":  # before moving: a float64 tensor cannot even be sent to MPS
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.dtype == torch.float64:
                    module._buffers[name] = buffer.float()
    return editor.to(device)


def to_param_delta(handle: ModelHandle, weight_name: str, left: torch.Tensor, right: torch.Tensor) -> ParamDelta:
    """A :class:`ParamDelta` for ``Δ = leftᵀ right`` (``left (r, out)``, ``right (r, in)``) in the
    parameter's storage shape. The factors are kept on the CPU in float32 (they are small; the
    edit moves them to the weight's device and multiplies there when applied)."""
    left, right = left.detach().float().cpu(), right.detach().float().cpu()
    if handle.arch.conv1d:  # stored (in, out): Δᵀ = rightᵀ left
        return ParamDelta.low_rank(right.T.contiguous(), left.contiguous())
    return ParamDelta.low_rank(left.T.contiguous(), right.contiguous())


def shift_edit(method: str, handle: ModelHandle, requests: list[EditRequest], hparams: HParams, folder: Path,
               shifts: dict[str, LowRankShift], keep: dict[str, torch.Tensor] | None = None,
               **info: Any) -> WeightDelta:
    """The edit of a gradient editor: ``shifts`` summed into one low-rank delta per weight
    (:func:`summed_deltas`, rows kept as ``keep`` says), its info naming the editor's checkpoint
    ``folder`` and each weight's rank, then ``info``'s own entries."""
    deltas, ranks = summed_deltas(handle, shifts, keep)
    return WeightDelta(method=method, requests=requests, hparams=hparams.to_dict(),
                       info={"checkpoint": str(folder), "ranks": ranks, **info}, deltas=deltas)


def summed_deltas(handle: ModelHandle, shifts: dict[str, LowRankShift],
                  keep: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, ParamDelta], dict[str, int]]:
    """One low-rank :class:`ParamDelta` per weight: the sum of all examples' shifts, as the rows
    of their factors stacked; rows are kept where ``keep[name]`` (``(examples, rank)``) is True,
    by default where the left factor is non-zero (positions without gradient give exact zeros).
    Returns the deltas and each weight's rank."""
    deltas, ranks = {}, {}
    for name, shift in shifts.items():
        left = shift.left.reshape(-1, shift.left.shape[-1])
        right = shift.right.reshape(-1, shift.right.shape[-1])
        rows = keep[name].reshape(-1) if keep is not None else left.abs().sum(-1) > 0
        deltas[name] = to_param_delta(handle, name, left[rows], right[rows])
        ranks[name] = int(rows.sum())
    return deltas, ranks


# ---------------------------------------------------------------------------------------------
# Gradient factors
# ---------------------------------------------------------------------------------------------
@dataclass
class GradientFactors:
    """The fine-tuning gradient of one weight for each example, ``∇W_b = Σ_t δ[b,t] u[b,t]ᵀ``.

    ``inputs`` is ``(examples, positions, in)``, ``grads`` ``(examples, positions, out)``;
    ``mask`` marks the positions that carry gradient (real tokens up to the last scored one).
    """

    inputs: torch.Tensor
    grads: torch.Tensor
    mask: torch.Tensor

    def dense(self, example: int = 0) -> torch.Tensor:
        return self.grads[example].T @ self.inputs[example]


def gradient_factors(handle: ModelHandle, weight_names: Sequence[str],
                     batch: TargetBatch) -> tuple[dict[str, GradientFactors], torch.Tensor]:
    """One forward/backward pass: the rank-1 factors of each example's gradient of its own mean
    target NLL with respect to each weight (and the ``(examples,)`` losses), on the model's first
    device (:attr:`ModelHandle.device`, where editors are built).

    The model's parameters need no gradient: the hooks make the module outputs differentiable.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []

    def make(name: str):
        def keep(module_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:  # nothing upstream needs grad: start the graph here
                output = output.detach().requires_grad_()
            inputs[name] = module_input.detach()
            outputs[name] = output
            return output

        return keep

    with torch.enable_grad():
        try:
            for name in weight_names:
                hooks.append(_forward_hook_with_input(handle.module(module_of(name)), make(name)))
            logits = handle.model(**batch.model_inputs()).logits
        finally:
            for h in hooks:
                h.remove()
        losses = target_nll(logits, batch)
        if not torch.isfinite(losses).all():  # NaN factors would be dropped as "no gradient": an empty edit
            raise EditError(f"The edit loss is not finite ({losses.tolist()}): the model's outputs on the edit "
                            f"prompts are NaN or infinite, so no update can be computed.")
        grads = torch.autograd.grad(losses.sum(), [outputs[n] for n in weight_names], allow_unused=True)
    factors = {}
    editor_device = handle.device  # where editors run; a sharded model's weights may be elsewhere
    for name, grad in zip(weight_names, grads, strict=True):
        grad = torch.zeros_like(outputs[name]) if grad is None else grad
        mask = (grad != 0).any(-1) & batch.attention_mask.to(grad.device).bool()
        factors[name] = GradientFactors(inputs[name].to(editor_device).float(),
                                        grad.detach().to(editor_device).float(), mask.to(editor_device))
    return factors, losses.detach()


# ---------------------------------------------------------------------------------------------
# The losses an editor is trained with, under its shifts
# ---------------------------------------------------------------------------------------------
def edit_and_locality_losses(handle: ModelHandle, batch: RecordBatch,
                             shifts: dict[str, LowRankShift]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(edit NLL on the equivalence rows, locality KL, edit token accuracy) under ``shifts``."""
    with shifted(handle, shifts, batch.example):
        logits = handle.model(**batch.probes.model_inputs()).logits
    cut = batch.n_outer
    outer = batch.probes.rows(slice(None, cut))
    nll = target_nll(logits[:cut], outer).mean()
    kl = masked_kl(batch.local_pre_logits, logits[cut:], batch.probes.attention_mask[cut:].bool())
    accuracy = target_hits(logits[:cut].detach(), outer).mean()
    return nll, kl, accuracy


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for an editor's seeded initialisation (the same on every device)."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation (training report and tests)
# ---------------------------------------------------------------------------------------------
def _answer_argmax(handle: ModelHandle, batch: TargetBatch) -> torch.Tensor:
    with torch.no_grad():
        logits = handle.model(**batch.model_inputs()).logits
    return logits.argmax(-1)


def _accuracy(handle: ModelHandle, prompts: Sequence[str], target: str) -> float:
    scores = score_targets(handle, prompts, [target] * len(prompts))
    return sum(s.accuracy for s in scores) / max(1, len(scores))


#: the training-run settings MEND and KE share (their ``default_config`` ends with them): steps,
#: data, locality rows, clipping, checkpoints, logging and the held-out evaluation
GRADIENT_EDITOR_RUN: dict[str, Any] = {
    "steps": 600,
    "batch_size": 8,  # independent single edits per training step
    "n_paraphrases": 2,
    "n_neighbours": 0,  # same-relation facts of other subjects as extra locality rows (not in the paper)
    "grad_clip": 100.0,
    "seed": 0,
    "checkpoint_every": 200,
    "log_every": 25,
    "n_eval": 150,
    "data": "",
}

#: the few-step training of MEND and KE (their trainers' ``quick`` config): an editor that runs
QUICK_TRAINING: dict[str, Any] = {"steps": 3, "batch_size": 2, "n_eval": 0}

#: a gradient-based editor's training objective on one batch: (the batch's edit records, their
#: tokenised batch, the gradient factors at the edited weights) -> (loss, figures to log)
EditorObjective = Callable[[Sequence["EditRecord"], RecordBatch, dict[str, GradientFactors]],
                           tuple[torch.Tensor, dict[str, float]]]


def train_gradient_editor(handle: ModelHandle, method: EditMethod, editor: nn.Module,
                          optimizer: torch.optim.Optimizer, objective: EditorObjective, config: dict[str, Any],
                          folder: Path, progress: Callable[[float, str], None],
                          lr_at: LrSchedule | None = None) -> dict[str, Any]:
    """The training run MEND and KE share: seeded batches of training edit records, the gradient
    factors of the edit loss at the editor's weights (``editor.weight_names``) and the method's
    ``objective``, run by :func:`editing.learning.training.train_loop` (finite-loss guard, gradient
    clipping, resumable checkpoints); then the editor's figures on held-out records (the report)."""
    records = training_records(config, "train")
    # Neighbours are kept unchanged by the locality term: only those of the training memory, as
    # the records' own locality facts (editing.train.edit_records), never facts evaluation probes.
    memory = [r for r in records if in_training_memory(r.request.subject)]
    neighbours = neighbour_facts(records, config["n_neighbours"], pool=memory)

    def step(index: int) -> tuple[torch.Tensor, dict[str, float]]:
        indices = batch_indices(len(records), config["batch_size"], config["seed"], index)
        chosen = [records[i] for i in indices]
        batch = record_batch(handle, chosen, config["n_paraphrases"], [neighbours[i] for i in indices])
        factors, _ = gradient_factors(handle, editor.weight_names, batch.edit)
        return objective(chosen, batch, factors)

    result = train_loop(editor, optimizer, step, config["steps"], folder, progress, part=EDITOR_PART,
                        what=f"{method.name}'s training loss", lock=handle.lock,
                        checkpoint_every=config["checkpoint_every"], log_every=config["log_every"], lr_at=lr_at,
                        grad_clip=config["grad_clip"])
    result["n_train_records"] = len(records)
    heldout = training_records(config, "heldout")[: config["n_eval"]]
    result["heldout"] = evaluate_editor(handle, method, heldout, {"checkpoint": str(folder)},
                                        lambda _fraction, message: progress(0.99, message))
    return result


def evaluate_editor(handle: ModelHandle, method: EditMethod, records: Sequence[EditRecord],
                    hparams: HParams | dict[str, Any] | None = None,
                    progress: Callable[[float, str], None] | None = None) -> dict[str, float]:
    """Edit each record alone (through ``method.apply``), score it, revert it.

    Token-level teacher-forced accuracy (the survey's definitions): reliability on the edit
    prompt and generality on the paraphrases (for the new target), locality as agreement of the
    post-edit argmax with the pre-edit argmax on the locality prompts' answer tokens, and
    neighbourhood the same on two facts of other subjects asked with the edit's own template
    (:func:`neighbour_facts` over ``records``). The same figures without an edit are returned
    with a ``pre_`` prefix.
    """
    progress = progress or (lambda _f, _m: None)
    if not records:  # no evaluation asked for (n_eval 0): no figures, rather than zeros that read as results
        return {"n_edits": 0}
    sums = {"reliability": 0.0, "generality": 0.0, "locality": 0.0, "neighbourhood": 0.0,
            "pre_reliability": 0.0, "pre_generality": 0.0}
    started = time.perf_counter()
    neighbours = neighbour_facts(records, 2)
    for index, record in enumerate(records):
        request = record.request
        n_local = len(record.locality)
        local = target_batch(handle, [*record.locality, *neighbours[index]])
        with handle.lock:  # no other session's edit may be active while we score, nor see ours
            sums["pre_reliability"] += _accuracy(handle, [request.text], request.target_new)
            sums["pre_generality"] += _accuracy(handle, record.paraphrases, request.target_new)
            before = _answer_argmax(handle, local)
            edit = method.apply(handle, [request], hparams)
            try:
                sums["reliability"] += _accuracy(handle, [request.text], request.target_new)
                sums["generality"] += _accuracy(handle, record.paraphrases, request.target_new)
                after = _answer_argmax(handle, local)
            finally:
                edit.revert(handle)
        agree = (before == after) & local.scored
        sums["locality"] += float(agree[:n_local].sum() / local.scored[:n_local].sum())
        if neighbours[index]:
            sums["neighbourhood"] += float(agree[n_local:].sum() / local.scored[n_local:].sum())
        if (index + 1) % 10 == 0:
            progress((index + 1) / len(records), f"evaluated {index + 1}/{len(records)} held-out edits")
    count = max(1, len(records))
    result = {key: round(value / count, 4) for key, value in sums.items()}
    result["neighbourhood"] = round(sums["neighbourhood"] / max(1, sum(1 for n in neighbours if n)), 4)
    result["n_edits"] = len(records)
    result["seconds_per_edit"] = round((time.perf_counter() - started) / count, 4)
    return result


# ---------------------------------------------------------------------------------------------
# Trained editors on disk, and the readiness of methods that need one
# ---------------------------------------------------------------------------------------------
_EDITORS: dict[tuple[str, int], tuple[nn.Module, dict[str, Any]]] = {}


def load_trained_editor(folder: Path, build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """The editor saved in ``folder`` (built from its training config by ``build``), loaded once
    per process and file version."""
    key = (str(folder.resolve()), (folder / EDITOR_TENSORS).stat().st_mtime_ns)
    if key not in _EDITORS:
        config = checkpoint_config(folder)
        _EDITORS[key] = (load_trained(build(config), folder, EDITOR_PART), config)
    return _EDITORS[key]


def chosen_checkpoint(hparams: Any) -> str:
    """The ``checkpoint`` folder named by hyper-parameters (a dataclass or a dict); "" for none."""
    value = hparams.get("checkpoint") if isinstance(hparams, dict) else getattr(hparams, "checkpoint", None)
    return str(value or "")


class TrainedEditorMixin:
    """Readiness and checkpoint lookup for methods with a trained editor (mix in before
    :class:`~editing.methods.base.EditMethod`).

    The editor is the one trained with the method's default config for the model (found by
    :func:`editing.train.trained_checkpoint`), unless the hyper-parameters name a ``checkpoint``
    folder (e.g. one trained with other settings).
    """

    name: ClassVar[str]
    requires_training: ClassVar[bool] = True
    #: rough training time of the default config on the demo model (2 CPU cores), for messages
    train_minutes: ClassVar[int] = 10
    #: what training produces, for messages
    trained_parts: ClassVar[str] = "an editor"
    #: files of a checkpoint folder that exist once its editor is usable (the held-out check at
    #: the end of training already uses the editor, before the report is written)
    finished_files: ClassVar[tuple[str, ...]] = (EDITOR_TENSORS,)

    def readiness(self, handle: ModelHandle, hparams: Any = None) -> str | None:
        problem = super().readiness(handle, hparams)  # type: ignore[misc]
        if problem is not None:
            return problem
        chosen = chosen_checkpoint(hparams)
        if chosen:
            return checkpoint_problem(handle, self.name, Path(chosen), self.finished_files)
        if trained_checkpoint(handle, self.name) is None:
            command = f"python -m editing.train {self.name} --model {shlex.quote(handle.name)}"
            estimate = f" (about {self.train_minutes} minutes on the demo model on 2 CPU cores)" \
                if handle.name == "demo" else ""
            return (f"{self.name} needs {self.trained_parts} trained for this model, and none is cached yet. "
                    f"Train it from the app, or run:  {command}{estimate}. The checkpoint is cached and reused "
                    f"afterwards.")
        return None

    def trained_editor(self, handle: ModelHandle, hparams: Any,
                       build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, Path]:
        """The editor to use for ``hparams`` (built from its training config by ``build``), on the
        model's device in float32, and its checkpoint folder."""
        folder = self.checkpoint_folder(handle, hparams)
        editor, _config = load_trained_editor(folder, build)
        return editor_on(editor, handle.device), folder

    def checkpoint_folder(self, handle: ModelHandle, hparams: Any) -> Path:
        """The folder of the editor ``hparams`` choose; ``EditMethod.apply`` has already checked it
        with :meth:`readiness`, so a chosen folder is not read again here."""
        chosen = chosen_checkpoint(hparams)
        if chosen:
            return Path(chosen)
        found = trained_checkpoint(handle, self.name)
        if found is None:
            raise EditError(self.readiness(handle) or f"{self.name} has no trained editor for this model.")
        return found


# ---------------------------------------------------------------------------------------------
# The edit-time side MEND and KE share
# ---------------------------------------------------------------------------------------------
@dataclass
class GradientEditorHParams(HParams):
    """Edit-time settings of a gradient editor (MEND, KE); the edited layers and the networks come
    from the trained editor. Each method adds the scale it applies to the predicted shift."""

    checkpoint: str = ""  # folder of a trained editor; empty: the one trained with the default config

    checks: ClassVar[dict[str, FieldCheck]] = {"checkpoint": CHECKPOINT}


class GradientEditorMixin(TrainedEditorMixin):
    """A trained editor that turns the fine-tuning gradient of the edit into low-rank weight
    deltas (MEND, KE; mix in before :class:`~editing.methods.base.EditMethod`)."""

    edit_kind: ClassVar[str] = "weight_delta"
    train_minutes: ClassVar[int] = 5

    def editor_and_gradient(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                            build: Callable[[ModelHandle, dict[str, Any]], nn.Module], progress: ProgressFn,
                            ) -> tuple[nn.Module, Path, dict[str, GradientFactors], torch.Tensor]:
        """The editor ``hparams`` choose (built by ``build(handle, config)``), its checkpoint folder,
        and what it edits from: the gradient factors at its weights (``editor.weight_names``) of
        each request's loss on its new target, and those losses."""
        editor, folder = self.trained_editor(handle, hparams, lambda config: build(handle, config))
        progress(0.2, f"{self.name}: gradient of the edit loss")
        batch = target_batch(handle, [(r.text, r.target_new) for r in requests])
        factors, losses = gradient_factors(handle, editor.weight_names, batch)
        return editor, folder, factors, losses
