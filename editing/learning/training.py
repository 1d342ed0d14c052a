"""The one training loop of the learned editors (MEND, KE, SERAC) and its checkpoint format.

Every learned part — MEND's and KE's editor networks, SERAC's scope classifier and its
counterfactual model — is trained by :func:`train_loop` and stored the same way. A part named
``part`` (``"editor"``, ``"classifier"``, ``"counterfactual"``) of a checkpoint folder is:

* ``<part>.safetensors`` — the trained weights (state dict, each tied tensor once), written when
  the part has finished; its metadata holds the format version, the steps, the training seconds
  and the loss history. Its presence means the part is trained.
* ``<part>.state.safetensors`` and ``<part>.state.json`` — the resume state while training runs
  (weights as ``module.*``, optimiser moments as ``optim.<param>.<key>``; step, optimiser groups,
  history, seconds), written every ``checkpoint_every`` steps and removed once the part is done.

Every file is written atomically (:mod:`editing.storage.files`), so a crash leaves the previous
checkpoint, never half a file; the two state files carry the same step, and a mismatched pair
(a crash between the two writes) is ignored. Pickle is never used. Resuming gives the weights of
an uninterrupted run as long as each step's data and randomness depend on the step alone (the
trainers seed them per step) and the learning rate is a function of the step (``lr_at``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from editing.core.edit import EditError
from editing.storage.files import atomic_path, atomic_write_text

#: version of the checkpoint layout above; part of every checkpoint's cache key and of its
#: ``editor.json``, so folders written in an older layout are never read as this one.
#: 1: MEND/KE ``state.*`` + ``editor.safetensors``, SERAC ``counterfactual/`` folder.
#: 2: one layout for every part (this module).
CHECKPOINT_FORMAT = 2

ProgressFn = Callable[[float, str], None]
#: one training step: computes the loss of step ``step`` (its data and randomness seeded by the
#: step) and returns it with scalars to log; the loop does the backward pass and the update
StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]
#: the learning rate of step ``step`` of a parameter group whose base rate is ``base``
LrSchedule = Callable[[float, int], float]


# ---------------------------------------------------------------------------------------------
# Tensor files
# ---------------------------------------------------------------------------------------------
def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (a crash never leaves a half-written file under ``path``)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})


def _tied_names(module: nn.Module) -> dict[str, str]:
    """State-dict names whose tensor is another entry's (GPT-2's ``lm_head`` is its ``wte``),
    each mapped to the first name holding that tensor."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every tied tensor stored once (safetensors refuses shared memory)."""
    tied = _tied_names(module)
    return {name: tensor for name, tensor in module.state_dict().items() if name not in tied}


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> nn.Module:
    """Load a state dict written by :func:`module_tensors`: every entry must be there (tied ones
    come with the tensor they share) and nothing else, with the module's shapes."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if name not in _tied_names(module)]
    if missing or unexpected:
        raise EditError(f"{source} does not fit the {type(module).__name__} it is loaded into "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]}); train it again.")
    return module


def part_file(folder: Path, part: str) -> Path:
    """The file of a finished part's weights."""
    return folder / f"{part}.safetensors"


def is_trained(folder: Path, part: str) -> bool:
    """Whether ``part`` has finished training in ``folder``."""
    return part_file(folder, part).exists()


