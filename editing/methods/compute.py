"""Key/value computation shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

These methods treat a block's MLP output projection ``W`` as a linear associative memory: the
*key* ``k`` is its input at the subject's last token (post-activation, ``d_ff`` wide), the
*value* its output. This module holds what they have in common:

* reading keys, MLP outputs and residual-stream states at the subject's last token of filled
  prompts (:func:`module_io_at_subject`, :func:`mlp_key_value`, :func:`residuals`), and keys
  averaged over context templates (:func:`context_keys`);
* optimising a target vector added at the subject's last token so the model predicts the new
  target (:func:`optimise_values`: ROME's ``v*`` at the MLP output, MEMIT's ``z`` in the residual);
* turning update factors into a :class:`~editing.core.edit.ParamDelta` in the parameter's storage
  shape (:func:`low_rank_delta`), and MEMIT's spreading of residuals over a range of layers
  (:func:`spread_residuals`, also used by AlphaEdit with another per-layer solver).

Conventions kept from kmeng01/rome and kmeng01/memit:

* Prompts are right-padded and every position is indexed explicitly, so padding never moves the
  subject token (the reference relies on right padding in the same way).
* The lookup position is the subject's *last* token (``fact_token = "subject_last"``, the
  reference's default), found by tokenising the template up to the subject
  (:func:`editing.models.tokens.subject_last_token`). The reference's other choices ``"subject_first"``
  and ``"last"`` (the prompt's last token) are available; ``"last"`` is the prompt's last token
  *before* any appended target tokens (the reference's ``-1`` would land inside a multi-token
  target, which its MEMIT code flags as a bug).
* Target tokens are ``" " + target`` without BOS (:func:`editing.models.tokens.target_ids`). The reference
  appends ``tok.decode(target_ids[:-1])`` to the prompt text and re-tokenises; here the target ids
  are appended directly, which gives the same sequence without a decode/encode round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from editing.analysis.scoring import check_length
from editing.core.edit import ParamDelta, WeightDelta
from editing.core.hooks import at_positions, capture, forward_until, modify
from editing.methods.context import fill
from editing.models.tokens import encode, pad_batch, pad_id, subject_last_token, target_ids

if TYPE_CHECKING:
    from editing.core.request import EditRequest
    from editing.models.loader import ModelHandle

ProgressFn = Callable[[float, str], None]


def _no_progress(_fraction: float, _message: str) -> None:
    pass


# -- reading representations ----------------------------------------------------------------------
FACT_TOKENS = ("subject_last", "subject_first", "last")


def lookup_position(handle: ModelHandle, template: str, subject: str, fact_token: str = "subject_last") -> int:
    """Index of the token whose key/value an edit writes, in ``template`` filled with ``subject``."""
    tok = handle.tokenizer
    if fact_token == "subject_last":
        return subject_last_token(tok, template, subject)
    if fact_token == "subject_first":
        return len(encode(tok, template[: template.index("{}")].rstrip()))
    if fact_token == "last":
        return len(encode(tok, template.replace("{}", subject))) - 1
    raise ValueError(f"Unknown fact_token {fact_token!r}; choose one of {', '.join(FACT_TOKENS)}.")


def subject_inputs(handle: ModelHandle, templates: Sequence[str], subjects: Sequence[str],
                   fact_token: str = "subject_last") -> tuple[list[list[int]], list[int]]:
    """Token ids of each template filled with its subject, and the lookup position in each."""
    tok = handle.tokenizer
    ids = [encode(tok, t.replace("{}", s)) for t, s in zip(templates, subjects, strict=True)]
    positions = [lookup_position(handle, t, s, fact_token) for t, s in zip(templates, subjects, strict=True)]
    return ids, positions


@torch.no_grad()
def module_io_at_subject(handle: ModelHandle, module_name: str, templates: Sequence[str], subjects: Sequence[str],
                         fact_token: str = "subject_last", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module_name`` at the lookup position (by default the subject's last
    token) of each filled template.

    ``templates`` hold ``{}`` where the subject goes. Returns two float32 ``(n, dim)`` tensors on
    the module's device (:meth:`ModelHandle.module_device`: the model's, unless a ``device_map``
    put the layer elsewhere); the forward pass stops after the module.
    """
    ids, positions = subject_inputs(handle, templates, subjects, fact_token)
    check_length(handle, ids)  # context templates can push a prompt past the position embeddings
    device = handle.module_device(module_name)
    ins, outs = [], []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start: start + batch_size]
        batch = pad_batch(chunk, pad_id(handle.tokenizer), handle.device)
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor(positions[start: start + batch_size], device=device)
        with capture(handle.model, [module_name], inputs=True) as got_in, \
                capture(handle.model, [module_name]) as got_out:
            forward_until(handle.model, module_name, **batch.model_inputs())
        # a module's input can still be on the previous layer's device (accelerate moves it inside
        # the module): gather the few positions there, then move only them
        ins.append(at_positions(got_in[module_name], rows, cols).to(device).float())
        outs.append(at_positions(got_out[module_name], rows, cols).float())
    return torch.cat(ins), torch.cat(outs)


