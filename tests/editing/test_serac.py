"""SERAC: training (deterministic, resumable), the edit memory, scope routing and reversibility."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from editing.analysis.scoring import score_routes, score_targets, top_predictions
from editing.core.edit import EditError, handle_stack
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import get_method
from editing.methods.ike import IkeRoute
from editing.methods.serac import (
    CLASSIFIER_FILE,
    COUNTERFACTUAL_FILE,
    ScopeClassifier,
    SeracEdit,
    SeracRoute,
    classifier_loss,
    default_config,
)
from editing.methods.serac_data import classifier_text, edit_statement, scope_examples
from editing.models.tiny import tiny_model
from editing.storage.factbase import load_factbase
from editing.train import (
    checkpoint_config,
    edit_records,
    load_record_file,
    record_file_factbase,
    train_editor,
    trained_checkpoint,
)
from tests.helpers import assert_params_equal, params_snapshot

SMALL = {"n_records": 24, "classifier_steps": 8, "classifier_batch": 12, "cf_steps": 6, "cf_batch": 8,
         "cf_warmup": 2, "save_every": 2, "n_eval": 6}


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {f"cls.{k}": v for k, v in load_file(str(folder / CLASSIFIER_FILE)).items()}
    tensors.update({f"cf.{k}": v for k, v in load_file(str(folder / COUNTERFACTUAL_FILE)).items()})
    return tensors


# -- pieces ----------------------------------------------------------------------------------------
def test_untrained_classifier_is_embedding_similarity_and_loss_separates():
    classifier = ScopeClassifier(4)
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=-1)
    close = torch.nn.functional.normalize(torch.tensor([[0.9, 0.3, 0, 0]]), dim=-1)
    with torch.no_grad():
        probs = classifier(close, keys)[0]
    cos = float(close[0] @ keys[0])
    assert float(probs[0]) == pytest.approx(0.5 ** ((2 - 2 * cos) / 0.4), rel=1e-5)  # 0.5 exactly at cosine 0.8
    assert probs[0] > 0.5 > probs[1]
    log_sim = classifier.log_similarity(close, keys)
    right = classifier_loss(log_sim, torch.tensor([[1.0, 0.0]]))
    wrong = classifier_loss(log_sim, torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(right) and right < wrong


def test_scope_examples_label_paraphrases_in_and_neighbours_out():
    factbase = load_factbase()
    records = edit_records("train")[:30]
    examples = scope_examples(records, factbase, seed=0)
    assert len(examples) == len(records)
    for record, example in zip(records, examples, strict=True):
        inside = [q for q, key in example.queries if key == example.key]
        outside = [(q, key) for q, key in example.queries if key != example.key]
        assert inside == [record.request.text, *record.paraphrases]
        assert any(key[1] == example.key[1] for _q, key in outside)  # same relation, other subject
        assert any(key[0] == example.key[0] for _q, key in outside)  # same subject, other relation
        assert all(p in [q for q, _k in outside] for p, _a in record.locality)


# -- training ---------------------------------------------------------------------------------------
def test_no_heldout_records_give_no_figures_rather_than_zeros():
    from editing.methods.serac import evaluate_editor

    assert evaluate_editor(None, [], None, 0) == {"n_heldout_records": 0}  # type: ignore[arg-type]


def test_training_is_deterministic_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "first"))
    folder, report = train_editor(handle, "SERAC", SMALL)
    assert trained_checkpoint(handle, "SERAC", {**default_config(handle), **SMALL}) == folder
    assert 0.0 <= report["heldout_in_scope_recall"] <= 1.0 and report["n_train_records"] == 24
    first = checkpoint_tensors(folder)

    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "second"))
    messages: list[str] = []

    def interrupt(_fraction: float, message: str) -> None:
        messages.append(message)
        if "model step 4/" in message:
            raise KeyboardInterrupt  # as if the process were stopped half-way, after the step-4 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_editor(handle, "SERAC", SMALL, interrupt)
    messages.clear()
    folder2, _report = train_editor(handle, "SERAC", SMALL, lambda _f, m: messages.append(m))
    assert any("resuming" in m for m in messages)
    steps_run = [int(m.split("step ")[1].split("/")[0]) for m in messages if "model step" in m]
    assert steps_run and min(steps_run) >= 5  # picked up at the step-4 checkpoint
    second = checkpoint_tensors(folder2)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), f"{name} differs between runs with the same seed"
    assert not torch.equal(first["cf.transformer.h.0.mlp.c_fc.weight"],
                           before["transformer.h.0.mlp.c_fc.weight"])  # the copy was trained
    assert_params_equal(handle, before)  # the base model itself never changes


CAPITALS = {"Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi", "Ghana": "Accra", "Nepal": "Kathmandu",
            "Laos": "Vientiane", "Oman": "Muscat", "Fiji": "Suva", "Mali": "Bamako", "Cuba": "Havana",
            "Iraq": "Baghdad", "Chad": "N'Djamena", "Niger": "Niamey"}
CONTINENTS = {"Peru": "South America", "Chile": "South America", "Kenya": "Africa", "Ghana": "Africa",
              "Nepal": "Asia", "Laos": "Asia", "Oman": "Asia", "Fiji": "Oceania", "Mali": "Africa",
              "Cuba": "North America", "Iraq": "Asia", "Chad": "Africa",
              "Niger": "africa"}  # a file may spell one object two ways; neither is the other's new target


def write_real_record_file(path) -> None:
    """Records in the shape ``python -m eval.realfacts --training-records`` writes, with prompt
    templates the bundled fact base does not have."""
    lines = []
    relations = ((CAPITALS, "The capital of {} is the city of", "{}'s capital city is"),
                 (CONTINENTS, "{} is located in the continent of", "{} lies in the continent of"))
    for facts, template, paraphrase in relations:
        subjects = list(facts)
        for i, subject in enumerate(subjects):
            other = subjects[(i + 1) % len(subjects)]
            target_new = next(o for o in facts.values() if o != facts[subject])
            lines.append(json.dumps({"prompt": template, "subject": subject, "target_new": target_new,
                                     "target_true": facts[subject], "paraphrases": [paraphrase.format(subject)],
                                     "locality": [[template.format(other), facts[other]]]}))
    path.write_text("\n".join(lines) + "\n")


def test_serac_trains_on_a_record_file_with_its_own_relations(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    write_real_record_file(path)
    factbase = record_file_factbase(path)
    assert set(factbase.relations) == {"The capital of {} is the city of", "{} is located in the continent of"}
    assert factbase.object_of("Peru", "The capital of {} is the city of") == "Lima"
    records = load_record_file(path, "train")
    examples = scope_examples(records, factbase, seed=0)
    assert len(examples) == len(records)  # every record's template is a relation: none is dropped
    for record, example in zip(records, examples, strict=True):
        outside = [key for _q, key in example.queries if key != example.key]
        assert [q for q, key in example.queries if key == example.key] == [record.request.text, *record.paraphrases]
        assert any(key[1] == example.key[1] for key in outside)  # same template, other subject
        assert any(key[0] == example.key[0] for key in outside)  # same subject, the other template

    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    handle = tiny_model("gpt2")
    config = {**SMALL, "n_records": 0, "data": str(path)}
    folder, report = train_editor(handle, "SERAC", config)
    assert report["n_train_records"] == len(records)
    assert report["n_heldout_records"] == min(SMALL["n_eval"], len(load_record_file(path, "heldout"))) > 0
    assert checkpoint_config(folder)["data"] == str(path)


def test_serac_trains_edits_routes_and_reverts_on_every_family(tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path))
    before = params_snapshot(tiny_handle)
    tiny = {**SMALL, "n_records": 8, "classifier_steps": 2, "cf_steps": 2, "n_eval": 2}
    folder, _report = train_editor(tiny_handle, "SERAC", tiny)
    request = EditRequest("The capital of {} is", "France", "Berlin", "Paris")
    assert get_method("SERAC").readiness(tiny_handle) is not None  # the default config is not trained
    edit = get_method("SERAC").apply(tiny_handle, [request], {"checkpoint": str(folder)})
    assert edit.checkpoint == str(folder)
    assert isinstance(edit, SeracEdit) and edit.is_applied
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    session = EditSession(tiny_handle)
    session.push(edit)
    inside, outside = session.routes(["The capital of France is", "Tokyo is a city in"])
    assert isinstance(inside, SeracRoute) and inside.handle is not tiny_handle
    assert inside.handle.arch.family == tiny_handle.arch.family
    assert outside.handle is tiny_handle and outside.prompt == "Tokyo is a city in"
    scores = score_routes([inside, outside], ["Berlin", "Japan"])
    assert all(torch.isfinite(s.logprobs).all() for s in scores)
    assert_params_equal(tiny_handle, before)


def test_untrained_serac_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path))
    handle = tiny_model("llama")
    message = get_method("SERAC").readiness(handle)
    assert message is not None and "python -m editing.train SERAC --model tiny-llama" in message
    with pytest.raises(EditError, match=r"editing\.train SERAC"):
        get_method("SERAC").apply(handle, [EditRequest("The capital of {} is", "France", "Berlin")])
    assert not handle_stack(handle)


# -- behaviour on the demo model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def serac_demo(demo_handle):
    """The demo model's trained SERAC editor (trained on first use, then cached on disk)."""
    _folder, report = train_editor(demo_handle, "SERAC")
    return demo_handle, report


