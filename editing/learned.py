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

The module also holds the training loop with atomic, resumable checkpoints (:func:`train_loop`),
the deterministic data order, the losses the editors are trained with (edit NLL, locality KL) and
the held-out evaluation (:func:`evaluate_editor`) that the training report and the tests share.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from editing.edit import EditError, ParamDelta
from editing.files import atomic_path, atomic_write_text
from editing.patching import in_training_memory
from editing.scoring import check_length, score_targets
from editing.tokens import encode, pad_batch, pad_id, target_ids
from editing.train import checkpoint_config, checkpoint_problem, trained_checkpoint, training_records

if TYPE_CHECKING:
    from editing.methods.base import EditMethod, HParams
    from editing.models import ModelHandle
    from editing.train import EditRecord

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
EDITOR_TENSORS = "editor.safetensors"


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


def module_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def out_in_shape(handle: ModelHandle, weight_name: str) -> tuple[int, int]:
    """``(out, in)`` of a projection, whatever its storage layout."""
    out_dim, in_dim = handle.arch.weight_out_in(handle.module(module_of(weight_name))).shape
    return int(out_dim), int(in_dim)


# ---------------------------------------------------------------------------------------------
# Token batches with scored target positions
# ---------------------------------------------------------------------------------------------
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
    """Tokenise ``(prompt, target)`` pairs the way :mod:`editing.scoring` scores them."""
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
    """``(rows,)`` mean negative log-likelihood of each row's target tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.labels[..., None])[..., 0]
    mask = batch.scored.float()
    return -(logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def target_hits(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """``(rows,)`` fraction of each row's target tokens that are the argmax (token accuracy)."""
    hits = (logits.argmax(-1) == batch.labels) & batch.scored
    return hits.float().sum(-1) / batch.scored.float().sum(-1).clamp(min=1)


def masked_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(pre ‖ post) between next-token distributions."""
    pre = torch.log_softmax(pre_logits.float(), dim=-1)
    post = torch.log_softmax(post_logits.float(), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    weights = mask.float()
    return (kl * weights).sum() / weights.sum().clamp(min=1)


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
    # editing.hooks.modify sees only the output; a weight shift needs the module's input too.
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
            left = shift.left[rows.to(shift.left.device)]
            right = shift.right[rows.to(shift.right.device)]
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
    target NLL with respect to each weight (and the ``(examples,)`` losses).

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
    for name, grad in zip(weight_names, grads, strict=True):
        grad = torch.zeros_like(outputs[name]) if grad is None else grad
        mask = (grad != 0).any(-1) & batch.attention_mask.bool()
        factors[name] = GradientFactors(inputs[name].float(), grad.detach().float(), mask)
    return factors, losses.detach()


# ---------------------------------------------------------------------------------------------
# Training data order, losses on edit records
# ---------------------------------------------------------------------------------------------
def batch_indices(n_items: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Record indices of training step ``step``: epochs of seeded permutations, so a resumed
    run sees exactly the batches an uninterrupted one would."""
    out = []
    position = step * batch_size
    for offset in range(batch_size):
        epoch, index = divmod(position + offset, n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[index]))
    return out


@dataclass
class RecordBatch:
    """Everything a training step needs for a batch of edit records.

    ``probes`` holds the equivalence rows (each edit prompt and its paraphrases, with the new
    target) followed by the locality rows (unrelated prompts with their answers), so one
    forward pass scores both; ``example`` says which record each probe row belongs to.
    """

    edit: TargetBatch  # each record's edit prompt with its new target
    probes: TargetBatch
    example: torch.Tensor
    n_outer: int  # the first n_outer probe rows are equivalence rows, the rest locality rows
    local_pre_logits: torch.Tensor  # the unedited model's logits on the locality rows