def mlp_key_value(handle: ModelHandle, layer: int, templates: Sequence[str], subjects: Sequence[str],
                  fact_token: str = "subject_last") -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``(n, d_ff)`` and MLP outputs ``W k + b`` ``(n, d_model)`` at ``layer``."""
    return module_io_at_subject(handle, handle.arch.mlp_out_name(layer), templates, subjects, fact_token)


def residuals(handle: ModelHandle, layer: int, templates: Sequence[str], subjects: Sequence[str],
              fact_token: str = "subject_last") -> torch.Tensor:
    """Residual stream after block ``layer`` at the lookup position, ``(n, d_model)``."""
    return module_io_at_subject(handle, handle.arch.block_name(layer), templates, subjects, fact_token)[1]


def context_keys(handle: ModelHandle, layer: int, requests: Sequence[EditRequest],
                 context_groups: Sequence[Sequence[str]], fact_token: str = "subject_last") -> torch.Tensor:
    """Each request's key at ``layer`` averaged over context templates, ``(n_requests, d_ff)``.

    Keys are averaged within each group, then over groups: one group (ROME's flat template list)
    is a plain mean; MEMIT's ``[["{}"], prefixed]`` weighs the bare prompt as much as all prefixed
    ones together, as the reference's ``compute_ks`` does.
    """
    flat = [t for group in context_groups for t in group]
    templates = [fill(t, r.prompt) for r in requests for t in flat]
    subjects = [r.subject for r in requests for _ in flat]
    keys = mlp_key_value(handle, layer, templates, subjects, fact_token)[0].view(len(requests), len(flat), -1)
    means, start = [], 0
    for group in context_groups:
        means.append(keys[:, start: start + len(group)].mean(1))
        start += len(group)
    return torch.stack(means, 1).mean(1)


# -- target-value optimisation --------------------------------------------------------------------
@dataclass
class ValueHParams:
    """Hyper-parameters of the target-vector optimisation (the reference's ``v_*`` settings)."""

    steps: int = 20  # v_num_grad_steps (the last step only evaluates, as in the reference)
    lr: float = 0.5  # v_lr (Adam)
    weight_decay: float = 0.5  # v_weight_decay: penalty  wd * |δ| / |v_init|²
    kl_factor: float = 0.0625  # weight of KL(new ‖ old) on the essence prompt
    clamp_norm_factor: float = 4.0  # |δ| ≤ clamp * |v_init|
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    fact_token: str = "subject_last"  # where δ is added (see lookup_position)

    @classmethod
    def of(cls, hparams: Any) -> ValueHParams:
        """The settings named in a method's hyper-parameters the reference's way (ROME, MEMIT,
        AlphaEdit: ``v_num_grad_steps``, ``v_lr``, ``v_weight_decay``, ``kl_factor``,
        ``clamp_norm_factor``, ``fact_token``)."""
        return cls(steps=hparams.v_num_grad_steps, lr=hparams.v_lr, weight_decay=hparams.v_weight_decay,
                   kl_factor=hparams.kl_factor, clamp_norm_factor=hparams.clamp_norm_factor,
                   fact_token=hparams.fact_token)


@dataclass
class ValueResult:
    """Optimised target vectors, one row per request."""

    target: torch.Tensor  # (n, d_model): v_init + δ
    init: torch.Tensor  # (n, d_model): the vector before optimisation (bare prompt)
    target_prob: list[float]  # mean P(target) over the rewriting prompts at the last evaluation
    loss: list[float]  # total loss at the last evaluation
    steps: list[int] = field(default_factory=list)  # evaluations made before stopping

    @property
    def delta(self) -> torch.Tensor:
        return self.target - self.init


def site_module(handle: ModelHandle, layer: int, site: str) -> str:
    """Where a target vector lives: ``"mlp"`` = the MLP's output, ``"block"`` = the residual stream."""
    if site == "mlp":
        return handle.arch.mlp_name(layer)
    if site == "block":
        return handle.arch.block_name(layer)
    raise ValueError(f"Unknown site {site!r}: use 'mlp' or 'block'.")


def _clone_output(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone_output(v) for v in value)
    return value


@contextmanager
def replay_blocks_below(handle: ModelHandle, layer: int) -> Iterator[None]:
    """Within the block, the first forward pass runs as usual and records the outputs of the
    blocks below ``layer``; every later pass replays those outputs instead of recomputing them.

    For repeated passes over the same batch whose only change is at ``layer`` or above (the
    target-vector optimisation): the live blocks get the very same inputs, so results are
    unchanged bit for bit, and a 30-layer model edited at layer 11 skips 11 of its 30 blocks on
    every step but the first. Each block's own ``forward`` is shadowed on the instance, so module
    attributes, hooks and the model's loop over its blocks are untouched.
    """
    blocks = [handle.arch.block(handle.model, i) for i in range(max(0, layer))]
    recorded: dict[int, Any] = {}
    hooks = []

    def make_hook(index: int):
        def hook(_module, _args, output):
            recorded[index] = _clone_output(output)
        return hook

    def make_replay(index: int, original: Callable[..., Any]):
        def replay(*args, **kwargs):
            if index in recorded:
                return recorded[index]
            return original(*args, **kwargs)
        return replay

    shadowed: list[tuple[torch.nn.Module, Any]] = []  # (block, its own instance-level forward or None)
    try:
        for index, block in enumerate(blocks):
            hooks.append(block.register_forward_hook(make_hook(index)))
            shadowed.append((block, vars(block).get("forward")))
            block.forward = make_replay(index, block.forward)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for block, own in shadowed:
            if own is not None:
                block.forward = own
            else:
                del block.forward


def optimise_values(handle: ModelHandle, requests: Sequence[EditRequest], layer: int, site: str,
                    context_templates: Sequence[str], hparams: ValueHParams | None = None,
                    progress: ProgressFn | None = None, batch_rows: int = 256) -> ValueResult:
    """Find, per request, the vector at ``site`` of ``layer`` (at the lookup position,
    ``hparams.fact_token``) that makes the model predict ``target_new`` — ROME's ``compute_v`` /
    MEMIT's ``compute_z`` objective:

    mean over the context-templated prompts of the target's NLL per token, plus ``kl_factor`` ×
    KL(edited ‖ original) of the next-token distribution at the lookup position of ``kl_prompt``
    (for the default ``subject_last``: the subject's last token of "{} is a"), plus
    ``weight_decay`` × |δ| / |v_init|²; Adam on δ, clamped to ``clamp_norm_factor`` × |v_init|,
    stopping once the loss is under ``early_stop_loss``.

    Requests are optimised together in batches (each has its own δ and only its own rows depend
    on it, and Adam is element-wise, so this equals optimising them one by one).
    """
    hp = hparams or ValueHParams()
    progress = progress or _no_progress
    rows_per_request = len(context_templates) + 1
    per_chunk = max(1, batch_rows // rows_per_request)
    results = []
    chunks = [list(requests[i: i + per_chunk]) for i in range(0, len(requests), per_chunk)]
    for index, chunk in enumerate(chunks):
        def chunk_progress(fraction: float, message: str, _index: int = index) -> None:
            progress((_index + fraction) / len(chunks), message)

        results.append(_optimise_chunk(handle, chunk, layer, site, list(context_templates), hp, chunk_progress))
    return ValueResult(
        target=torch.cat([r.target for r in results]), init=torch.cat([r.init for r in results]),
        target_prob=[p for r in results for p in r.target_prob], loss=[v for r in results for v in r.loss],
        steps=[s for r in results for s in r.steps],
    )


def _optimise_chunk(handle: ModelHandle, requests: list[EditRequest], layer: int, site: str,
                    context_templates: list[str], hp: ValueHParams, progress: ProgressFn) -> ValueResult:
    tok, model = handle.tokenizer, handle.model
    n_req, n_ctx = len(requests), len(context_templates)
    seqs: list[list[int]] = []
    subject_pos: list[int] = []
    # target-token bookkeeping: (row, position, token id)
    t_rows, t_pos, t_ids = [], [], []
    target_lengths = []
    kl_rows = []
    for req in requests:
        new_ids = target_ids(tok, req.text, req.target_new)
        target_lengths.append(len(new_ids))
        for ctx in context_templates:
            template = fill(ctx, req.prompt)
            prompt_ids = encode(tok, template.replace("{}", req.subject))
            row = len(seqs)
            seqs.append(prompt_ids + new_ids[:-1])
            subject_pos.append(lookup_position(handle, template, req.subject, hp.fact_token))
            for offset, token in enumerate(new_ids):
                t_rows.append(row)
                t_pos.append(len(prompt_ids) - 1 + offset)  # the logit at p predicts token p + 1
                t_ids.append(token)
        kl_rows.append(len(seqs))
        seqs.append(encode(tok, hp.kl_prompt.replace("{}", req.subject)))
        subject_pos.append(lookup_position(handle, hp.kl_prompt, req.subject, hp.fact_token))
    check_length(handle, seqs)

    # δ lives where it is added (the site's layer); the loss where the LM head runs. The two differ
    # when a device_map spreads the layers over several GPUs; otherwise every .to() is a no-op.
    norm_name, site_name = handle.arch.final_norm, site_module(handle, layer, site)
    site_device, head_device = handle.module_device(site_name), handle.module_device(handle.arch.lm_head)
    at_site = partial(torch.tensor, device=site_device)
    at_head = partial(torch.tensor, device=head_device)
    batch = pad_batch(seqs, pad_id(tok), handle.device)
    owners = [r for r in range(n_req) for _ in range(n_ctx + 1)]
    rows_all = torch.arange(len(seqs), device=site_device)
    owner = at_site(owners)
    pos_all = at_site(subject_pos)
    first_rows = at_site([r * (n_ctx + 1) for r in range(n_req)])  # the bare "{}" template comes first
    t_rows_t, t_pos_t, t_ids_t = map(at_head, (t_rows, t_pos, t_ids))
    kl_rows_t = at_head(kl_rows)
    kl_pos_t = at_head([subject_pos[row] for row in kl_rows])
    kl_set = set(kl_rows)
    rewrite = [i for i in range(len(seqs)) if i not in kl_set]
    rewrite_rows, rewrite_owner = at_head(rewrite), at_head([owners[i] for i in rewrite])
    lengths_t = at_head(target_lengths).float()

    dim = handle.d_model
    delta = torch.zeros(n_req, dim, device=site_device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.lr)
    init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    done = torch.zeros(n_req, dtype=torch.bool, device=site_device)
    frozen = torch.zeros(n_req, dim, device=site_device)
    steps_taken = torch.zeros(n_req, dtype=torch.long)
    last_loss = torch.zeros(n_req)
    last_prob = torch.zeros(n_req)
    lm_head = handle.module(handle.arch.lm_head)

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        nonlocal init
        if init is None:
            init = out[first_rows, pos_all[first_rows]].detach().float().clone()
        return out.index_put((rows_all, pos_all), delta[owner].to(out.dtype), accumulate=True)

    # Blocks below the edited layer see the same batch on every step: computed once, then replayed.
    with replay_blocks_below(handle, layer):
        for step in range(hp.steps):
            optimiser.zero_grad()
            with torch.enable_grad(), ExitStack() as stack:
                hidden_store = stack.enter_context(capture(model, [norm_name], detach=False))
                stack.enter_context(modify(model, site_name, add_delta))
                # Only the final norm's output is needed: the LM head runs on the few scored positions.
                forward_until(model, norm_name, **batch.model_inputs())
                # gather the scored positions where the norm ran, then move only those rows
                hidden = hidden_store[norm_name]
                scored = at_positions(hidden, t_rows_t, t_pos_t).to(head_device)
                logprobs = torch.log_softmax(lm_head(scored).float(), dim=-1)
                token_lp = logprobs.gather(1, t_ids_t[:, None])[:, 0]
                row_lp = torch.zeros(len(seqs), device=head_device).index_add(0, t_rows_t, token_lp)
                nll_each = -row_lp[rewrite_rows] / lengths_t[rewrite_owner]
                nll = torch.zeros(n_req, device=head_device).index_add(0, rewrite_owner, nll_each) / n_ctx
                kl_lp = torch.log_softmax(lm_head(at_positions(hidden, kl_rows_t, kl_pos_t).to(head_device)).float(),
                                          dim=-1)
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
                assert init is not None
                decay = hp.weight_decay * delta.norm(dim=1) / init.norm(dim=1) ** 2
                loss = nll + kl + decay.to(head_device)
                prob = torch.zeros(n_req, device=head_device).index_add(0, rewrite_owner, torch.exp(-nll_each)) / n_ctx
                active = ~done
                last_loss[active.cpu()] = loss.detach().cpu()[active.cpu()]
                last_prob[active.cpu()] = prob.detach().cpu()[active.cpu()]
                steps_taken[active.cpu()] += 1
                newly_done = active & (loss.detach().to(site_device) < hp.early_stop_loss)
                frozen[newly_done] = delta.detach()[newly_done]
                done |= newly_done
                progress((step + 1) / hp.steps, f"optimising target values: step {step + 1}/{hp.steps}, "
                                                f"mean loss {float(loss.detach().mean()):.3f}")
                if bool(done.all()) or step == hp.steps - 1:
                    break
                (loss * (~done).float().to(head_device)).sum().backward()
            optimiser.step()
            with torch.no_grad():
                delta[done] = frozen[done]  # Adam's momentum must not move a request that has stopped
                max_norm = hp.clamp_norm_factor * init.norm(dim=1)
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
    assert init is not None
    final = torch.where(done[:, None], frozen, delta.detach())
    return ValueResult(target=init + final, init=init, target_prob=last_prob.tolist(), loss=last_loss.tolist(),
                       steps=steps_taken.tolist())


# -- updates --------------------------------------------------------------------------------------
def mlp_out_param(handle: ModelHandle, layer: int) -> str:
    """Name of the MLP output projection's weight at ``layer``."""
    return f"{handle.arch.mlp_out_name(layer)}.weight"


def low_rank_delta(handle: ModelHandle, param_name: str, values: torch.Tensor, keys: torch.Tensor) -> ParamDelta:
    """``ΔW = values @ keysᵀ`` (``(d_out, r)`` and ``(d_in, r)``) in the parameter's storage shape.

    Conv1D (GPT-2) stores ``(in, out)``, Linear ``(out, in)``. Kept as factors while that is
    smaller than the dense matrix.
    """
    values, keys = values.detach().float(), keys.detach().float()
    param = handle.parameter(param_name)
    conv1d = handle.arch.conv1d
    out_in_shape = (param.shape[1], param.shape[0]) if conv1d else tuple(param.shape)
    if (values.shape[0], keys.shape[0]) != out_in_shape:
        raise ValueError(f"Update factors {tuple(values.shape)} x {tuple(keys.shape)} do not fit {param_name} "
                         f"(out, in) = {out_in_shape}.")
    rank = values.shape[1]
    left, right = (keys, values.T) if conv1d else (values, keys.T)
    if rank * (values.shape[0] + keys.shape[0]) < values.shape[0] * keys.shape[0]:
        return ParamDelta.low_rank(left.contiguous(), right.contiguous())
    return ParamDelta(dense=(left @ right).contiguous())


#: (layer, keys (d_ff, n), residuals (d_model, n)) -> adjusted keys (d_ff, n), all float64;
#: the layer's update is ΔW = residuals @ adjusted_keysᵀ
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerUpdate:
    """What MEMIT-style spreading wrote into one layer (float32, on the layer's device)."""

    layer: int
    keys: torch.Tensor  # (n, d_ff) context-averaged keys with the earlier layers already updated
    z_current: torch.Tensor  # (n, d_model) residual at the target layer before this layer's update
    residual: torch.Tensor  # (n, d_model) the share of (z - z_current) written here
    adjusted_keys: torch.Tensor  # (n, d_ff) solver output; ΔW = residualᵀ-columns @ adjusted_keys
    delta: ParamDelta  # ΔW in the parameter's storage shape

    def update_out_in(self) -> torch.Tensor:
        """ΔW as a dense ``(d_out, d_in)`` matrix."""
        return self.residual.T @ self.adjusted_keys


def spread_residuals(handle: ModelHandle, requests: Sequence[EditRequest], layers: Sequence[int],
                     targets: torch.Tensor, context_groups: Sequence[Sequence[str]], solve: LayerSolver,
                     method: str, progress: ProgressFn | None = None, keys_after: bool = False,
                     fact_token: str = "subject_last") -> SpreadResult:
    """MEMIT's layer loop: write residual-stream targets ``z`` (``(n, d_model)`` at the last layer
    of ``layers``) into the MLP output projections of ``layers``, lowest first.

    For layer ``i`` of ``L``: keys ``K`` are recomputed with the earlier layers' updates in place,
    the remaining error ``z - z_current`` (bare prompts) is divided by ``L - i``, and
    ``ΔW = R · solve(i, K, R)ᵀ``. Each update is applied (as a temporary edit) before the next
    layer's keys are read, and every temporary edit is reverted before returning — exactly, by
    the edit machinery. With ``keys_after``, the keys of every layer (context-averaged and of the
    bare prompts) are also read with all updates applied (AlphaEdit keeps them to protect this
    edit from later ones).
    """
    progress = progress or _no_progress
    layers = sorted(layers)
    z_layer = layers[-1]
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    applied: list[WeightDelta] = []
    result = SpreadResult()
    try:
        for i, layer in enumerate(layers):
            progress(i / len(layers), f"{method}: writing layer {layer}")
            keys = context_keys(handle, layer, requests, context_groups, fact_token)
            z_current = residuals(handle, z_layer, prompts, subjects, fact_token)
            # (d_model, n), on this layer's device (z lives with the last layer)
            resid = ((targets - z_current).double().T / (len(layers) - i)).to(keys.device)
            adjusted = solve(layer, keys.double().T, resid)  # (d_ff, n)
            name = mlp_out_param(handle, layer)
            delta = low_rank_delta(handle, name, resid, adjusted)
            step = WeightDelta(method=f"{method} (computing)", requests=list(requests), hparams={},
                               deltas={name: delta})
            step.apply(handle)
            applied.append(step)
            result.updates.append(LayerUpdate(layer, keys, z_current, resid.T.float(), adjusted.T.float(), delta))
        if keys_after:
            for layer in layers:
                result.keys_after[layer] = context_keys(handle, layer, requests, context_groups, fact_token)
                result.bare_keys_after[layer] = mlp_key_value(handle, layer, prompts, subjects, fact_token)[0]
    finally:
        for step in reversed(applied):
            step.revert(handle)
    return result


@dataclass
class SpreadResult:
    """What :func:`spread_residuals` wrote, and (optionally) the keys read afterwards."""

    updates: list[LayerUpdate] = field(default_factory=list)
    keys_after: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d_ff), context-averaged
    bare_keys_after: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d_ff), bare prompts
