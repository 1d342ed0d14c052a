"""GRACE (Hartvigsen et al., NeurIPS 2023, "Aging with GRACE: Lifelong Model Editing with
Discrete Key-Value Adaptors").

GRACE wraps one layer with a codebook of entries ``(key, value, radius ε, label)``. A query is
the wrapped layer's input; if its nearest key lies within that key's deferral radius, the layer's
output is replaced by the key's value, otherwise the layer runs unchanged. Here the wrapped layer is
the MLP output projection of block ``layer`` (the reference wraps a linear layer of the MLP, e.g.
``mlp.c_fc`` of GPT2-XL block 35 or ``down_proj`` of LLaMA in EasyEdit): keys live in the FFN's
hidden space, values replace the FFN's output.

An edit takes the query at the edit prompt's last token and updates the codebook as the paper's
Algorithm 1 does:

* no entry within ``ε_init + ε_nearest``: **add** an entry (key = query, radius ``ε_init``) and
  train its value (Adam, ``lr`` 1.0, at most ``n_iter`` steps) so the model outputs the target;
* the nearest entry has the same label: **expand** its radius to the distance ("coverage");
* the nearest entry has another label: **split** — add the new entry and set both radii to half
  the distance between the keys (when the two keys coincide — the same input edited again — the
  old entry is retired instead, since halving a zero distance leaves no usable radius).

Stacked edits cooperate through one codebook. Each :class:`GracePatch` holds the entries it added
and the radius changes (expand/split) it made to entries of earlier GRACE edits on the same layer,
recorded as overrides keyed by the earlier edit's ``uid`` — earlier edits are never mutated, so
undoing an edit restores the radii it changed. Every applied GracePatch hooks the layer, but only the
newest one on that layer acts: it merges the codebooks of all applied GRACE edits on the layer (in
stack order, applying overrides) and replaces an output wherever the nearest key over *all* active
entries lies within its radius, which is the paper's single, growing codebook.

Deviations: queries are matched at every position rather than at a designated last token (a
forward hook does not know where each right-padded row ends; the edit prompt's last token matches
its key exactly, and other positions only match when they fall within a radius); values start
"warm" (the layer's own output, the reference's ``val_init: warm`` option; "cold" is available) and
training stops early once the target is predicted with loss below ``stop_loss``; on "expand" the
nearest entry's value is trained further on the new input (as in the reference, where the nearest
value keeps training), stored as a value override of this edit. ``ε_init`` is a distance in the
key space, so its default is derived from the model: ``eps_fraction`` of the median distance
between the keys of different fact-base prompts (the reference's absolute ``eps: 1.0`` was tuned
for GPT2-XL and T5).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from editing.core.edit import Edit, EditError, ModulePatch, handle_stack, register_edit_type
from editing.core.hooks import capture
from editing.core.request import EditRequest
from editing.learning.targets import target_batch, target_hits, target_nll
from editing.methods.base import EditMethod, HParams, ProgressFn, register, scaled_layer
from editing.methods.checks import COUNT, LAYER, NON_NEGATIVE, POSITIVE, SEED, Choice, FieldCheck, Maybe
from editing.methods.patching import module_inputs, retained_facts
from editing.models.loader import ModelHandle

#: GRACE edits GPT2-XL at block 35 of 48
GRACE_LAYER_FRACTION = 35 / 48
#: keys closer than this fraction of ε_init count as the same input
SAME_INPUT = 1e-3
#: relative slack on a radius expanded to reach an input
SLACK = 1e-4


@dataclass
class Codebook:
    """The merged entries of the active GRACE edits on one layer."""

    keys: torch.Tensor  # (n, d_key)
    values: torch.Tensor  # (n, d_value)
    radii: torch.Tensor  # (n,)
    labels: list[str]
    ids: list[tuple[str, int]]  # (uid of the edit that added the entry, index in it)

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest live key of each query (``(..., d)`` -> ``(...)``)."""
        flat = queries.reshape(-1, queries.shape[-1]).float()
        # Exact Euclidean distances: the matrix-product shortcut loses the small distances that
        # decide whether a query sits inside a radius.
        dist = torch.cdist(flat, self.keys.to(flat.device).float(), compute_mode="donot_use_mm_for_euclid_dist")
        retired = self.radii.to(flat.device) < 0  # a relabelled input's old entry takes no part
        best, index = dist.masked_fill(retired, float("inf")).min(-1)
        return best.reshape(queries.shape[:-1]), index.reshape(queries.shape[:-1])


