"""The training pipeline of learned editors: records, gradient factors, determinism, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from editing.core.edit import EditError, WeightDelta, handle_stack
from editing.learning.editor_data import batch_indices, neighbour_facts, record_batch
from editing.learning.learned import (
    EDITOR_TENSORS,
    LowRankShift,
    default_edit_layers,
    gradient_factors,
    mlp_weight_names,
    out_in_shape,
    shifted,
    to_param_delta,
)
from editing.learning.targets import target_batch, target_nll
from editing.learning.training import load_tensors
from editing.methods import get_method
from editing.train import (
    EDITORS_ENV,
    TRAINERS,
    checkpoint_config,
    checkpoint_dir,
    edit_records,
    load_record_file,
    main,
    save_editor_meta,
    train_editor,
    trained_checkpoint,
)

# A few steps, two edits a step: enough to exercise every part of a training run quickly.
SMALL = {"steps": 4, "batch_size": 2, "n_eval": 2, "checkpoint_every": 2, "log_every": 1}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty folder of trained editors, so nothing trained earlier is found."""
    monkeypatch.setenv(EDITORS_ENV, str(tmp_path / "editors"))
    return tmp_path / "editors"


# -- records -------------------------------------------------------------------------------------
def test_edit_records_split_by_subject_and_are_deterministic():
    train, heldout = edit_records("train"), edit_records("heldout")
    assert len(train) > 500 and len(heldout) > 100
    train_subjects = {r.request.subject for r in train}
    assert not train_subjects & {r.request.subject for r in heldout}
    assert edit_records("train") == train
    for record in train[:50] + heldout[:50]:
        assert record.request.target_new != record.request.target_true
        assert record.paraphrases and record.locality


def test_record_file_is_read_and_split_by_subject(tmp_path):
    lines = [json.dumps({"prompt": "The capital of {} is", "subject": f"Country{i}", "target_new": "Lyon",
                         "target_true": "Paris", "paraphrases": [f"Country{i}'s capital is"],
                         "locality": [["The capital of Spain is", "Madrid"]]}) for i in range(40)]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    train, heldout = load_record_file(path, "train"), load_record_file(path, "heldout")
    assert len(train) + len(heldout) == 40 and train and heldout
    assert {r.request.subject for r in train}.isdisjoint({r.request.subject for r in heldout})
    assert train[0].locality == (("The capital of Spain is", "Madrid"),)
    path.write_text(lines[0] + "\n" + json.dumps({"prompt": "x {}", "subject": "y"}) + "\n")
    with pytest.raises(ValueError, match="record 2"):
        load_record_file(path)


def test_batch_order_is_seeded_and_covers_every_record_each_epoch():
    steps = [batch_indices(10, 5, seed=3, step=s) for s in range(4)]
    assert sorted(steps[0] + steps[1]) == list(range(10))
    assert sorted(steps[2] + steps[3]) == list(range(10))
    assert steps[0] == batch_indices(10, 5, seed=3, step=0)
    assert steps[0] + steps[1] != batch_indices(10, 5, seed=4, step=0) + batch_indices(10, 5, seed=4, step=1)


def test_default_layers_follow_depth():
    assert default_edit_layers(4) == [2, 3]
    assert default_edit_layers(2) == [1]
    assert default_edit_layers(12) == [9, 10, 11]
    assert default_edit_layers(48) == [45, 46, 47]


# -- gradient factors and low-rank shifts ------------------------------------------------------------
def test_gradient_factors_equal_the_dense_gradient(tiny_handle):
    handle = tiny_handle
    names = mlp_weight_names(handle, default_edit_layers(handle.n_layers))
    batch = target_batch(handle, [("The capital of France is", "Lyon"), ("Paris is a famous", "city in France")])
    factors, _ = gradient_factors(handle, names, batch)
    params = [handle.parameter(n) for n in names]
    try:
        for param in params:
            param.requires_grad_(True)
        for row in range(len(batch)):
            one = batch.rows(slice(row, row + 1))
            loss = target_nll(handle.model(**one.model_inputs()).logits, one).sum()
            for name, grad in zip(names, torch.autograd.grad(loss, params), strict=True):
                expected = grad.T if handle.arch.conv1d else grad
                assert torch.allclose(factors[name].dense(row), expected, atol=1e-6), name
    finally:
        for param in params:
            param.requires_grad_(False)
    # Padding and positions after the last scored token carry no gradient.
    last_layer_out = names[-1]
    mask = factors[last_layer_out].mask
    assert mask.sum() == batch.scored.sum()  # the last block's output reaches only its own position