def held_out_memory(n: int = 40) -> list:
    """Held-out edit records, at most one per subject, so every edit has its own scope."""
    seen, records = set(), []
    for record in edit_records("heldout"):
        if record.request.subject not in seen:
            seen.add(record.request.subject)
            records.append(record)
    return records[:n]


@pytest.mark.slow
def test_serac_raises_reliability_on_held_out_edits(serac_demo, demo):
    """Measured on 40 held-out edits (one batch edit, one subject each): the new target is the
    top-1 answer for 0% of edit prompts and paraphrases without the edit; with SERAC every query
    is routed to its own edit and the new target is top-1 for 80% of edit prompts and 82% of
    held-out-template paraphrases (90% and 88% before issue 19, when SERAC also trained on the
    probe-side half of the training records)."""
    _handle, report = serac_demo
    assert report["heldout_in_scope_recall"] >= 0.95
    records = held_out_memory()
    edit = get_method("SERAC").apply(demo, [r.request for r in records])
    edit.revert(demo)
    assert isinstance(edit, SeracEdit) and edit.memory_keys.shape[0] == len(records)
    session = EditSession(demo)
    session.push(edit)
    pairs = [(q, r) for r in records for q in (r.request.text, *r.paraphrases)]
    prompts = [q for q, _r in pairs]
    targets = [r.request.target_new for _q, r in pairs]
    routes = session.routes(prompts)
    assert all(isinstance(route, SeracRoute) and route.edit_text == classifier_text(r.request)
               for route, (_q, r) in zip(routes, pairs, strict=True))
    assert all(route.prompt == f"{edit_statement(r.request)} {q}" and route.prompt[route.prefix_chars:] == q
               for route, (q, r) in zip(routes, pairs, strict=True))
    plain = score_targets(demo, prompts, targets)
    edited = score_routes(routes, targets)
    plain_top1 = sum(s.hits[0].item() for s in plain) / len(plain)
    edited_top1 = sum(s.hits[0].item() for s in edited) / len(edited)
    on_edit_prompt = [q == r.request.text for q, r in pairs]
    for name, wanted in (("edit prompts", True), ("paraphrases", False)):
        hits = [s.hits[0].item() for s, own in zip(edited, on_edit_prompt, strict=True) if own == wanted]
        print(f"SERAC, {len(records)} held-out edits in one memory: new target top-1 for "
              f"{sum(hits) / len(hits):.0%} of {len(hits)} {name}")
    assert plain_top1 <= 0.05
    assert edited_top1 >= 0.75