@register_edit_type
@dataclass(eq=False)
class GracePatch(ModulePatch):
    """Codebook entries one GRACE edit adds to block ``layer``'s MLP output projection.

    Changes this edit makes to entries of earlier GRACE edits hold while it is applied:
    ``overrides`` lists ``[uid, index, radius]`` (new radii, from split or expand) and
    ``value_overrides`` lists ``[uid, index]`` whose new values are the rows of
    ``override_values`` (an expanded entry retrained on this edit's input).
    """

    layer: int = 0
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    radii: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    labels: list[str] = field(default_factory=list)
    overrides: list[list[Any]] = field(default_factory=list)
    value_overrides: list[list[Any]] = field(default_factory=list)
    override_values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))

    @property
    def n_entries(self) -> int:
        return len(self.labels)

    @property
    def patched_layers(self) -> tuple[int, ...]:
        """Blocks whose FFN output the edit changes (their FFN inputs stay as they were)."""
        return (self.layer,)

    def hooks(self, handle: ModelHandle) -> list[tuple[str, Any]]:
        def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            group = active_grace_edits(handle, self.layer)
            if not group or group[-1] is not self:
                return output  # the newest GRACE edit on this layer answers for all of them
            book = merged_codebook(group)
            if not len(book):
                return output
            distance, index = book.nearest(args[0])
            hit = distance <= book.radii.to(distance.device)[index]
            if not bool(hit.any()):
                return output
            values = book.values.to(output.device, output.dtype)[index]
            return torch.where(hit[..., None], values, output)

        return [(handle.arch.mlp_out_name(self.layer), hook)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii,
                "override_values": self.override_values}

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer, "uid": self.uid, "labels": list(self.labels), "overrides": self.overrides,
                "value_overrides": self.value_overrides}

    @classmethod
    def from_parts(cls, common: dict[str, Any], config: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> GracePatch:
        return cls(layer=int(config["layer"]), uid=str(config["uid"]), labels=list(config["labels"]),
                   overrides=[list(o) for o in config.get("overrides", [])],
                   value_overrides=[list(o) for o in config.get("value_overrides", [])],
                   keys=tensors["keys"], values=tensors["values"], radii=tensors["radii"],
                   override_values=tensors["override_values"], **common)


def active_grace_edits(handle: ModelHandle, layer: int) -> list[GracePatch]:
    """The GRACE edits applied to ``handle`` on block ``layer``, oldest first."""
    return [e for e in handle_stack(handle) if isinstance(e, GracePatch) and e.layer == layer]


def merged_codebook(patches: list[GracePatch]) -> Codebook:
    """One codebook from GRACE edits in stack order; later edits' radius overrides win."""
    ids: list[tuple[str, int]] = []
    keys, values, radii, labels = [], [], [], []
    for patch in patches:
        for index in range(patch.n_entries):
            ids.append((patch.uid, index))
        keys.append(patch.keys)
        values.append(patch.values)
        radii.append(patch.radii.clone())
        labels.extend(patch.labels)
    if not ids:
        return Codebook(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0), [], [])
    device = keys[0].device
    radius = torch.cat([r.to(device) for r in radii])
    value = torch.cat([v.to(device) for v in values])
    position = {entry: i for i, entry in enumerate(ids)}
    for patch in patches:
        for uid, index, new_radius in patch.overrides:
            where = position.get((uid, int(index)))
            if where is not None:
                radius[where] = float(new_radius)
        for row, (uid, index) in enumerate(patch.value_overrides):
            where = position.get((uid, int(index)))
            if where is not None:  # (torch.cat made ``value`` a fresh tensor: no edit is written)
                value[where] = patch.override_values[row].to(device)
    return Codebook(torch.cat([k.to(device) for k in keys]), value, radius, labels, ids)


def count_codebook_entries(edits: list[Edit] | tuple[Edit, ...]) -> int:
    """Entries over a stack of edits (the size of GRACE's codebook)."""
    return sum(edit.n_entries for edit in edits if isinstance(edit, GracePatch))