def neighbour_facts(records: Sequence[EditRecord], per_record: int,
                    pool: Sequence[EditRecord] | None = None) -> list[tuple[tuple[str, str], ...]]:
    """For each record, up to ``per_record`` facts of other subjects asked with the same prompt
    template (so of the same relation: CounterFact's "neighbourhood"), as (prompt, true answer).

    They are taken from ``pool`` (default: ``records``) in order, starting after the record
    itself (records outside the pool start one fact further than the previous such record of
    their template), so the choice is deterministic. An edit should leave them alone; random
    unrelated facts alone do not teach an editor that (MEND then moved "The capital of Spain is"
    along with an edit of France's capital). Training passes the training memory as ``pool``.
    """
    pool = records if pool is None else pool
    by_template: dict[str, list[EditRecord]] = {}
    for record in pool:
        if record.request.target_true:
            by_template.setdefault(record.request.prompt, []).append(record)
    outside_pool: dict[str, int] = {}  # records of each template seen that are not in the pool
    out = []
    for record in records:
        group = by_template.get(record.request.prompt, [])
        start = next((i + 1 for i, other in enumerate(group) if other is record), None)
        if start is None:  # spread such records over the group instead of all taking its first facts
            start = outside_pool.get(record.request.prompt, 0)
            outside_pool[record.request.prompt] = start + 1
        chosen: list[tuple[str, str]] = []
        for offset in range(len(group)):
            other = group[(start + offset) % len(group)].request
            if other.subject != record.request.subject and len(chosen) < per_record:
                chosen.append((other.text, str(other.target_true)))
        out.append(tuple(chosen))
    return out


def record_batch(handle: ModelHandle, records: Sequence[EditRecord], n_paraphrases: int = 2,
                 neighbours: Sequence[Sequence[tuple[str, str]]] | None = None) -> RecordBatch:
    """Build the edit batch and the probe batch (equivalence, then locality rows: each record's
    locality facts and its ``neighbours``, see :func:`neighbour_facts`)."""
    edit_pairs, outer_pairs, outer_rows, local_pairs, local_rows = [], [], [], [], []
    for index, record in enumerate(records):
        request = record.request
        edit_pairs.append((request.text, request.target_new))
        for prompt in (request.text, *record.paraphrases[:n_paraphrases]):
            outer_pairs.append((prompt, request.target_new))
            outer_rows.append(index)
        for prompt, answer in (*record.locality, *(neighbours[index] if neighbours else ())):
            local_pairs.append((prompt, answer))
            local_rows.append(index)
    probes = target_batch(handle, outer_pairs + local_pairs)
    n_outer = len(outer_pairs)
    with torch.no_grad():
        local_pre = handle.model(**probes.rows(slice(n_outer, None)).model_inputs()).logits.float()
    return RecordBatch(edit=target_batch(handle, edit_pairs), probes=probes,
                       example=torch.tensor(outer_rows + local_rows), n_outer=n_outer, local_pre_logits=local_pre)


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


# ---------------------------------------------------------------------------------------------
# Checkpointed, resumable training loop
# ---------------------------------------------------------------------------------------------
def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       param_groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (a crash never leaves a half-written file under ``path``)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})


StepFn = Callable[[int], dict[str, float]]


def train_loop(editor: nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, steps: int, folder: Path,
               progress: Callable[[float, str], None], lock: Any, checkpoint_every: int = 100,
               lr_at: Callable[[int], float] | None = None, log_every: int = 25) -> dict[str, Any]:
    """Run ``step_fn(step)`` for ``steps`` steps, saving a resumable checkpoint every
    ``checkpoint_every`` steps and the trained editor at the end.

    ``step_fn`` computes the loss, calls ``backward`` and returns scalars to log; the loop does
    the optimiser step. If ``folder`` holds a checkpoint the run continues from it; with the
    seeded data order of :func:`batch_indices` the result equals an uninterrupted run.
    ``lr_at(step)`` is a multiplier on each group's base learning rate (a schedule needs no state).
    ``lock`` (the model handle's) is held during each step only: steps hook the shared model, and
    edit sessions using the same model run between steps.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    start, history, elapsed_before = 0, [], 0.0
    if (folder / STATE_META).exists() and (folder / STATE_TENSORS).exists():
        meta = json.loads((folder / STATE_META).read_text())
        tensors, tensor_meta = load_tensors(folder / STATE_TENSORS)
        if tensor_meta.get("step") == str(meta["step"]):  # both files of the same save
            editor.load_state_dict({k[len("editor."):]: v for k, v in tensors.items() if k.startswith("editor.")})
            _restore_optimizer(optimizer, tensors, meta["param_groups"])
            start, history, elapsed_before = meta["step"], meta["history"], meta.get("train_seconds", 0.0)
            progress(start / max(steps, 1), f"resuming at step {start}")

    began = time.perf_counter()

    def save(step: int) -> None:
        tensors = {f"editor.{k}": v for k, v in editor.state_dict().items()}
        optim_tensors, groups = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
        save_tensors(folder / STATE_TENSORS, tensors, metadata={"step": str(step)})
        meta = {"step": step, "param_groups": groups, "history": history,
                "train_seconds": elapsed_before + time.perf_counter() - began}
        atomic_write_text(folder / STATE_META, json.dumps(meta))

    editor.train()
    running: dict[str, float] = {}
    for step in range(start, steps):
        if lr_at is not None:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        with lock:
            logs = step_fn(step)
        optimizer.step()
        for key, value in logs.items():
            running[key] = running.get(key, 0.0) + value
        done = step + 1
        if done % log_every == 0 or done == steps:
            count = log_every if done % log_every == 0 else done % log_every
            entry = {"step": done, **{k: round(v / count, 5) for k, v in running.items()}}
            history.append(entry)
            running = {}
            summary = ", ".join(f"{k} {v:.3g}" for k, v in entry.items() if k != "step")
            progress(done / steps, f"step {done}/{steps}: {summary}")
        if done % checkpoint_every == 0 and done < steps:
            save(done)
    editor.eval()
    save(steps)
    save_tensors(folder / EDITOR_TENSORS, editor.state_dict())
    return {"steps": steps, "train_seconds": round(elapsed_before + time.perf_counter() - began, 1),
            "history": history}


def load_editor_weights(editor: nn.Module, folder: Path) -> nn.Module:
    """Load a trained editor's weights saved by :func:`train_loop` (safetensors, no pickle)."""
    tensors, _ = load_tensors(folder / EDITOR_TENSORS)
    editor.load_state_dict(tensors)
    return editor.eval()