@pytest.mark.slow
def test_serac_leaves_out_of_scope_answers_unchanged(serac_demo, demo):
    """Queries about other facts — same relation of other subjects, other relations of the edited
    subjects, unrelated facts — go to the unchanged base model (measured: 95 of 96)."""
    records = held_out_memory()
    edit = get_method("SERAC").apply(demo, [r.request for r in records])
    edit.revert(demo)
    session = EditSession(demo)
    session.push(edit)
    examples = scope_examples(records, load_factbase(), seed=5)
    memory = {e.key for e in examples}
    outside = list(dict.fromkeys(q for e in examples for q, key in e.queries if key not in memory))
    assert len(outside) >= 80
    routes = session.routes(outside)
    untouched = [route.handle is demo and route.prompt == q and route.routed_by is None
                 for route, q in zip(routes, outside, strict=True)]
    print(f"SERAC out of scope: {sum(untouched)} of {len(untouched)} queries go to the unchanged model")
    assert sum(untouched) / len(untouched) >= 0.97
    kept = [q for q, ok in zip(outside, untouched, strict=True) if ok]
    answers = [predictions[0].token for predictions in top_predictions(demo, kept, k=1)]
    with session.active():
        routed = score_routes(session.routes(kept), answers)
    plain = score_targets(demo, kept, answers)
    for before, after in zip(plain, routed, strict=True):
        assert torch.equal(before.logprobs, after.logprobs)


