"""The scope map (the survey's Figure 4): where an edit's probes sit in representation space.

For every probe, the hidden state at one layer (the edited one by default) — at the prompt's last
token or at the subject's last token — is taken with the session's last edit not applied (before)
and applied (after). Both sets are projected together to 2-D (UMAP; PCA for tiny sets), so a
point's before and after positions share one map. Each point carries its kind, whether it is in
the edit's intended scope, its top prediction before and after, whether it flipped, and whether
that is what a good edit does (flip inside the scope, stay outside it).
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from editing.core.edit import Edit, WeightDelta
from editing.core.hooks import capture, forward_until
from editing.core.session import EditSession
from editing.models.tokens import encode, pad_batch, pad_id, subject_last_token
from eval.evaluate import predict
from eval.probes import Probe, ProbeSet

POSITIONS = ("last", "subject")
PROJECTIONS = ("auto", "umap", "pca")
#: below this many probes the map uses PCA (UMAP's neighbourhood graph needs more points)
MIN_UMAP_PROBES = 15
POINT_COLUMNS = ("probe_id", "kind", "in_scope", "prompt", "answer", "pred_before", "pred_after", "flipped", "wanted",
                 "prob_change", "x_before", "y_before", "x_after", "y_after")

# numba's default threading layer aborts the process when two threads fit UMAP at once.
_UMAP_LOCK = threading.Lock()
_umap_warm = False


@dataclass
class ScopeMap:
    """Points of the scope map and how they were made."""

    points: pd.DataFrame
    projection: str  # "umap" or "pca"
    layer: int
    position: str = "last"
    hidden_before: np.ndarray | None = None  # (n_probes, d_model)
    hidden_after: np.ndarray | None = None


def warm_up_umap() -> None:
    """Compile UMAP's numba kernels once (the first fit of a process takes seconds)."""
    global _umap_warm
    if _umap_warm:
        return
    data = np.random.default_rng(0).normal(size=(40, 8))
    _umap(data, seed=0)
    _umap_warm = True


def _umap(data: np.ndarray, seed: int) -> np.ndarray:
    import umap

    with _UMAP_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random_state forcing n_jobs=1 is what we want
        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, len(data) - 1)), init="random",
                            random_state=seed, min_dist=0.1)
        return np.asarray(reducer.fit_transform(data), dtype=float)


def pca_2d(data: np.ndarray) -> np.ndarray:
    """Projection on the two principal axes (zeros where the data has fewer dimensions)."""
    centred = data - data.mean(axis=0, keepdims=True)
    out = np.zeros((len(data), 2))
    if len(data) < 2:
        return out
    _u, _s, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    out[:, : len(components)] = centred @ components.T
    return out


def edited_layer(edit: Edit | None, n_layers: int) -> int:
    """The layer an edit works at: its ``layer``/``layers`` hyper-parameter or info, else the last block
    its weight deltas touch, else the middle layer."""
    if edit is not None:
        for source in (edit.hparams, edit.info):
            value = source.get("layer", source.get("layers"))
            if isinstance(value, int):
                return value
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                return max(value)  # MEMIT's target residual lives at the last layer of its set
        if isinstance(edit, WeightDelta):
            found = [int(m.group(1)) for name in edit.deltas for m in [re.search(r"\.(\d+)\.", name)] if m]
            if found:
                return max(found)
    return n_layers // 2