def lr_warmup_linear(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up then linear decay to zero (KE's schedule)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def seeded_generator(seed: int) -> torch.Generator:
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


#: the few-step training of MEND and KE (their trainers' ``quick`` config): an editor that runs
QUICK_TRAINING: dict[str, Any] = {"steps": 3, "batch_size": 2, "n_eval": 0}

#: a gradient-based editor's training objective on one batch: (the batch's edit records, their
#: tokenised batch, the gradient factors at the edited weights) -> (loss, figures to log)
EditorObjective = Callable[[Sequence["EditRecord"], RecordBatch, dict[str, GradientFactors]],
                           tuple[torch.Tensor, dict[str, float]]]


def train_gradient_editor(handle: ModelHandle, method: EditMethod, editor: nn.Module,
                          optimizer: torch.optim.Optimizer, objective: EditorObjective, config: dict[str, Any],
                          folder: Path, progress: Callable[[float, str], None],
                          lr_at: Callable[[int], float] | None = None) -> dict[str, Any]:
    """The training run MEND and KE share: seeded batches of training edit records, the gradient
    factors of the edit loss at the editor's weights (``editor.weight_names``), the method's
    ``objective``, a finite-loss guard and gradient clipping, the resumable :func:`train_loop`;
    then the editor's figures on held-out records (the report)."""
    records = training_records(config, "train")
    # Neighbours are kept unchanged by the locality term: only those of the training memory, as
    # the records' own locality facts (editing.train.edit_records), never facts evaluation probes.
    memory = [r for r in records if in_training_memory(r.request.subject)]
    neighbours = neighbour_facts(records, config["n_neighbours"], pool=memory)

    def step(index: int) -> dict[str, float]:
        indices = batch_indices(len(records), config["batch_size"], config["seed"], index)
        chosen = [records[i] for i in indices]
        batch = record_batch(handle, chosen, config["n_paraphrases"], [neighbours[i] for i in indices])
        factors, _ = gradient_factors(handle, editor.weight_names, batch.edit)
        loss, figures = objective(chosen, batch, factors)
        finite_or_raise(loss, f"{method.name}'s training loss").backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), config["grad_clip"])
        return figures

    result = train_loop(editor, optimizer, step, config["steps"], folder, progress, handle.lock,
                        checkpoint_every=config["checkpoint_every"], log_every=config["log_every"], lr_at=lr_at)
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


def finite_or_raise(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Guard a training step against NaN/inf losses (a diverged editor must not be saved)."""
    if not math.isfinite(float(tensor.detach())):
        raise FloatingPointError(f"{what} became {float(tensor.detach())}; lower the learning rate.")
    return tensor


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
        _EDITORS[key] = (load_editor_weights(build(config), folder), config)
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