@dataclass
class GRACEHParams(HParams):
    """GRACE's hyper-parameters (reference defaults: lr 1.0, 100 iterations, ``eps_expand: coverage``).

    ``eps_init`` is the initial deferral radius in the key space; when None it is ``eps_fraction``
    times the median distance between the keys of different fact-base prompts on this model.
    """

    layer: int = 0
    eps_init: float | None = None
    eps_fraction: float = 0.35
    lr: float = 1.0
    n_iter: int = 100
    stop_loss: float = 0.05
    value_init: str = "warm"
    seed: int = 0

    checks: ClassVar[dict[str, FieldCheck]] = {
        "layer": LAYER,
        "eps_init": Maybe(POSITIVE),  # None: derived from the model
        "eps_fraction": POSITIVE,
        "lr": POSITIVE,
        "n_iter": COUNT,
        "stop_loss": NON_NEGATIVE,
        "value_init": Choice(("warm", "cold")),  # the layer's output, or random
        "seed": SEED,
    }

    @classmethod
    def model_defaults(cls, handle: ModelHandle, preset: Mapping[str, Any]) -> GRACEHParams:
        """The layer at GRACE's GPT2-XL depth (35 of 48)."""
        return cls(layer=scaled_layer(handle.n_layers, GRACE_LAYER_FRACTION))


_EPS_CACHE: dict[tuple[str, int, int], float] = {}


def key_distance_scale(handle: ModelHandle, layer: int, n_prompts: int = 64, seed: int = 0) -> float:
    """Median distance between the GRACE keys (last-token queries) of different fact-base prompts.

    Computed on the unedited model once per (model, layer) and cached in memory.
    """
    cache_key = (handle.fingerprint(), layer, n_prompts)
    if cache_key not in _EPS_CACHE:
        prompts = [prompt for prompt, _ in retained_facts(None, n_prompts, seed=seed)]
        name = handle.arch.mlp_out_name(layer)
        queries = module_inputs(handle, name, prompts, last_only=True)
        dist = torch.cdist(queries, queries, compute_mode="donot_use_mm_for_euclid_dist")
        upper = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
        _EPS_CACHE[cache_key] = float(upper.median())
    return _EPS_CACHE[cache_key]