def test_shift_hooks_equal_applying_the_low_rank_delta(tiny_handle):
    handle = tiny_handle
    names = mlp_weight_names(handle, [handle.n_layers - 1])
    gen = torch.Generator().manual_seed(0)
    shifts = {}
    for name in names:
        out_dim, in_dim = out_in_shape(handle, name)
        shifts[name] = LowRankShift(0.1 * torch.randn(2, 3, out_dim, generator=gen),
                                    0.1 * torch.randn(2, 3, in_dim, generator=gen))
    batch = target_batch(handle, [("The capital of France is", "Lyon")] * 2)
    with torch.no_grad(), shifted(handle, shifts):
        hooked = handle.model(**batch.model_inputs()).logits
    edit = WeightDelta(method="test", requests=[], hparams={},
                       deltas={n: to_param_delta(handle, n, s.left[0], s.right[0]) for n, s in shifts.items()})
    edit.apply(handle)
    try:
        with torch.no_grad():
            applied = handle.model(**batch.model_inputs()).logits
    finally:
        edit.revert(handle)
    assert torch.allclose(hooked[0], applied[0], atol=1e-4)
    assert not torch.allclose(hooked[1], applied[1], atol=1e-4)  # row 1 had its own shift
    for name, delta in edit.deltas.items():
        assert delta.shape == tuple(handle.parameter(name).shape) and delta.rank == 3


# -- training runs ---------------------------------------------------------------------------------
def _editor_weights(folder) -> dict[str, torch.Tensor]:
    return load_tensors(folder / EDITOR_TENSORS)[0]


