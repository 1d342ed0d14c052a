"""MEMIT: per-layer updates on every family, batch behaviour on the demo model."""

from __future__ import annotations

import torch

from editing.analysis import stats
from editing.core.edit import WeightDelta
from editing.core.request import EditRequest
from editing.methods import get_method
from editing.methods.compute import residuals
from editing.methods.context import memit_context_templates
from editing.methods.memit import MEMIT_PRESETS, MEMITHyperParams, compute_memit_update, memit_layers
from tests.editing.test_rome import counterfact_cases, efficacy_hits, neighbourhood_score, share
from tests.helpers import assert_params_equal, params_snapshot

REQUESTS = [EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
            EditRequest("{} is a city in", "Madrid", "Italy", "Spain")]


def quick_hparams(handle) -> MEMITHyperParams:
    return MEMITHyperParams.for_model(handle).replace(v_num_grad_steps=4, mom2_n_samples=300)


def out_in(handle, name: str, delta) -> torch.Tensor:
    dense = delta.materialise()
    return dense.T if handle.arch.conv1d else dense


def test_memit_on_every_family_writes_each_layer_and_reverts_exactly(tiny_handle, isolated_cache):
    before = params_snapshot(tiny_handle)
    hparams = quick_hparams(tiny_handle)
    edit = get_method("MEMIT").apply(tiny_handle, REQUESTS, hparams)
    expected = {tiny_handle.arch.mlp_out_name(layer) + ".weight" for layer in hparams.layers}
    assert set(edit.deltas) == expected and len(expected) == len(hparams.layers)
    for name, delta in edit.deltas.items():
        assert delta.shape == tuple(tiny_handle.parameter(name).shape)
        assert delta.rank == len(REQUESTS)  # stored as the two factors R and (λC + KKᵀ)⁻¹K
        assert torch.isfinite(delta.materialise()).all()
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)


def test_intermediates_follow_the_memit_equations(tiny_handle, isolated_cache):
    """ΔW = R adjᵀ with (λC + KKᵀ) adj = K, the residual split evenly over the remaining layers,
    and the model left exactly as found."""
    hparams = quick_hparams(tiny_handle)
    before = params_snapshot(tiny_handle)
    moments = stats.second_moments(tiny_handle, hparams.layers, n_samples=300)
    update = compute_memit_update(tiny_handle, REQUESTS, hparams, second_moments_by_layer=moments)
    assert_params_equal(tiny_handle, before)
    n_layers = len(hparams.layers)
    for i, layer_update in enumerate(update.layer_updates):
        keys = layer_update.keys.double().T
        lhs = (hparams.mom2_update_weight * moments[layer_update.layer].double().to(keys.device)
               + keys @ keys.T) @ layer_update.adjusted_keys.double().T
        assert torch.allclose(lhs, keys, rtol=1e-4, atol=1e-6 * float(keys.abs().max()))
        share_left = (update.z - layer_update.z_current) / (n_layers - i)
        assert torch.allclose(layer_update.residual, share_left, atol=1e-5)
        name = update.param_names[layer_update.layer]
        assert torch.allclose(out_in(tiny_handle, name, layer_update.delta), layer_update.update_out_in(), atol=1e-5)


def test_layer_ranges_scale_with_depth_and_keep_reference_presets():
    assert memit_layers(48) == [13, 14, 15, 16, 17]
    assert memit_layers(12) == [3, 4]
    assert MEMIT_PRESETS[("gptj", 28, 4096)]["layers"] == [3, 4, 5, 6, 7, 8]


# -- the demo model -------------------------------------------------------------------------------
def test_memit_batch_of_twenty_on_the_demo_model(demo):
    cases = counterfact_cases(20)
    requests = [request for request, _ in cases]
    base_neighbourhood = neighbourhood_score(demo, cases)
    edit = get_method("MEMIT").apply(demo, requests)
    try:
        efficacy = share(efficacy_hits(demo, requests))
        neighbourhood = neighbourhood_score(demo, cases)
    finally:
        edit.revert(demo)
    assert efficacy >= 0.95
    assert neighbourhood >= base_neighbourhood - 0.10, (neighbourhood, base_neighbourhood)


def test_explicit_statistics_and_templates_reproduce_the_defaults(demo):
    hparams = MEMITHyperParams.for_model(demo).replace(v_num_grad_steps=5)
    requests = [request for request, _ in counterfact_cases(3)]
    default = compute_memit_update(demo, requests, hparams)
    explicit = compute_memit_update(demo, requests, hparams,
                                    second_moments_by_layer=stats.second_moments(demo, hparams.layers),
                                    context_templates=memit_context_templates(demo))
    assert torch.allclose(default.z, explicit.z, atol=1e-6)
    for a, b in zip(default.layer_updates, explicit.layer_updates, strict=True):
        assert torch.allclose(a.update_out_in(), b.update_out_in(), atol=1e-6)
    # Writing the update moves the residual at the last layer to (nearly) the optimised target.
    edit = WeightDelta(method="check", requests=requests, hparams={}, deltas=default.deltas)
    edit.apply(demo)
    try:
        z_after = residuals(demo, hparams.layers[-1], [r.prompt for r in requests], [r.subject for r in requests],
                            hparams.fact_token)
    finally:
        edit.revert(demo)
    moved = (z_after - default.z_init).norm(dim=1) / (default.z - default.z_init).norm(dim=1)
    assert (moved > 0.5).all(), moved