@register
class GRACE(EditMethod):
    name = "GRACE"
    hparams_class = GRACEHParams
    edit_kind = "module_patch"
    summary = "Adds key-value codebook entries at one layer; outputs are replaced only within a deferral radius."

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, GRACEHParams)
        torch.manual_seed(hparams.seed)
        eps_init = hparams.eps_init
        if eps_init is None:
            eps_init = hparams.eps_fraction * key_distance_scale(handle, hparams.layer, seed=hparams.seed)
        module_name = handle.arch.mlp_out_name(hparams.layer)
        earlier = active_grace_edits(handle, hparams.layer)
        patch = GracePatch(method=self.name, requests=requests, hparams=hparams.to_dict(), layer=hparams.layer,
                           keys=torch.zeros(0, handle.d_ff, device=handle.device),
                           values=torch.zeros(0, handle.d_model, device=handle.device),
                           radii=torch.zeros(0, device=handle.device),
                           override_values=torch.zeros(0, handle.d_model, device=handle.device))
        actions: list[str] = []
        for number, request in enumerate(requests):
            progress(number / len(requests), f"GRACE: edit {number + 1} of {len(requests)}")
            batch = target_batch(handle, [(request.text, request.target_new)])
            position = int(batch.scored[0].float().argmax())  # the prompt's last token
            with torch.no_grad(), capture(handle.model, [module_name], inputs=True) as store_in, \
                    capture(handle.model, [module_name]) as store_out:
                handle.model(**batch.model_inputs())
            query = store_in[module_name][0, position].float()
            book = merged_codebook([*earlier, patch])
            action = "add"
            if len(book):
                distance, index = (t.item() for t in book.nearest(query[None]))
                index = int(index)
                if distance <= eps_init + float(book.radii[index]):
                    action = "expand" if book.labels[index] == request.target_new else "split"
            if action == "expand":
                if distance > float(book.radii[index]):
                    # "coverage": the radius reaches the new input (with a hair of slack, since the
                    # same input in another batch can come out a few ulps further away)
                    _set_radius(patch, book.ids[index], distance * (1 + SLACK))
                # The reference keeps training the nearest entry's value on the new input.
                old_value = book.values[index].float()
                value, steps = self._train_value(handle, module_name, batch, position, old_value, hparams)
                if steps:
                    _set_value(patch, book.ids[index], value)
                actions.append(action)
                continue
            radius = eps_init
            if action == "split" and distance / 2 <= SAME_INPUT * eps_init:
                # The same input edited again with another label: halving a zero distance would
                # leave two unusable radii, so the old entry retires and the new one takes over.
                _set_radius(patch, book.ids[index], -1.0)
                action = "replace"
            elif action == "split":
                _set_radius(patch, book.ids[index], distance / 2 - 1e-5)
                radius = distance / 2
            if hparams.value_init == "warm":  # the layer's own output
                start = store_out[module_name][0, position].float()
            else:
                start = torch.rand(handle.d_model, device=handle.device)
            value, _ = self._train_value(handle, module_name, batch, position, start, hparams)
            patch.keys = torch.cat([patch.keys, query[None].to(patch.keys.device)])
            patch.values = torch.cat([patch.values, value[None].to(patch.values.device)])
            patch.radii = torch.cat([patch.radii, torch.tensor([radius], device=patch.radii.device)])
            patch.labels.append(request.target_new)
            actions.append(action)
        patch.info = {"actions": actions, "entries_added": patch.n_entries, "eps_init": eps_init,
                      "codebook_size": len(merged_codebook([*earlier, patch]))}
        # Re-create the edit so the finiteness check of ModulePatch runs on the final tensors.
        return GracePatch(method=self.name, requests=requests, hparams=hparams.to_dict(), layer=patch.layer,
                          uid=patch.uid, keys=patch.keys, values=patch.values, radii=patch.radii,
                          labels=patch.labels, overrides=patch.overrides, value_overrides=patch.value_overrides,
                          override_values=patch.override_values, info=patch.info)

    @staticmethod
    def _train_value(handle: ModelHandle, module_name: str, batch: Any, position: int,
                     start: torch.Tensor, hparams: GRACEHParams) -> tuple[torch.Tensor, int]:
        """Train a value that replaces the layer's output at ``position`` so the target follows,
        from ``start``; returns it with the number of optimiser steps taken (0: ``start`` works)."""
        value = start.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=hparams.lr)

        def replace(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[0, position] = value.to(output.dtype)
            return output

        steps = 0
        hook = handle.module(module_name).register_forward_hook(replace)
        try:
            for steps in range(hparams.n_iter):  # noqa: B007 (the count is returned)
                logits = handle.model(**batch.model_inputs()).logits
                loss = target_nll(logits, batch).mean()
                if float(loss.detach()) < hparams.stop_loss and bool((target_hits(logits, batch) == 1).all()):
                    break
                if not torch.isfinite(loss):
                    raise EditError(f"GRACE's value training diverged; try a lower lr (now {hparams.lr}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                steps = hparams.n_iter
        finally:
            hook.remove()
        return value.detach(), steps


def _set_value(patch: GracePatch, entry: tuple[str, int], value: torch.Tensor) -> None:
    """Give ``entry`` a new value: in place for this edit's own entries, as an override otherwise."""
    uid, index = entry
    if uid == patch.uid:
        patch.values[index] = value.to(patch.values.device)
        return
    rows = [i for i, (u, j) in enumerate(patch.value_overrides) if (u, int(j)) == (uid, index)]
    if rows:
        patch.override_values[rows[0]] = value.to(patch.override_values.device)
    else:
        patch.value_overrides.append([uid, index])
        patch.override_values = torch.cat([patch.override_values, value[None].to(patch.override_values.device)])


def _set_radius(patch: GracePatch, entry: tuple[str, int], radius: float) -> None:
    """Give ``entry`` a new radius: in place for this edit's own entries, as an override otherwise."""
    uid, index = entry
    if uid == patch.uid:
        patch.radii[index] = radius
    else:
        patch.overrides = [o for o in patch.overrides if (o[0], int(o[1])) != (uid, index)]
        patch.overrides.append([uid, index, float(radius)])
