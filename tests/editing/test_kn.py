"""KN: integrated gradients, refinement, the value-vector edit on every family, and the demo model."""

from __future__ import annotations

import pytest
import torch

from editing.analysis.scoring import score_targets
from editing.core.edit import load_edit
from editing.core.hooks import modify
from editing.core.request import EditRequest
from editing.methods import get_method
from editing.methods.kn import KNHParams, last_position_logits, neuron_attributions, refine_neurons
from editing.models.tiny import tiny_model
from editing.models.tokens import encode, pad_batch, pad_id, target_ids
from editing.storage.factbase import load_factbase
from editing.train import edit_records
from tests.helpers import assert_params_equal, params_snapshot

REQ = EditRequest("The capital of {} is", "France", "Rome", "Paris")
FAST = {"steps": 4, "n_paraphrases": 2}


def test_runs_on_every_family_and_reverts_exactly(tiny_handle):
    before = params_snapshot(tiny_handle)
    edit = get_method("KN").apply(tiny_handle, [REQ], FAST)
    neurons = edit.info["neurons"]
    assert neurons and edit.info["requests"][0]["prompts"][0] == REQ.text
    assert len(edit.info["requests"][0]["prompts"]) == 3
    arch = tiny_handle.arch
    for layer in edit.info["layers"]:
        name = f"{arch.mlp_out_name(layer)}.weight"
        delta = edit.deltas[name]
        param = tiny_handle.parameter(name)
        chosen = sorted(n["neuron"] for n in neurons if n["layer"] == layer)
        assert delta.shape == tuple(param.shape) and delta.rank == len(chosen)
        dense = delta.materialise()
        assert torch.isfinite(dense).all()
        # only the chosen neurons' value vectors change: (d_model, d_ff) view, columns = neurons
        by_neuron = (dense.T if arch.conv1d else dense).abs().sum(0)
        assert by_neuron.nonzero()[:, 0].tolist() == sorted(set(chosen))
        changed = arch.weight_out_in(tiny_handle.module(arch.mlp_out_name(layer))) - (
            before[name].T if arch.conv1d else before[name])
        assert changed.abs().sum(0).nonzero()[:, 0].tolist() == sorted(set(chosen))
    assert set(edit.deltas) == {f"{arch.mlp_out_name(layer)}.weight" for layer in edit.info["layers"]}
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    assert not any(p.requires_grad for p in tiny_handle.model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_integrated_gradients_are_complete(family):
    """Completeness: a layer's attributions sum to P(full activations) − P(last position zeroed)."""
    handle = tiny_model(family)
    prompts = [REQ.text, "Paris is a city in"]
    answers = [target_ids(handle.tokenizer, p, "Paris")[0] for p in prompts]
    layer = 1
    attributions, activations = neuron_attributions(handle, prompts, answers, [layer], steps=200, batch_size=100)
    assert attributions.shape == activations.shape == (2, 1, handle.d_ff)
    name = handle.arch.mlp_out_name(layer)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids = torch.tensor([encode(handle.tokenizer, prompt)])
        last = ids.shape[1] - 1

        def zero_last(hidden, last=last):
            hidden = hidden.clone()
            hidden[:, last] = 0
            return hidden

        with torch.no_grad():
            full = handle.model(ids).logits[0, last].softmax(-1)[answer]
            with modify(handle.model, name, zero_last, inputs=True):
                empty = handle.model(ids).logits[0, last].softmax(-1)[answer]
        total = float(attributions[row, 0].sum())
        assert total == pytest.approx(float(full - empty), rel=0.05, abs=1e-7)


def test_works_under_no_grad():
    handle = tiny_model("qwen2")
    before = params_snapshot(handle)
    with torch.no_grad():
        edit = get_method("KN").apply(handle, [REQ], FAST)
    assert edit.info["neurons"] and any(d.materialise().abs().max() > 0 for d in edit.deltas.values())
    edit.revert(handle)
    assert_params_equal(handle, before)
    assert not any(p.requires_grad for p in handle.model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_last_position_logits_match_the_full_forward(family):
    handle = tiny_model(family)
    seqs = [encode(handle.tokenizer, p) for p in (REQ.text, "Tokyo is in", "The official language of France is")]
    batch = pad_batch(seqs, pad_id(handle.tokenizer))
    last = torch.tensor([n - 1 for n in batch.lengths])
    with torch.no_grad():
        full = handle.model(**batch.model_inputs()).logits[torch.arange(3), last]
        picked = last_position_logits(handle, batch.input_ids, batch.attention_mask, last)
    assert torch.allclose(picked, full, atol=1e-5)


def test_attributions_do_not_depend_on_batching():
    handle = tiny_model("gpt_neox")
    prompts = [REQ.text, "The official language of France is", "Tokyo is in"]
    answers = [target_ids(handle.tokenizer, p, "Paris")[0] for p in prompts]
    whole, _ = neuron_attributions(handle, prompts, answers, [0, 2], steps=6, batch_size=64)
    pieces, _ = neuron_attributions(handle, prompts, answers, [0, 2], steps=6, batch_size=5)
    assert torch.allclose(whole, pieces, atol=1e-7, rtol=1e-4)


def test_refinement_keeps_neurons_shared_by_p_of_prompts():
    attributions = torch.zeros(4, 2, 5)
    attributions[:, 0, 1] = 1.0  # strong in every prompt
    attributions[:2, 1, 3] = 0.5  # above 0.2·max in half the prompts
    attributions[0, 1, 4] = 0.1  # below the threshold (0.1 < 0.2)
    attributions[3, 0, 0] = -2.0  # negative attributions never count
    kept, share, used = refine_neurons(attributions, 0.2, 0.5)
    assert kept == [(0, 1), (1, 3)] and used == 0.5
    assert share[0, 1] == 1.0 and share[1, 3] == 0.5 and share[1, 4] == 0.0 and share[0, 0] == 0.0
    kept, _, used = refine_neurons(attributions, 0.2, 0.75, min_neurons=1)
    assert kept == [(0, 1)] and used == 0.75
    # too few neurons at p = 0.75: p drops by 0.05 steps until two neurons are shared
    kept, _, used = refine_neurons(attributions, 0.2, 0.75, min_neurons=2)
    assert kept == [(0, 1), (1, 3)] and used == pytest.approx(0.5)


def test_refinement_caps_and_never_ends_empty():
    crowded = torch.zeros(3, 1, 10)
    crowded[:, 0, :8] = torch.arange(1.0, 9.0)  # eight neurons shared by every prompt
    kept, _, used = refine_neurons(crowded, 0.1, 0.7, max_neurons=5)
    assert used == 1.0 and kept == [(0, n) for n in range(3, 8)]  # the five largest attributions
    lonely = torch.zeros(4, 1, 3)
    lonely[0, 0, 2] = 1.0  # one neuron, coarse for one prompt of four
    kept, _, used = refine_neurons(lonely, 0.2, 1.0, min_neurons=1)
    assert kept == [(0, 2)] and used == 0.25


def test_prompts_are_paraphrases_from_the_relations_training_templates():
    handle = tiny_model("gpt2")
    relation = load_factbase().relations["country_capital"]
    edit = get_method("KN").apply(handle, [REQ], {**FAST, "n_paraphrases": 3})
    edit.revert(handle)
    prompts = edit.info["requests"][0]["prompts"]
    allowed = {t.replace("{}", "France") for t in relation.train_templates if t != REQ.prompt}
    assert prompts[0] == REQ.text and len(prompts) == 4 and set(prompts[1:]) <= allowed
    outside = EditRequest("People say {} is", "Paris", "Rome")  # no template of the fact base
    edit = get_method("KN").apply(handle, [outside], FAST)
    edit.revert(handle)
    assert edit.info["requests"][0]["prompts"] == [outside.text]


def test_hparams_cover_all_layers_and_validate():
    handle = tiny_model("mistral", n_layers=6)
    assert KNHParams.for_model(handle).layers == tuple(range(6))
    before = params_snapshot(handle)
    for bad in ({"layers": (6,)}, {"attribution_threshold": 0.0}, {"share_threshold": 1.5}):
        with pytest.raises(ValueError):
            get_method("KN").apply(handle, [REQ], bad)
    assert_params_equal(handle, before)


def test_saved_edit_round_trips(tmp_path):
    handle = tiny_model("gpt2")
    edit = get_method("KN").apply(handle, [REQ], FAST)
    after = params_snapshot(handle)
    edit.revert(handle)
    loaded = load_edit(edit.save(tmp_path / "kn"))
    assert loaded.info["neurons"] == edit.info["neurons"]
    loaded.apply(handle)
    assert_params_equal(handle, after)
    loaded.revert(handle)


# -- behaviour on the demo model ---------------------------------------------------------------
def test_demo_edit_finds_neurons_and_raises_the_new_answer(demo):
    records = edit_records("heldout")[:10]
    gains, wins, counts, seconds = [], 0, [], []
    for record in records:
        request = record.request
        new_before = score_targets(demo, [request.text], [request.target_new])[0]
        edit = get_method("KN").apply(demo, [request])
        try:
            new_after, true_after = score_targets(demo, [request.text] * 2, [request.target_new, request.target_true])
        finally:
            edit.revert(demo)
        neurons = edit.info["neurons"]
        assert neurons and all(0 <= n["layer"] < demo.n_layers and 0 <= n["neuron"] < demo.d_ff for n in neurons)
        assert all(n["attribution"] > 0 for n in neurons)
        assert len(edit.info["requests"][0]["prompts"]) > 1  # paraphrases joined the refinement
        counts.append(len(neurons))
        gains.append(new_after.first_token_prob - new_before.first_token_prob)
        wins += new_after.first_token_prob > true_after.first_token_prob
        seconds.append(edit.stats.wall_time_s)
    print(f"KN: neurons per edit {counts}, mean ΔP(new first token) {sum(gains) / len(gains):.3f}, "
          f"efficacy {wins}/{len(records)}, mean time {sum(seconds) / len(seconds):.2f} s")
    assert all(g > 0 for g in gains)
