"""AlphaEdit: the null-space projection, kept keys across a session, sequential editing on the demo."""

from __future__ import annotations

import pytest
import torch

from editing.analysis import stats
from editing.analysis.scoring import score_targets
from editing.core.edit import load_edit
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import alphaedit, get_method
from editing.methods.alphaedit import (
    AlphaEditDelta,
    AlphaEditHyperParams,
    alphaedit_solver,
    earlier_keys,
    null_space,
    null_space_projection,
)
from editing.methods.compute import context_keys, mlp_key_value
from editing.methods.context import memit_context_templates
from editing.models.tiny import tiny_model
from tests.editing.test_rome import counterfact_cases, efficacy_hits
from tests.helpers import assert_params_equal, params_snapshot

REQUESTS = [EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
            EditRequest("{} is a city in", "Madrid", "Italy", "Spain")]


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


def moment_with_spectrum(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    return ((basis * torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T).float()


@pytest.mark.parametrize("n_small", [2, 9])
def test_null_space_keeps_the_smaller_basis_and_projects_like_the_dense_projection(n_small):
    eigenvalues = [0.001 * (i + 1) for i in range(n_small)] + [1.0 + i for i in range(12 - n_small)]
    moment = moment_with_spectrum(eigenvalues)
    space = null_space(moment, threshold=0.02)
    assert space.dim == n_small and space.complement == (n_small > 6)
    assert space.basis.shape == (12, min(n_small, 12 - n_small)) and space.basis.device.type == "cpu"
    values, vectors = torch.linalg.eigh(moment.double())
    small = vectors[:, values < 0.02]
    dense = small @ small.T  # the reference's P
    x = torch.randn(12, 5, dtype=torch.float64)
    assert torch.allclose(space.project(x), dense @ x, atol=1e-12)
    assert torch.allclose(null_space_projection(moment, 0.02), dense, atol=1e-12)


def test_null_space_falls_back_to_the_cpu_and_its_cache_is_bounded(monkeypatch):
    alphaedit._NULL_SPACES.clear()
    moments = [moment_with_spectrum([0.001, 0.002, 1.0, 2.0, 3.0, 4.0], seed=s) for s in range(3)]
    # a device without room (here: one whose free memory is unknown) computes on the CPU
    space = null_space(moments[0], 0.02, device="meta")
    assert space.basis.device.type == "cpu" and space.dim == 2
    monkeypatch.setattr(alphaedit, "PROJECTION_MEMORY_BYTES", 2 * (6 * 6 * 4 + 6 * 2 * 8))  # room for two
    for moment in moments:
        null_space(moment, 0.02)
    assert [entry[0] for entry in alphaedit._NULL_SPACES.values()] == moments[1:]  # least recently used went
    monkeypatch.setattr(alphaedit, "PROJECTION_MEMORY_BYTES", 0)
    null_space(moments[0], 0.02)
    assert len(alphaedit._NULL_SPACES) == 1  # the one in use always stays
    alphaedit._NULL_SPACES.clear()


def test_solver_matches_the_reference_formula_with_earlier_keys():
    """``(P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K`` as the reference writes it, against the solver's
    reassociated form, with the keys of an earlier AlphaEdit edit on the stack."""
    handle = tiny_model("gpt2")
    d_ff, layer = handle.d_ff, 1
    gen = torch.Generator().manual_seed(0)
    small, large = d_ff // 4, d_ff - d_ff // 4
    spectrum = torch.cat([torch.rand(small, generator=gen) * 1e-3, 0.1 + torch.rand(large, generator=gen)])
    moment = moment_with_spectrum(spectrum.tolist())
    hp = AlphaEditHyperParams.for_model(handle).replace(L2=0.5)
    keys = torch.randn(d_ff, 3, generator=gen, dtype=torch.float64)
    previous = torch.randn(4, d_ff, generator=gen)
    earlier = AlphaEditDelta(method="AlphaEdit", requests=REQUESTS, hparams={}, preserved_keys={layer: previous})
    earlier.apply(handle)  # no deltas: it only puts its keys on the stack
    try:
        got = alphaedit_solver(handle, {layer: moment}, hp)(layer, keys, torch.zeros(handle.d_model, 3))
    finally:
        earlier.revert(handle)
    projection = null_space_projection(moment, hp.nullspace_threshold)
    previous = previous.double()
    covariance = keys @ keys.T + previous.T @ previous
    expected = torch.linalg.solve(projection @ covariance + hp.L2 * torch.eye(d_ff, dtype=torch.float64),
                                  projection @ keys)
    assert float((got - expected).norm() / expected.norm()) < 1e-9


def test_alphaedit_on_every_family_keeps_keys_and_reverts_exactly(tiny_handle, isolated_cache, tmp_path):
    before = params_snapshot(tiny_handle)
    hparams = quick_hparams(tiny_handle)
    edit = get_method("AlphaEdit").apply(tiny_handle, REQUESTS, hparams)
    assert isinstance(edit, AlphaEditDelta)
    assert set(edit.preserved_keys) == set(hparams.layers)
    for layer, keys in edit.preserved_keys.items():
        # context-averaged keys (the reference's) and the bare prompts' keys (protect_prompt_keys)
        assert keys.shape == (2 * len(REQUESTS), tiny_handle.d_ff)
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


def stored_values(handle, requests, layers) -> torch.Tensor:
    """MLP outputs at the edited layers for the requests' own prompts (what an edit wrote)."""
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    return torch.cat([mlp_key_value(handle, layer, prompts, subjects, "last")[1] for layer in layers], 1)


def test_sequential_alphaedit_keeps_early_edits_better_than_memit(demo):
    """50 edits in 5 sequential rounds of 10, each computed on the model edited so far. After all
    rounds, the first round's edits hold with a larger margin under AlphaEdit (CounterFact's
    efficacy magnitude, mean P(new) − P(true)), at least as often, and what they wrote into the
    MLPs has moved far less — the null-space projection plus the kept keys at work."""
    requests = [request for request, _ in counterfact_cases(50)]
    first = requests[:10]
    results = {}
    for method in ("MEMIT", "AlphaEdit"):
        session = EditSession(demo)
        session.apply(method, first)
        layers = session.edits[0].hparams["layers"]
        with session.active():
            written = stored_values(demo, first, layers)
        for start in range(10, len(requests), 10):
            session.apply(method, requests[start: start + 10])
        with session.active():
            hits = efficacy_hits(demo, first)
            new = score_targets(demo, [r.text for r in first], [r.target_new for r in first])
            true = score_targets(demo, [r.text for r in first], [r.target_true for r in first])
            magnitude = sum(n.prob - t.prob for n, t in zip(new, true, strict=True)) / len(first)
            drift = float((stored_values(demo, first, layers) - written).norm(dim=1).mean())
            if method == "AlphaEdit":
                assert earlier_keys(demo, layers[0]).shape[0] == 2 * len(requests)  # every round's keys kept
        results[method] = {"hits": sum(hits), "magnitude": magnitude, "drift": drift}
    alpha, memit = results["AlphaEdit"], results["MEMIT"]
    print(f"after 5 x 10 sequential edits, first 10 (AlphaEdit vs MEMIT): "
          f"efficacy hits {alpha['hits']}/{len(first)} vs {memit['hits']}/{len(first)}, "
          f"mean P(new) - P(true) {alpha['magnitude']:.2f} vs {memit['magnitude']:.2f}, "
          f"drift of the written MLP values {alpha['drift']:.2f} vs {memit['drift']:.2f}")
    assert alpha["magnitude"] > memit["magnitude"], results
    assert alpha["hits"] >= memit["hits"], results
    assert alpha["drift"] < 0.25 * memit["drift"], results


def test_keys_are_read_with_the_whole_update_applied(demo):
    hparams = AlphaEditHyperParams.for_model(demo).replace(v_num_grad_steps=3)
    requests = REQUESTS
    edit = get_method("AlphaEdit").apply(demo, requests, hparams)
    try:
        for layer, keys in edit.preserved_keys.items():
            averaged = context_keys(demo, layer, requests, memit_context_templates(demo), hparams.fact_token)
            bare = mlp_key_value(demo, layer, [r.prompt for r in requests], [r.subject for r in requests],
                                 hparams.fact_token)[0]
            assert torch.allclose(keys, torch.cat([averaged, bare]), atol=1e-5)
    finally:
        edit.revert(demo)
