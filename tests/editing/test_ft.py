"""FT, FT-L and FT-M: shapes and exact revert on every family, the L∞ bound, the two losses,
and efficacy on the demo model."""

from __future__ import annotations

import pytest
import torch

from editing.analysis.scoring import last_token_logprobs, score_targets
from editing.core.edit import load_edit
from editing.core.request import EditRequest
from editing.methods import get_method
from editing.methods.ft import (
    FTHParams,
    FTLHParams,
    FTMHParams,
    PromptLastBatch,
    objective_batch,
    objective_loss,
    tuned_parameter_names,
)
from editing.models.tiny import tiny_model
from editing.models.tokens import target_ids
from editing.train import edit_records
from tests.helpers import assert_params_equal, params_snapshot

REQ = EditRequest("The capital of {} is", "France", "Rome", "Paris")
MULTI = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "United Kingdom", "France")


@pytest.mark.parametrize("method", ["FT", "FT-L", "FT-M"])
def test_runs_on_every_family_and_reverts_exactly(tiny_handle, method):
    before = params_snapshot(tiny_handle)
    edit = get_method(method).apply(tiny_handle, [REQ, MULTI], {"steps": 3})
    hparams = get_method(method).default_hparams(tiny_handle).replace(steps=3)
    assert sorted(edit.deltas) == sorted(tuned_parameter_names(tiny_handle, hparams))
    changed = False
    for name, delta in edit.deltas.items():
        param = tiny_handle.parameter(name)
        assert delta.shape == tuple(param.shape) and delta.rank is None
        assert torch.isfinite(delta.dense).all()
        changed |= not torch.equal(param, before[name])
    assert changed, "the applied edit must change the tuned weights"
    assert edit.info["steps_run"] == 3 and edit.info["loss_final"] <= edit.info["loss_first"]
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    assert not any(p.requires_grad for p in tiny_handle.model.parameters())


def test_tuned_weights_follow_the_method(tiny_handle):
    arch, n = tiny_handle.arch, tiny_handle.n_layers
    ft = FTHParams.for_model(tiny_handle)
    names = tuned_parameter_names(tiny_handle, ft)
    expected = {arch.module_name(ft.layers[0], part) for part in arch.mlp_in} | {arch.mlp_out_name(ft.layers[0])}
    assert {name.rsplit(".", 1)[0] for name in names} == expected
    for cls in (FTLHParams, FTMHParams):
        hp = cls.for_model(tiny_handle)
        assert len(hp.layers) == 1 and 0 <= hp.layers[0] < n and hp.norm_constraint is not None
        assert {name.rsplit(".", 1)[0] for name in tuned_parameter_names(tiny_handle, hp)} == {
            arch.mlp_out_name(hp.layers[0])}


def test_default_layers_scale_with_depth():
    shallow, deep = tiny_model("gpt2", n_layers=4), tiny_model("llama", n_layers=12)
    for cls in (FTHParams, FTLHParams, FTMHParams):
        layer_shallow, layer_deep = cls.for_model(shallow).layers[0], cls.for_model(deep).layers[0]
        assert layer_shallow / 4 == pytest.approx(layer_deep / 12, abs=0.1)
    assert FTHParams.for_model(deep).layers[0] == 6


def test_works_under_no_grad_and_leaves_grad_flags():
    handle = tiny_model("gptj")
    before = params_snapshot(handle)
    with torch.no_grad():  # a caller's no_grad (e.g. an evaluation loop) must not stop the training
        edit = get_method("FT-M").apply(handle, [REQ], {"steps": 2})
    assert any(float(d.dense.abs().max()) > 0 for d in edit.deltas.values())
    assert torch.is_grad_enabled() and not any(p.requires_grad for p in handle.model.parameters())
    edit.revert(handle)
    assert_params_equal(handle, before)