@pytest.mark.slow
def test_sequential_serac_edits_share_one_memory(serac_demo, demo, tmp_path):
    """Stacked SERAC edits answer each query from the best-matching edit over all of them, and a
    later edit of the same fact overrides an earlier one."""
    records = held_out_memory(6)
    session = EditSession(demo)
    before = params_snapshot(demo)
    for record in records:
        session.apply("SERAC", record.request)
    assert_params_equal(demo, before)
    for record in records:
        for query in record.paraphrases:
            route = session.route(query)
            assert isinstance(route, SeracRoute) and route.edit_text == classifier_text(record.request)
    first = records[0].request
    objects = [f.object for f in load_factbase().facts if f.object not in (first.target_new, first.target_true)]
    again = EditRequest(first.prompt, first.subject, objects[0], first.target_true)
    session.apply("SERAC", again)
    route = session.route(records[0].paraphrases[0])
    assert route.prompt.startswith(edit_statement(again))
    session.save(tmp_path / "stack")
    loaded = EditSession(demo)
    loaded.load(tmp_path / "stack")
    assert [type(e) for e in loaded.edits] == [SeracEdit] * (len(records) + 1)
    for query in (records[1].paraphrases[0], records[0].paraphrases[0], "The capital of Japan is"):
        assert loaded.route(query).prompt == session.route(query).prompt
    session.undo()
    assert session.route(records[0].paraphrases[0]).prompt.startswith(edit_statement(first))


@pytest.mark.slow
def test_ike_context_applies_only_to_queries_serac_leaves_to_the_base_model(serac_demo, demo):
    record = held_out_memory(1)[0]
    session = EditSession(demo)
    session.apply("SERAC", record.request)
    session.apply("IKE", EditRequest("The capital of {} is", "Japan", "Paris", "Tokyo"))
    in_scope = session.route(record.paraphrases[0])
    assert isinstance(in_scope, SeracRoute) and in_scope.handle is not demo
    outside = session.route("Japan's capital city is")
    assert isinstance(outside, IkeRoute) and outside.handle is demo and "Paris" in outside.prompt
