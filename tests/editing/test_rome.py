"""ROME: the rank-one update on every family, and CounterFact-style behaviour on the demo model."""

from __future__ import annotations

import random

import pytest
import torch

from editing.analysis import stats
from editing.analysis.scoring import score_targets
from editing.core.edit import WeightDelta, load_edit
from editing.core.request import EditRequest
from editing.methods import get_method
from editing.methods.compute import low_rank_delta, mlp_key_value
from editing.methods.rome import ROME_PRESETS, ROMEHyperParams, compute_rome_update, compute_rome_updates, rome_edit
from editing.storage.factbase import load_factbase
from editing.train import edit_records
from tests.helpers import assert_params_equal, params_snapshot

REQUEST = EditRequest("The capital of {} is", "France", "Berlin", "Paris")


# -- CounterFact-style scores (shared with the MEMIT and AlphaEdit tests) -----------------------------
def counterfact_cases(n: int = 20, n_neighbours: int = 5, seed: int = 0) -> list[tuple[EditRequest, list]]:
    """``n`` counterfactual edits of held-out subjects (one per subject), each with neighbour
    prompts: other subjects of the same relation, their true object, in the edit's template."""
    factbase = load_factbase()
    records = edit_records("heldout", seed=seed)
    rng = random.Random(seed)
    rng.shuffle(records)
    cases, seen = [], set()
    for record in records:
        request = record.request
        if request.subject in seen:
            continue
        seen.add(request.subject)
        relation = next(f.relation for f in factbase.facts_about(request.subject) if f.object == request.target_true)
        others = [f for f in factbase.facts_of(relation) if f.subject != request.subject
                  and f.object != request.target_new]
        neighbours = [(request.prompt.replace("{}", f.subject), f.object)
                      for f in rng.sample(others, min(n_neighbours, len(others)))]
        cases.append((request, neighbours))
        if len(cases) == n:
            break
    return cases


def efficacy_hits(handle, requests: list[EditRequest]) -> list[bool]:
    """CounterFact efficacy: P(target_new) > P(target_true) on the edit prompt (mean NLL per token)."""
    prompts = [r.text for r in requests]
    new = score_targets(handle, prompts, [r.target_new for r in requests])
    true = score_targets(handle, prompts, [r.target_true for r in requests])
    return [a.mean_nll < b.mean_nll for a, b in zip(new, true, strict=True)]


def neighbourhood_hits(handle, request: EditRequest, neighbours: list[tuple[str, str]]) -> list[bool]:
    """CounterFact neighbourhood: the neighbour still prefers its true object over the new target."""
    prompts = [p for p, _ in neighbours]
    true = score_targets(handle, prompts, [o for _, o in neighbours])
    new = score_targets(handle, prompts, [request.target_new] * len(prompts))
    return [t.mean_nll < n.mean_nll for t, n in zip(true, new, strict=True)]


def share(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def neighbourhood_score(handle, cases: list[tuple[EditRequest, list]]) -> float:
    return share([hit for request, neighbours in cases for hit in neighbourhood_hits(handle, request, neighbours)])


def quick_hparams(handle) -> ROMEHyperParams:
    return ROMEHyperParams.for_model(handle).replace(v_num_grad_steps=4, mom2_n_samples=300,
                                                     context_template_length_params=[[5, 3]])


# -- every family ---------------------------------------------------------------------------------
def test_rome_on_every_family_is_rank_one_finite_and_reverts_exactly(tiny_handle, isolated_cache):
    before = params_snapshot(tiny_handle)
    hparams = quick_hparams(tiny_handle)
    edit = get_method("ROME").apply(tiny_handle, [REQUEST], hparams)
    (name, delta), = edit.deltas.items()
    assert name == tiny_handle.arch.mlp_out_name(hparams.layer) + ".weight"
    assert delta.shape == tuple(tiny_handle.parameter(name).shape) and delta.rank == 1
    assert torch.isfinite(delta.materialise()).all()
    assert not torch.equal(tiny_handle.parameter(name), before[name])
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)


def test_update_writes_v_star_exactly_for_the_bare_prompt(tiny_handle, isolated_cache):
    """(W + Λuᵀ) k_bare = v*: the denominator uses the bare prompt's key (the reference's choice).
    Checked at the subject's last token, the paper's lookup position."""
    hparams = quick_hparams(tiny_handle).replace(fact_token="subject_last", layer=1)
    update = compute_rome_update(tiny_handle, REQUEST, hparams)
    assert update.u.norm() == pytest.approx(1.0, abs=1e-5)
    edit = WeightDelta(method="check", requests=[REQUEST], hparams={}, deltas={
        update.param_name: low_rank_delta(tiny_handle, update.param_name, update.right[:, None], update.u[:, None])})
    edit.apply(tiny_handle)
    try:
        key, value = mlp_key_value(tiny_handle, hparams.layer, [REQUEST.prompt], [REQUEST.subject],
                                   hparams.fact_token)
    finally:
        edit.revert(tiny_handle)
    assert torch.allclose(key[0], update.k_bare, atol=1e-5)
    scale = float(update.v_star.norm())
    assert torch.allclose(value[0], update.v_star, atol=1e-4 * max(1.0, scale))