def trained_tensors(folder: Path, part: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A finished part's weights and metadata; refuses a file of another checkpoint format."""
    path = part_file(folder, part)
    tensors, meta = load_tensors(path)
    if meta.get("format") != str(CHECKPOINT_FORMAT):
        raise EditError(f"{path} is in checkpoint format {meta.get('format', 1)}, not {CHECKPOINT_FORMAT} "
                        f"(written by an older EditScope); train the editor again.")
    return tensors, meta


def load_trained(module: nn.Module, folder: Path, part: str) -> nn.Module:
    """``module`` with the weights of the finished ``part``, in eval mode."""
    tensors, _meta = trained_tensors(folder, part)
    return load_into(module, tensors, part_file(folder, part)).eval()


# ---------------------------------------------------------------------------------------------
# Optimiser state as tensors + JSON
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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def finite_or_raise(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Guard a training step against NaN/inf losses (a diverged part must not be saved)."""
    if not math.isfinite(float(tensor.detach())):
        raise FloatingPointError(f"{what} became {float(tensor.detach())}; lower the learning rate.")
    return tensor


def train_loop(module: nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, steps: int, folder: Path,
               progress: ProgressFn, *, part: str = "editor", what: str = "the training loss",
               lock: AbstractContextManager[Any] | None = None, checkpoint_every: int = 100, log_every: int = 25,
               lr_at: LrSchedule | None = None, grad_clip: float | None = None, label: str = "",
               span: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Train ``module`` for ``steps`` steps and store it as ``part`` of ``folder``.

    Each step: the learning rates ``lr_at(base, step)``, cleared gradients, then under ``lock``
    (the model handle's, where the step runs the shared model: edit sessions run between steps)
    ``step_fn(step)``, the finite-loss guard (``what`` names the loss) and the backward pass;
    then gradient clipping at ``grad_clip`` and the optimiser's step. Every ``checkpoint_every``
    steps (0: never) the resume state is saved, then every ``log_every`` steps (and at the end)
    the logged scalars, averaged since the last report, go to the history and to ``progress`` as
    ``"{label}step {done}/{steps}: ..."``, its fraction mapped into ``span``. A progress callback
    that raises stops the run after a checkpoint is safe. A part already finished is loaded,
    not trained; an interrupted one resumes from its state. Returns steps, seconds and history.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock if lock is not None else nullcontext()
    low, high = span
    final, state_tensors, state_meta = part_file(folder, part), folder / f"{part}.state.safetensors", \
        folder / f"{part}.state.json"
    if final.exists():
        tensors, meta = trained_tensors(folder, part)
        load_into(module, tensors, final).eval()
        progress(high, f"{label}resuming at step {steps}: already trained")
        return {"steps": steps, "train_seconds": round(float(meta.get("train_seconds", 0.0)), 1),
                "history": json.loads(meta.get("history", "[]"))}
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    start, history, elapsed_before = 0, [], 0.0
    if state_meta.exists() and state_tensors.exists():
        meta = json.loads(state_meta.read_text())
        tensors, tensor_meta = load_tensors(state_tensors)
        if tensor_meta.get("step") == str(meta["step"]):  # both files of the same save
            load_into(module, {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")},
                      state_tensors)
            _restore_optimizer(optimizer, tensors, meta["param_groups"])
            start, history, elapsed_before = meta["step"], meta["history"], meta.get("train_seconds", 0.0)
            progress(low + (high - low) * start / max(steps, 1), f"{label}resuming at step {start}")

    began = time.perf_counter()

    def seconds() -> float:
        return elapsed_before + time.perf_counter() - began

    def save_state(step: int) -> None:
        tensors = {f"module.{k}": v for k, v in module_tensors(module).items()}
        optim_tensors, groups = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
        save_tensors(state_tensors, tensors, metadata={"step": str(step)})
        atomic_write_text(state_meta, json.dumps({"step": step, "param_groups": groups, "history": history,
                                                  "train_seconds": seconds()}))

    module.train()
    running: dict[str, float] = {}
    for step in range(start, steps):
        if lr_at is not None:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr_at(base, step)
        optimizer.zero_grad(set_to_none=True)
        with lock:
            loss, logs = step_fn(step)
            finite_or_raise(loss, what).backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        optimizer.step()
        for key, value in logs.items():
            running[key] = running.get(key, 0.0) + value
        done = step + 1
        message = None
        if done % log_every == 0 or done == steps:
            count = log_every if done % log_every == 0 else done % log_every
            entry = {"step": done, **{k: round(v / count, 5) for k, v in running.items()}}
            history.append(entry)
            running = {}
            summary = ", ".join(f"{k} {v:.3g}" for k, v in entry.items() if k != "step")
            message = f"{label}step {done}/{steps}: {summary}"
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            save_state(done)  # before the report: a progress callback that raises keeps this step
        if message is not None:
            progress(low + (high - low) * done / steps, message)
    module.eval()
    train_seconds = seconds()
    save_tensors(final, module_tensors(module), metadata={
        "format": str(CHECKPOINT_FORMAT), "steps": str(steps), "train_seconds": str(train_seconds),
        "history": json.dumps(history)})
    state_tensors.unlink(missing_ok=True)  # resume state, no longer needed (SERAC's: twice its model)
    state_meta.unlink(missing_ok=True)
    return {"steps": steps, "train_seconds": round(train_seconds, 1), "history": history}


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules (functions of the step: a resumed run needs no scheduler state)
# ---------------------------------------------------------------------------------------------
def lr_warmup_linear(warmup: int, total: int) -> LrSchedule:
    """Linear warm-up then linear decay to zero (KE's schedule)."""
    def rate(base: float, step: int) -> float:
        if step < warmup:
            return base * ((step + 1) / warmup)
        return base * max(0.0, (total - step) / max(1, total - warmup))

    return rate


def lr_warmup_times_decay(warmup: int, total: int) -> LrSchedule:
    """Linear warm-up multiplied by a linear decay over the whole run (SERAC's counterfactual model)."""
    def rate(base: float, step: int) -> float:
        return base * min(1.0, (step + 1) / max(1, warmup)) * (1.0 - step / total)

    return rate
