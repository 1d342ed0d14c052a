"""The bundled demo model: cached build, accuracy figures, determinism of the tokenizer."""

from __future__ import annotations

import json

from editing.demo import DemoConfig, build_tokenizer, demo_model_dir, ensure_demo_model
from editing.factbase import load_corpus, load_factbase
from editing.scoring import top_predictions


def test_build_is_cached_and_reports_accuracy(demo_handle):
    folder = ensure_demo_model()
    assert folder == demo_model_dir(DemoConfig())
    report = json.loads((folder / "report.json").read_text())
    assert report["train_first_token_accuracy"] >= 0.95
    assert report["heldout_first_token_accuracy"] >= 0.80
    # a second call finds the cache instead of rebuilding
    mtime = (folder / "report.json").stat().st_mtime
    assert ensure_demo_model() == folder and (folder / "report.json").stat().st_mtime == mtime


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