def test_norm_bound_derives_from_the_weight_scale():
    handle = tiny_model("llama")
    hp = FTLHParams.for_model(handle)
    weight = handle.arch.mlp_out_weight(handle.model, hp.layers[0])
    assert hp.norm_constraint == pytest.approx(0.25 * float(weight.pow(2).mean().sqrt()), rel=0.01)
    assert hp.lr == hp.norm_constraint and FTMHParams.for_model(handle).norm_constraint == hp.norm_constraint


def test_norm_bound_is_exact():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    eps = 1e-4
    edit = get_method("FT-L").apply(handle, [REQ], {"norm_constraint": eps, "lr": 1e-2, "steps": 5})
    biggest = 0.0
    for name, delta in edit.deltas.items():
        assert float(delta.dense.abs().max()) <= eps
        biggest = max(biggest, float(delta.dense.abs().max()))
        applied = (handle.parameter(name) - before[name]).abs().max()
        assert float(applied) <= eps * (1 + 1e-3)  # the bound survives adding to float32 weights
    assert biggest == pytest.approx(eps)  # lr ≫ ε: the projection is what stops the weights
    edit.revert(handle)
    assert_params_equal(handle, before)


def test_ft_l_steps_below_bf16_resolution_add_up_in_a_bf16_model():
    """FT-L's ε for GPT-J (5e-5) is below bfloat16's resolution of its ~0.02 weights: each Adam step
    (about lr per weight) would be lost if it were taken in the weight's dtype. The delta is trained
    in float32 and added to a float32 copy of the weight, so the steps add up and the edit shows."""
    handle = tiny_model("llama")
    handle.model.to(torch.bfloat16)
    before = params_snapshot(handle)
    lr, steps = 1e-5, 20
    edit = get_method("FT-L").apply(handle, [REQ], {"norm_constraint": 1.0, "lr": lr, "steps": steps,
                                                    "stop_loss": 0.0})
    assert edit.info["steps_run"] == steps
    (name, delta), = edit.deltas.items()
    weight = before[name]
    exponent = torch.frexp(weight.float()).exponent  # |w| in [2^(e-1), 2^e): bfloat16 spacing 2^(e-8) there
    half_step = torch.ldexp(torch.ones_like(weight, dtype=torch.float32), exponent - 9)
    assert float((half_step > lr).float().mean()) > 0.8  # one step alone would round away at most weights
    assert float(delta.dense.abs().max()) > 5 * lr  # ... but the steps added up
    applied = handle.parameter(name)
    assert torch.equal(applied, (weight.float() + delta.dense).to(torch.bfloat16))  # rounded once
    assert float((applied != weight).float().mean()) > 0.05
    edit.revert(handle)
    assert_params_equal(handle, before)


def test_the_two_losses_read_different_positions():
    handle = tiny_model("gpt2")
    prompt = MULTI.text
    answer = target_ids(handle.tokenizer, prompt, MULTI.target_new)
    assert len(answer) == 2
    n_prompt = len(handle.tokenizer(prompt)["input_ids"])
    last = objective_batch(handle, [prompt], [MULTI.target_new], "prompt_last")
    forced = objective_batch(handle, [prompt], [MULTI.target_new], "target_new")
    # FT-L reads the prompt alone and scores both target tokens at its last position ...
    assert isinstance(last, PromptLastBatch) and last.model_inputs()["input_ids"].shape == (1, n_prompt)
    assert last.positions.tolist() == [n_prompt - 1] * 2 and last.token_ids.tolist() == answer
    # ... FT-M reads prompt + target and scores each target token at its own position, prompt masked.
    assert forced.model_inputs()["input_ids"][0, n_prompt:].tolist() == answer
    assert forced.scored[0].nonzero()[:, 0].tolist() == [n_prompt - 1, n_prompt]
    with torch.no_grad():
        forced_loss = objective_loss(handle.model(**forced.model_inputs()).logits, forced)
        last_loss = objective_loss(handle.model(**last.model_inputs()).logits, last)
    assert float(forced_loss) == pytest.approx(score_targets(handle, [prompt], [MULTI.target_new])[0].mean_nll,
                                               rel=1e-5)
    next_logprobs = last_token_logprobs(handle, [prompt])[0]
    assert float(last_loss) == pytest.approx(float(-next_logprobs[answer].mean()), rel=1e-5)
    assert float(last_loss) != pytest.approx(float(forced_loss), rel=1e-3)


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_batch_loss_averages_per_request(objective):
    handle = tiny_model("gpt_neox")
    prompts, targets = [REQ.text, MULTI.text], [REQ.target_new, MULTI.target_new]
    batch = objective_batch(handle, prompts, targets, objective)
    singles = [objective_batch(handle, [p], [t], objective) for p, t in zip(prompts, targets, strict=True)]
    with torch.no_grad():
        loss = objective_loss(handle.model(**batch.model_inputs()).logits, batch)
        each = [objective_loss(handle.model(**b.model_inputs()).logits, b) for b in singles]
    assert float(loss) == pytest.approx(float(sum(each)) / 2, rel=1e-5)


