"""AlphaEdit: the null-space projection, kept keys across a session, sequential editing on the demo."""

from __future__ import annotations

import pytest
import torch

from editing import stats
from editing.compute import context_keys
from editing.context import memit_context_templates
from editing.edit import load_edit
from editing.methods import get_method
from editing.methods.alphaedit import AlphaEditDelta, AlphaEditHyperParams, earlier_keys, null_space_projection
from editing.request import EditRequest
from editing.session import EditSession
from tests.editing.test_rome import counterfact_cases, efficacy_hits
from tests.helpers import assert_params_equal, params_snapshot

REQUESTS = [EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
            EditRequest("{} is a city in", "Madrid", "Italy", "Spain")]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    stats.clear_memory_cache()
    yield
    stats.clear_memory_cache()


def quick_hparams(handle) -> AlphaEditHyperParams:
    return AlphaEditHyperParams.for_model(handle).replace(v_num_grad_steps=4, mom2_n_samples=300)


def test_projection_is_onto_the_small_eigenvalue_subspace():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    eigenvalues = torch.tensor([5.0, 2.0, 1.0, 0.01, 0.001, 0.0], dtype=torch.float64)
    moment = (basis * eigenvalues) @ basis.T
    projection = null_space_projection(moment.float(), threshold=0.02)
    assert torch.allclose(projection, projection.T, atol=1e-6)
    assert torch.allclose(projection @ projection, projection, atol=1e-6)
    assert float(projection.trace()) == pytest.approx(3.0, abs=1e-6)
    assert torch.allclose(projection @ basis[:, :3], torch.zeros(6, 3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(projection @ basis[:, 3:], basis[:, 3:], atol=1e-5)


def test_alphaedit_on_every_family_keeps_keys_and_reverts_exactly(tiny_handle, isolated_cache, tmp_path):
    before = params_snapshot(tiny_handle)
    hparams = quick_hparams(tiny_handle)
    edit = get_method("AlphaEdit").apply(tiny_handle, REQUESTS, hparams)
    assert isinstance(edit, AlphaEditDelta)
    assert set(edit.preserved_keys) == set(hparams.layers)
    for layer, keys in edit.preserved_keys.items():
        assert keys.shape == (len(REQUESTS), tiny_handle.d_ff)
        assert torch.equal(earlier_keys(tiny_handle, layer), keys)  # what the next AlphaEdit call protects
    for name, delta in edit.deltas.items():
        assert delta.shape == tuple(tiny_handle.parameter(name).shape) and torch.isfinite(delta.materialise()).all()
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    assert earlier_keys(tiny_handle, hparams.layers[0]) is None  # reverted edits protect nothing
    loaded = load_edit(edit.save(tmp_path / "alpha"))
    assert isinstance(loaded, AlphaEditDelta)
    assert all(torch.equal(loaded.preserved_keys[k], v.cpu()) for k, v in edit.preserved_keys.items())
    assert set(loaded.deltas) == set(edit.deltas)


def test_update_acts_only_in_the_null_space_of_preserved_keys(demo):
    """ΔW leaves the dominant directions of E[k kᵀ] alone: the update applied to the top
    eigenvectors of the statistic is (numerically) zero."""
    hparams = AlphaEditHyperParams.for_model(demo).replace(v_num_grad_steps=5)
    edit = get_method("AlphaEdit").apply(demo, [request for request, _ in counterfact_cases(3)], hparams)
    try:
        for layer in hparams.layers:
            moment = stats.second_moment(demo, layer).double()
            eigenvalues, eigenvectors = torch.linalg.eigh(moment)
            preserved = eigenvectors[:, eigenvalues >= hparams.nullspace_threshold]
            delta = edit.deltas[demo.arch.mlp_out_name(layer) + ".weight"].materialise().double()
            out_in = delta.T if demo.arch.conv1d else delta
            assert float((out_in @ preserved).norm()) < 1e-6 * max(1.0, float(out_in.norm()))
            assert float(out_in.norm()) > 0
    finally:
        edit.revert(demo)


def test_sequential_alphaedit_keeps_early_edits_better_than_memit(demo):
    """50 edits in 10 sequential steps of 5 (each computed on the model edited so far): after all
    of them, AlphaEdit still holds more of the first ten edits than MEMIT does."""
    requests = [request for request, _ in counterfact_cases(50)]
    first = {}
    for method in ("MEMIT", "AlphaEdit"):
        session = EditSession(demo)
        for start in range(0, len(requests), 5):
            session.apply(method, requests[start: start + 5])
        with session.active():
            first[method] = sum(efficacy_hits(demo, requests[:10]))
            if method == "AlphaEdit":
                layer = session.edits[-1].hparams["layers"][0]
                kept = earlier_keys(demo, layer)
                assert kept is not None and kept.shape[0] == len(requests)
    assert first["AlphaEdit"] > first["MEMIT"], first


def test_keys_are_read_with_the_whole_update_applied(demo):
    hparams = AlphaEditHyperParams.for_model(demo).replace(v_num_grad_steps=3)
    requests = REQUESTS
    edit = get_method("AlphaEdit").apply(demo, requests, hparams)
    try:
        for layer, keys in edit.preserved_keys.items():
            now = context_keys(demo, layer, requests, memit_context_templates(demo), hparams.fact_token)
            assert torch.allclose(now, keys, atol=1e-5)
    finally:
        edit.revert(demo)