def hidden_states(session: EditSession, probes: Sequence[Probe], layer: int, position: str = "last",
                  batch_size: int = 32) -> np.ndarray:
    """``(n_probes, d_model)`` output of block ``layer`` at each probe's last (or subject's last) token.

    Runs with the session's edits active; a prompt that an inference wrapper routes to the same
    model is read with its routed text (e.g. IKE's demonstrations before it). A prompt routed to
    another model is read on this model as typed, since its states would not share this map.
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {position!r}.")
    handle = session.handle
    tok = handle.tokenizer
    name = handle.arch.block_name(layer)
    sequences: list[list[int]] = []
    positions: list[int] = []
    with session.active():
        for probe, route in zip(probes, session.routes([p.prompt for p in probes]), strict=True):
            prefix = route.prompt[: route.prefix_chars] if route.handle is handle else ""
            text = route.prompt if route.handle is handle else probe.prompt
            ids = encode(tok, text)
            index = len(ids) - 1
            if position == "subject" and probe.subject and probe.subject in probe.prompt:
                template = prefix + probe.prompt.replace(probe.subject, "{}", 1)
                index = min(index, subject_last_token(tok, template, probe.subject))
            sequences.append(ids[: handle.max_length])
            positions.append(min(index, handle.max_length - 1))
        rows = []
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start: start + batch_size]
                batch = pad_batch(chunk, pad_id(tok), handle.device)
                with capture(handle.model, [name]) as store:
                    forward_until(handle.model, name, **batch.model_inputs())
                at = torch.tensor(positions[start: start + batch_size], device=store[name].device)
                rows.append(store[name][torch.arange(len(chunk), device=at.device), at].float().cpu())
    if not rows:
        return np.zeros((0, handle.d_model))
    return torch.cat(rows).numpy()


def _session_without_last(session: EditSession) -> EditSession:
    """A session holding every edit of ``session`` but its last (sharing the edit objects)."""
    before = EditSession(session.handle)
    for edit in session.edits[:-1]:
        before.push(edit)
    return before


def scope_map(session: EditSession, probeset: ProbeSet, layer: int | None = None, position: str = "last",
              method: str = "auto", seed: int = 0) -> ScopeMap:
    """The scope map of the session's last edit over ``probeset`` (see the module docstring).

    ``layer`` defaults to the layer the last edit works at (:func:`edited_layer`); ``method`` is
    ``"umap"``, ``"pca"`` or ``"auto"`` (PCA below 15 probes). A session without edits gives a
    map whose before and after coincide.
    """
    if method not in PROJECTIONS:
        raise ValueError(f"method must be one of {PROJECTIONS}, not {method!r}.")
    handle = session.handle
    last = session.edits[-1] if session.edits else None
    layer = edited_layer(last, handle.n_layers) if layer is None else layer
    if not 0 <= layer < handle.n_layers:
        raise ValueError(f"layer {layer} is outside the model's {handle.n_layers} layers.")
    probes = list(probeset.probes)
    before_session = _session_without_last(session)
    h_before = hidden_states(before_session, probes, layer, position)
    h_after = hidden_states(session, probes, layer, position)
    out_before = predict(before_session, probes, k=1)
    out_after = predict(session, probes, k=1)
    use_umap = method == "umap" or (method == "auto" and len(probes) >= MIN_UMAP_PROBES)
    if not probes:
        coords = np.zeros((0, 2))
    elif use_umap:
        coords = _umap(np.concatenate([h_before, h_after]).astype(np.float32), seed)
    else:
        coords = pca_2d(np.concatenate([h_before, h_after]).astype(np.float64))
    n = len(probes)
    records = []
    for i, (probe, b, a) in enumerate(zip(probes, out_before, out_after, strict=True)):
        flipped = b.pred_id != a.pred_id
        records.append({
            "probe_id": probe.id, "kind": probe.kind, "in_scope": probe.in_scope, "prompt": probe.prompt,
            "answer": probe.answer, "pred_before": b.pred, "pred_after": a.pred, "flipped": flipped,
            "wanted": flipped if probe.in_scope else not flipped, "prob_change": a.answer_prob - b.answer_prob,
            "x_before": float(coords[i, 0]), "y_before": float(coords[i, 1]),
            "x_after": float(coords[n + i, 0]), "y_after": float(coords[n + i, 1]),
            "subkind": probe.subkind, "prob_before": b.answer_prob, "prob_after": a.answer_prob,
            "moved": float(np.linalg.norm(h_after[i] - h_before[i])),
        })
    points = pd.DataFrame(records, columns=[*POINT_COLUMNS, "subkind", "prob_before", "prob_after", "moved"])
    return ScopeMap(points=points, projection="umap" if use_umap else "pca", layer=layer, position=position,
                    hidden_before=h_before, hidden_after=h_after)