def test_bad_hparams_fail_and_leave_the_model():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    for bad in ({"layers": (9,)}, {"objective": "everything"}, {"norm_constraint": -1.0}, {"modules": ("attn",)}):
        with pytest.raises(ValueError):
            get_method("FT-M").apply(handle, [REQ], bad)
    assert_params_equal(handle, before)


def test_saved_edit_round_trips(tmp_path):
    handle = tiny_model("qwen2")
    edit = get_method("FT-M").apply(handle, [REQ], {"steps": 2})
    with torch.no_grad():
        expected = handle.model(torch.tensor([handle.tokenizer(REQ.text)["input_ids"]])).logits
    edit.revert(handle)
    loaded = load_edit(edit.save(tmp_path / "ftm"))
    assert loaded.method == "FT-M" and loaded.hparams["objective"] == "target_new"
    loaded.apply(handle)
    with torch.no_grad():
        assert torch.equal(handle.model(torch.tensor([handle.tokenizer(REQ.text)["input_ids"]])).logits, expected)
    loaded.revert(handle)


# -- behaviour on the demo model ---------------------------------------------------------------
def _new_and_true(handle, record):
    request = record.request
    new, true = score_targets(handle, [request.text] * 2, [request.target_new, request.target_true])
    return new, true


@pytest.mark.parametrize("method", ["FT-L", "FT-M", "FT"])
def test_demo_edits_succeed(demo, method):
    records = edit_records("heldout")[:10]
    successes, gains, seconds = 0, [], []
    for record in records:
        new_before, _ = _new_and_true(demo, record)
        edit = get_method(method).apply(demo, [record.request])
        try:
            new_after, true_after = _new_and_true(demo, record)
            if method == "FT-L":
                eps = edit.hparams["norm_constraint"]
                assert all(float(d.dense.abs().max()) <= eps for d in edit.deltas.values())
        finally:
            edit.revert(demo)
        gains.append(new_after.logprob - new_before.logprob)
        successes += new_after.mean_nll < true_after.mean_nll  # CounterFact efficacy: P(new) > P(true)
        seconds.append(edit.stats.wall_time_s)
    print(f"{method}: efficacy {successes}/{len(records)}, mean Δlog P(new) {sum(gains) / len(gains):.2f}, "
          f"mean time {sum(seconds) / len(seconds):.2f} s")
    assert all(g > 0 for g in gains), "every edit must raise P(target_new) on its prompt"
    assert successes >= 9


def test_demo_batch_edit(demo):
    records = edit_records("heldout")[10:14]
    edit = get_method("FT-M").apply(demo, [r.request for r in records])
    try:
        wins = sum(new.mean_nll < true.mean_nll for new, true in (_new_and_true(demo, r) for r in records))
    finally:
        edit.revert(demo)
    assert wins >= 3
