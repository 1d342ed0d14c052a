"""The bundled demo model: cached build, accuracy figures, determinism of the tokenizer."""

from __future__ import annotations

import json

import editing.models.demo as demo_module
from editing.analysis.scoring import top_predictions
from editing.models.demo import (
    DemoConfig,
    build_tokenizer,
    demo_key,
    demo_model_dir,
    ensure_demo_model,
    shipped_record,
    weights_sha256,
)
from editing.storage.factbase import load_corpus, load_factbase


def test_build_is_cached_and_reports_accuracy(demo_handle):
    folder = ensure_demo_model()
    assert folder == demo_model_dir(DemoConfig())
    report = json.loads((folder / "report.json").read_text())
    assert report["train_first_token_accuracy"] >= 0.95
    assert report["heldout_first_token_accuracy"] >= 0.80
    # a second call finds the cache instead of rebuilding
    mtime = (folder / "report.json").stat().st_mtime
    assert ensure_demo_model() == folder and (folder / "report.json").stat().st_mtime == mtime


def test_the_shipped_weights_are_current_and_are_the_ones_loaded(demo_handle):
    """Every machine edits the same model: the shipped weights were built for today's data and config,
    and the model the tests load is bit for bit the shipped one."""
    record = shipped_record()
    assert record is not None, "data/demo-model/build.json is missing"
    assert record["key"] == demo_key(), (
        "the shipped demo model was built for other data or settings: rebuild it with "
        "`python -m editing.models.demo --ship`")
    assert weights_sha256(demo_handle.model) == record["weights_sha256"], (
        f"the cached demo model ({demo_model_dir()}) is not the shipped one: delete that folder and run "
        "`python -m editing.prepare`")


def test_an_empty_cache_unpacks_the_shipped_model_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path))

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped weights should have been unpacked, not retrained")

    monkeypatch.setattr(demo_module, "train_demo_model", no_training)
    folder = ensure_demo_model()
    assert folder.is_relative_to(tmp_path) and (folder / "report.json").exists()
    assert (folder / "model.safetensors").read_bytes() == (demo_module.SHIPPED_DIR / "model.safetensors").read_bytes()


def test_other_settings_are_trained_not_unpacked(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path))
    trained = []

    def fake_training(folder, config, progress=None):
        trained.append(config)
        (folder / "report.json").write_text("{}")

    monkeypatch.setattr(demo_module, "train_demo_model", fake_training)
    other = DemoConfig(steps=3)
    assert demo_key(other) != demo_key()
    assert (ensure_demo_model(other) / "report.json").exists() and trained == [other]


def test_demo_model_answers_facts(demo_handle):
    factbase = load_factbase()
    sample = factbase.facts[::50]
    prompts = [factbase.relations[f.relation].train_templates[0].replace("{}", f.subject) for f in sample]
    preds = top_predictions(demo_handle, prompts, k=1)
    firsts = [f.object.split()[0] for f in sample]
    correct = sum(p[0].token == first for p, first in zip(preds, firsts, strict=True))
    assert correct / len(sample) >= 0.9


def test_tokenizer_is_deterministic_and_word_level():
    factbase, corpus = load_factbase(), load_corpus()
    a, b = build_tokenizer(factbase, corpus), build_tokenizer(factbase, corpus)
    assert a.get_vocab() == b.get_vocab()
    assert a.tokenize("The Eiffel Tower is located in") == ["The", "Eiffel", "Tower", "is", "located", "in"]


def test_fact_base_shape():
    factbase = load_factbase()
    assert len(factbase.subjects) >= 400 and len(factbase.relations) >= 10
    assert any(len(s.split()) >= 2 for s in factbase.subjects)
    for rel in factbase.relations.values():
        assert rel.heldout_templates and set(rel.heldout_templates).isdisjoint(rel.train_templates)
    assert any(factbase.chains(s) for s in factbase.subjects[:200])