@pytest.mark.parametrize("method", ["MEND", "KE"])
def test_training_is_deterministic_given_a_seed(demo, method, tmp_path, monkeypatch):
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        monkeypatch.setenv(EDITORS_ENV, str(tmp_path / label))
        folder, report = train_editor(demo, method, {**SMALL, "seed": seed})
        runs[label] = _editor_weights(folder)
        assert report["steps"] == SMALL["steps"] and len(report["history"]) == SMALL["steps"]
    assert runs["a"].keys() == runs["b"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


class Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_editor(demo, tmp_path, monkeypatch):
    monkeypatch.setenv(EDITORS_ENV, str(tmp_path / "whole"))
    whole, _ = train_editor(demo, "MEND", SMALL)

    monkeypatch.setenv(EDITORS_ENV, str(tmp_path / "resumed"))

    def stop_at_step_three(_fraction: float, message: str) -> None:
        if message.startswith("step 3/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train_editor(demo, "MEND", SMALL, progress=stop_at_step_three)
    assert trained_checkpoint(demo, "MEND", {**TRAINERS["MEND"].default_config(demo), **SMALL}) is None
    messages = []
    resumed, report = train_editor(demo, "MEND", SMALL, progress=lambda _f, m: messages.append(m))
    assert messages[0] == "resuming at step 2"
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4]
    a, b = _editor_weights(whole), _editor_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished editor is found in the cache without training again.
    again, _ = train_editor(demo, "MEND", SMALL, progress=lambda _f, _m: pytest.fail("trained twice"))
    assert again == resumed


def test_training_restores_the_thread_count(demo, fresh_cache):
    before = torch.get_num_threads()
    train_editor(demo, "MEND", {**SMALL, "steps": 1})
    assert torch.get_num_threads() == before


def test_unknown_training_setting_is_refused(demo, fresh_cache):
    with pytest.raises(KeyError, match="no_such_setting"):
        train_editor(demo, "MEND", {"no_such_setting": 1})
    with pytest.raises(KeyError, match="trainable methods"):
        train_editor(demo, "ROME-that-does-not-exist")


@pytest.mark.parametrize("method", ["MEND", "KE"])
def test_untrained_method_says_how_to_train(demo, fresh_cache, method):
    message = get_method(method).readiness(demo)
    assert message is not None and f"python -m editing.train {method} --model demo" in message


def test_command_line_trains_and_prints_the_report(demo, fresh_cache, capsys):
    settings = [item for key, value in SMALL.items() if key != "steps" for item in ("--set", f"{key}={value}")]
    assert main(["MEND", "--model", "demo", "--steps", "2", "--seed", "5", *settings]) == 0
    out = capsys.readouterr().out
    assert "checkpoint: " in out
    folder = out.split("checkpoint: ", 1)[1].splitlines()[0].strip()
    config = checkpoint_config(fresh_cache / "mend" / folder.rsplit("/", 1)[1])
    assert config["steps"] == 2 and config["seed"] == 5
    assert '"heldout"' in out


def test_training_on_a_record_file(demo, fresh_cache, tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [json.dumps({**r.request.to_dict(), "paraphrases": list(r.paraphrases), "locality": list(r.locality)})
             for r in edit_records("train")[:40]]
    path.write_text("\n".join(lines) + "\n")
    config = {**SMALL, "data": str(path)}
    folder, report = train_editor(demo, "MEND", config)
    assert report["n_train_records"] == len(load_record_file(path, "train")) < 40
    assert report["heldout"]["n_edits"] == min(SMALL["n_eval"], len(load_record_file(path, "heldout")))
    assert checkpoint_config(folder)["data"] == str(path)
    path.write_text("\n".join(lines[:30]) + "\n")  # other contents: another editor
    assert checkpoint_dir(demo, "MEND", {**TRAINERS["MEND"].default_config(demo), **config}) != folder


def test_neighbour_facts_share_the_template_and_become_locality_rows(demo):
    records = edit_records("train")[:200]
    neighbours = neighbour_facts(records, 2)
    assert neighbour_facts(records, 2) == neighbours
    found = 0
    for record, facts in zip(records, neighbours, strict=True):
        assert len(facts) <= 2
        for prompt, answer in facts:
            other = next(r.request for r in records if r.request.text == prompt and r.request.target_true == answer)
            assert other.prompt == record.request.prompt and other.subject != record.request.subject
            found += 1
    assert found > 100
    batch = record_batch(demo, records[:3], n_paraphrases=1, neighbours=neighbours[:3])
    n_outer = 3 * 2
    n_local = sum(len(r.locality) + len(n) for r, n in zip(records[:3], neighbours[:3], strict=True))
    assert batch.n_outer == n_outer and len(batch.probes) == n_outer + n_local
    assert batch.local_pre_logits.shape[0] == n_local


def test_a_chosen_checkpoint_must_be_a_finished_editor_of_that_method_for_this_model(fresh_cache):
    from editing.core.request import EditRequest
    from editing.models.tiny import tiny_model

    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    request = EditRequest("The capital of {} is", "France", "Berlin", "Paris")
    mend_folder, _ = train_editor(gpt2, "MEND", {"steps": 2, "batch_size": 2, "n_eval": 0})
    cases = {
        "SERAC": (gpt2, mend_folder, "holds a MEND editor, not a SERAC one"),
        "KE": (gpt2, mend_folder, "holds a MEND editor, not a KE one"),
        "MEND": (llama, mend_folder, "was trained for"),
    }
    for method, (handle, folder, message) in cases.items():
        with pytest.raises(EditError, match=message):
            get_method(method).apply(handle, [request], {"checkpoint": str(folder)})
        assert not handle_stack(handle)
    unfinished = fresh_cache / "unfinished"
    save_editor_meta(unfinished, gpt2, "MEND", TRAINERS["MEND"].default_config(gpt2))  # training never ended
    with pytest.raises(EditError, match="no finished MEND editor"):
        get_method("MEND").apply(gpt2, [request], {"checkpoint": str(unfinished)})
    broken = fresh_cache / "broken"
    broken.mkdir()
    (broken / "editor.json").write_text("{not json")
    (broken / "editor.safetensors").write_bytes(b"")  # present, so the record is what is read
    with pytest.raises(EditError, match="cannot be read"):
        get_method("MEND").apply(gpt2, [request], {"checkpoint": str(broken)})
    edit = get_method("MEND").apply(gpt2, [request], {"checkpoint": str(mend_folder)})  # the right one works
    edit.revert(gpt2)


def test_readiness_follows_the_chosen_checkpoint(fresh_cache):
    from editing.models.tiny import tiny_model

    handle = tiny_model("gpt2")
    folder, report = train_editor(handle, "KE", {"steps": 2, "batch_size": 2, "n_eval": 0})
    assert report["heldout"] == {"n_edits": 0}  # nothing evaluated: no figures, not zeros
    method = get_method("KE")
    assert "needs an editor trained" in method.readiness(handle)  # the default config is not trained
    assert method.readiness(handle, {"checkpoint": str(folder)}) is None
    assert method.readiness(handle, method.default_hparams(handle).replace(checkpoint=str(folder))) is None
    assert "holds no finished KE editor" in method.readiness(handle, {"checkpoint": str(fresh_cache)})


def test_every_learned_part_uses_one_checkpoint_format_and_older_ones_are_refused(fresh_cache, monkeypatch):
    import editing.train
    from editing.learning.training import CHECKPOINT_FORMAT
    from editing.learning.training import load_tensors as load_part
    from editing.models.tiny import tiny_model

    handle = tiny_model("gpt2")
    folder, _ = train_editor(handle, "MEND", {"steps": 2, "batch_size": 2, "n_eval": 0, "checkpoint_every": 1})
    assert load_part(folder / EDITOR_TENSORS)[1]["format"] == str(CHECKPOINT_FORMAT)
    assert not list(folder.glob("*.state.*"))  # the resume state goes once the part is trained
    method = get_method("MEND")
    assert method.readiness(handle, {"checkpoint": str(folder)}) is None
    meta = json.loads((folder / "editor.json").read_text())
    del meta["format"]  # as written before the one format
    (folder / "editor.json").write_text(json.dumps(meta))
    assert "checkpoint format 1" in method.readiness(handle, {"checkpoint": str(folder)})
    config = {**TRAINERS["MEND"].default_config(handle), "steps": 2}
    key = checkpoint_dir(handle, "MEND", config)
    monkeypatch.setattr(editing.train, "CHECKPOINT_FORMAT", CHECKPOINT_FORMAT + 1)
    assert checkpoint_dir(handle, "MEND", config) != key  # another format: another cache folder
