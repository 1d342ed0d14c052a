"""Fixtures of the evaluation tests: a small closed-form editing method registered for the test.

The evaluation core must work for any method, so its tests do not depend on the methods other
modules implement: ``rank_one_method`` registers a real (if simple) editor — a closed-form
low-rank update of the last MLP output projection that writes each request's key to a value
pushing the residual towards the new target's unembedding — and removes it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from editing.analysis.scoring import last_token_logprobs
from editing.core.edit import Edit, ParamDelta, WeightDelta
from editing.core.hooks import capture
from editing.core.request import EditRequest
from editing.methods.base import METHODS, EditMethod, HParams, ProgressFn
from editing.models.loader import ModelHandle
from editing.models.tokens import encode, pad_batch, pad_id, target_ids

TEST_METHOD = "TestRankOne"


@dataclass
class RankOneHParams(HParams):
    layer: int = 0
    strength: float = 3.0  # the value's norm, in units of the residual's norm at the edited position

    @classmethod
    def for_model(cls, handle: ModelHandle) -> RankOneHParams:
        return cls(layer=handle.n_layers - 1)


class RankOneTestMethod(EditMethod):
    """W ← W + Dᵀ(KKᵀ)⁻¹K: each key k_i (MLP hidden activation at the prompt's last token) now adds d_i,
    a residual push from the current top token's unembedding towards the new target's."""

    name = TEST_METHOD
    hparams_class = RankOneHParams
    edit_kind = "weight_delta"
    summary = "test-only closed-form rank-n update"

    def _execute(self, handle: ModelHandle, requests: list[EditRequest], hparams: HParams,
                 progress: ProgressFn) -> Edit:
        assert isinstance(hparams, RankOneHParams)
        layer = hparams.layer
        tok = handle.tokenizer
        texts = [r.text for r in requests]
        batch = pad_batch([encode(tok, t) for t in texts], pad_id(tok), handle.device)
        mlp_out = handle.arch.mlp_out_name(layer)
        block = handle.arch.block_name(layer)
        with torch.no_grad(), capture(handle.model, [mlp_out], inputs=True) as keys, \
                capture(handle.model, [block]) as resid:
            handle.model(**batch.model_inputs())
        last = torch.tensor([n - 1 for n in batch.lengths], device=handle.device)
        rows = torch.arange(len(texts), device=handle.device)
        k = keys[mlp_out][rows, last].double()  # (n, d_ff)
        norms = resid[block][rows, last].norm(dim=-1).double()
        current = last_token_logprobs(handle, texts).argmax(-1).tolist()
        unembed = handle.module(handle.arch.lm_head).weight.double()
        values = []
        for i, request in enumerate(requests):
            wanted = target_ids(tok, texts[i], request.target_new)[0]
            direction = unembed[wanted] - unembed[current[i]]
            values.append(hparams.strength * norms[i] * direction / direction.norm().clamp_min(1e-9))
        d = torch.stack(values).to(handle.device)  # (n, d_model)
        gram = k @ k.T + 1e-6 * torch.eye(len(texts), dtype=k.dtype, device=k.device)
        solve = torch.linalg.solve(gram, k)  # (n, d_ff) = (KKᵀ)⁻¹K
        param = mlp_out + ".weight"
        if handle.arch.conv1d:  # stored (in, out)
            delta = ParamDelta.low_rank(solve.T.float(), d.float())
        else:
            delta = ParamDelta.low_rank(d.T.float(), solve.float())
        progress(0.5, "closed-form update computed")
        return WeightDelta(method=self.name, requests=list(requests), hparams=hparams.to_dict(),
                           deltas={param: delta})


@pytest.fixture
def rank_one_method():
    """Registers the test method for one test and removes it again."""
    METHODS.pop(TEST_METHOD, None)
    METHODS[TEST_METHOD] = RankOneTestMethod
    try:
        yield TEST_METHOD
    finally:
        METHODS.pop(TEST_METHOD, None)