def test_hparams_scale_with_depth_and_keep_reference_presets():
    from editing.models.tiny import tiny_model

    shallow = ROMEHyperParams.for_model(tiny_model("gpt2", n_layers=4))
    assert (shallow.layer, shallow.fact_token) == (0, "last")
    deep = ROMEHyperParams.for_model(tiny_model("llama", n_layers=12, d_model=32))
    assert (deep.layer, deep.fact_token) == (4, "subject_last")
    assert ROME_PRESETS[("gpt2", 48, 1600)]["layer"] == 17 and ROME_PRESETS[("gptj", 28, 4096)]["layer"] == 5


# -- the demo model -------------------------------------------------------------------------------
def test_rome_efficacy_and_neighbourhood_on_twenty_demo_edits(demo):
    """20 single edits, each written into the unedited model on its own (CounterFact protocol)."""
    cases = counterfact_cases(20)
    requests = [request for request, _ in cases]
    base_neighbourhood = neighbourhood_score(demo, cases)
    assert share(efficacy_hits(demo, requests)) == 0.0  # all are counterfactual
    hparams = ROMEHyperParams.for_model(demo)
    updates = compute_rome_updates(demo, requests, hparams)  # independent, v* optimised in one batch
    efficacy, neighbourhood = [], []
    for update, (request, neighbours) in zip(updates, cases, strict=True):
        edit = rome_edit(demo, [update], hparams)
        edit.apply(demo)
        try:
            efficacy += efficacy_hits(demo, [request])
            neighbourhood += neighbourhood_hits(demo, request, neighbours)
        finally:
            edit.revert(demo)
    assert share(efficacy) >= 0.95, efficacy
    assert share(neighbourhood) >= base_neighbourhood - 0.10, (share(neighbourhood), base_neighbourhood)


def test_method_apply_equals_the_batched_computation(demo):
    """ROME.apply on one request gives the update compute_rome_updates finds for it in a batch."""
    requests = [request for request, _ in counterfact_cases(3)]
    hparams = ROMEHyperParams.for_model(demo).replace(v_num_grad_steps=8)
    batched = compute_rome_updates(demo, requests, hparams)[1]
    edit = get_method("ROME").apply(demo, [requests[1]], hparams)
    edit.revert(demo)
    (delta,) = edit.deltas.values()
    expected = rome_edit(demo, [batched], hparams).deltas[batched.param_name].materialise()
    assert torch.allclose(delta.materialise(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_rome_update_is_rank_one_and_round_trips_through_a_file(demo, tmp_path):
    edit = get_method("ROME").apply(demo, [REQUEST])
    try:
        (name, delta), = edit.deltas.items()
        assert int(torch.linalg.matrix_rank(delta.materialise())) == 1
        assert edit.size_bytes == (demo.d_model + demo.d_ff) * 4  # stored as two vectors
        expected = demo.parameter(name).clone()
        after = score_targets(demo, [REQUEST.text], [REQUEST.target_new])[0].prob
    finally:
        edit.revert(demo)
    loaded = load_edit(edit.save(tmp_path / "rome"))
    loaded.apply(demo)
    try:
        assert torch.equal(demo.parameter(name), expected)
        assert score_targets(demo, [REQUEST.text], [REQUEST.target_new])[0].prob == pytest.approx(after)
    finally:
        loaded.revert(demo)


def test_explicit_statistics_and_templates_reproduce_the_defaults(demo):
    """The compute function accepts the reference's inputs: with the same C and templates the
    update is the same, and u is C⁻¹k* normalised."""
    hparams = ROMEHyperParams.for_model(demo).replace(v_num_grad_steps=6)
    default = compute_rome_update(demo, REQUEST, hparams)
    moment = stats.second_moment(demo, hparams.layer)
    from editing.methods.context import rome_context_templates

    templates = rome_context_templates(demo)
    explicit = compute_rome_update(demo, REQUEST, hparams, second_moment_matrix=moment, context_templates=templates)
    for field in ("k_star", "k_bare", "u", "v_star", "right"):
        assert torch.allclose(getattr(default, field), getattr(explicit, field), atol=1e-6), field
    c_u = moment.double() @ default.u.double()
    assert torch.allclose(c_u / c_u.norm(), default.k_star.double() / default.k_star.norm(), atol=1e-4)
    # without the second-moment adjustment u is k* itself, normalised
    plain = compute_rome_update(demo, REQUEST, hparams.replace(mom2_adjustment=False), context_templates=templates)
    assert torch.allclose(plain.u, default.k_star / default.k_star.norm(), atol=1e-6)
    # the bare prompt's key differs from the context-averaged key
    assert not torch.allclose(default.k_bare, default.k_star, atol=1e-3)
