"""Per-model preset files (editing/methods/presets): the shipped files reproduce the presets that
used to live in code, a user's folder overrides them, and a bad file is refused by name."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import pytest

from editing.analysis.stats import corpus_defaults
from editing.methods import get_method
from editing.methods.alphaedit import SHALLOW_L2, AlphaEditHyperParams
from editing.methods.base import scaled_layer
from editing.methods.checks import InvalidHParams
from editing.methods.ft import FTHParams, FTLHParams, FTMHParams
from editing.methods.grace import GRACEHParams
from editing.methods.memit import MEMIT_PRESETS, MEMITHyperParams, deep_lambda, memit_layers, shallow_settings
from editing.methods.presets import PRESETS_ENV, SHIPPED_DIR, method_presets, model_key, read_preset
from editing.methods.presets.__main__ import main as presets_main
from editing.methods.rome import ROME_DEPTH_FRACTION, ROME_PRESETS, ROMEHyperParams, is_shallow
from editing.models.tiny import TINY_FAMILIES, tiny_model
from eval.cli import hparams_arg
from eval.cli import main as cli_main

# -- the presets as they were in code before they moved to files (issue #15) ----------------------
OLD_ROME = {("gpt2", 48, 1600): {"layer": 17}, ("gptj", 28, 4096): {"layer": 5}}
OLD_MEMIT = {
    ("gpt2", 48, 1600): {"layers": [13, 14, 15, 16, 17], "mom2_update_weight": 20000.0},
    ("gptj", 28, 4096): {"layers": [3, 4, 5, 6, 7, 8], "v_num_grad_steps": 25, "mom2_update_weight": 15000.0},
}
#: (family, n_layers, d_model): (ε, lr)
OLD_FT_L = {("gpt2", 24, 1024): (2e-3, 5e-4), ("gpt2", 36, 1280): (1e-3, 5e-4), ("gpt2", 48, 1600): (5e-4, 5e-4),
            ("gptj", 28, 4096): (5e-5, 5e-4)}


def old_rome(h: Any) -> ROMEHyperParams:
    corpus, preset = corpus_defaults(h), OLD_ROME.get(model_key(h))
    if preset is not None:
        return ROMEHyperParams(**preset, **corpus)
    if is_shallow(h):
        return ROMEHyperParams(layer=0, fact_token="last", **corpus)
    return ROMEHyperParams(layer=scaled_layer(h.n_layers, ROME_DEPTH_FRACTION), **corpus)


def old_memit(h: Any) -> MEMITHyperParams:
    corpus, preset = corpus_defaults(h), OLD_MEMIT.get(model_key(h))
    if preset is not None:
        return MEMITHyperParams(**preset, **corpus)
    settings = shallow_settings(h) or {"mom2_update_weight": float(deep_lambda(h))}
    return MEMITHyperParams(layers=memit_layers(h.n_layers), **settings, **corpus)


def old_alphaedit(h: Any) -> AlphaEditHyperParams:
    corpus, preset = corpus_defaults(h), OLD_MEMIT.get(model_key(h))
    if preset is not None:
        return AlphaEditHyperParams(**preset, **corpus)
    shallow = shallow_settings(h)
    settings = shallow | corpus
    if shallow:
        settings["L2"] = SHALLOW_L2
    return AlphaEditHyperParams(layers=memit_layers(h.n_layers), **settings)


def old_ft_l(cls: type[FTLHParams], h: Any) -> FTLHParams:
    layer = scaled_layer(h.n_layers, cls.layer_fraction)
    preset = OLD_FT_L.get((h.arch.family, h.n_layers, h.d_model))
    if preset is not None:
        eps, lr = preset
    else:
        weight = h.arch.mlp_out_weight(h.model, layer).detach().float()
        n_params = sum(p.numel() for p in h.model.parameters())
        eps = float(f"{min(cls.norm_fraction * float(weight.pow(2).mean().sqrt()), cls.size_coef / n_params):.2g}")
        lr = eps
    return cls(layers=(layer,), norm_constraint=eps, lr=lr)


OLD = {
    "ROME": (ROMEHyperParams, old_rome),
    "MEMIT": (MEMITHyperParams, old_memit),
    "AlphaEdit": (AlphaEditHyperParams, old_alphaedit),
    "FT": (FTHParams, lambda h: FTHParams(layers=(scaled_layer(h.n_layers, 0.5),))),
    "FT-L": (FTLHParams, lambda h: old_ft_l(FTLHParams, h)),
    "FT-M": (FTMHParams, lambda h: old_ft_l(FTMHParams, h)),
}


class Keyed:
    """A tiny model's handle that reports a large model's shape (GPT-2 XL cannot be built in a test):
    presets and depth rules read only the key, the width and whether the vocabulary is open."""

    def __init__(self, base: Any, n_layers: int, d_model: int, open_text: bool, d_ff: int | None = None) -> None:
        self._base, self.n_layers, self.d_model = base, n_layers, d_model
        self.d_ff = d_ff if d_ff is not None else base.d_ff
        if open_text:  # a tokenizer without an unknown token spells any text: statistics from prose
            self.tokenizer = types.SimpleNamespace(unk_token_id=None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def keyed_handles() -> dict[str, Any]:
    gpt2, gptj, llama = tiny_model("gpt2"), tiny_model("gptj"), tiny_model("llama")
    found: dict[str, Any] = {"smollm2-shape": Keyed(llama, 30, 576, True, d_ff=1536)}
    for open_text in (False, True):
        tag = "-open" if open_text else ""
        found |= {f"gpt2-xl{tag}": Keyed(gpt2, 48, 1600, open_text),
                  f"gpt2-medium{tag}": Keyed(gpt2, 24, 1024, open_text),
                  f"gpt2-large{tag}": Keyed(gpt2, 36, 1280, open_text),
                  f"gpt-j{tag}": Keyed(gptj, 28, 4096, open_text)}
    return found


@pytest.fixture(autouse=True)
def no_user_presets(monkeypatch):
    """The shipped presets only, unless a test sets a folder of its own."""
    monkeypatch.delenv(PRESETS_ENV, raising=False)


def test_for_model_is_unchanged_by_the_move_to_files(demo_handle):
    handles = {"demo": demo_handle, **{f"tiny-{f}": tiny_model(f) for f in TINY_FAMILIES},
               "tiny-llama-12": tiny_model("llama", n_layers=12, d_model=32), **keyed_handles()}
    for name, handle in handles.items():
        for method, (cls, old) in OLD.items():
            # repr: the same values *and* types (a tuple stays a tuple, 20000.0 a float)
            assert repr(cls.for_model(handle)) == repr(old(handle)), (name, method)
            assert repr(get_method(method).default_hparams(handle)) == repr(old(handle)), (name, method)


def test_values_that_other_code_relies_on(demo_handle):
    keyed = keyed_handles()
    assert (ROMEHyperParams.for_model(demo_handle).layer, ROMEHyperParams.for_model(demo_handle).fact_token) == \
        (0, "last")
    assert ROMEHyperParams.for_model(keyed["gpt2-xl"]).layer == 17
    assert ROMEHyperParams.for_model(keyed["gpt-j-open"]).layer == 5
    assert ROMEHyperParams.for_model(keyed["gpt-j-open"]).mom2_corpus == "prose"
    assert ROMEHyperParams.for_model(keyed["smollm2-shape"]).layer == 11
    memit = MEMITHyperParams.for_model(keyed["gpt-j"])
    assert (memit.layers, memit.v_num_grad_steps, memit.mom2_update_weight) == ([3, 4, 5, 6, 7, 8], 25, 15000.0)
    assert MEMITHyperParams.for_model(keyed["smollm2-shape"]).mom2_update_weight == 1406
    assert MEMITHyperParams.for_model(keyed["smollm2-shape"]).layers == [8, 9, 10, 11]
    assert AlphaEditHyperParams.for_model(keyed["gpt2-xl"]).mom2_update_weight == 20000.0
    ftm = FTMHParams.for_model(keyed["gpt2-medium"])
    assert (ftm.norm_constraint, ftm.lr, ftm.objective) == (2e-3, 5e-4, "target_new")


def test_the_module_level_tables_come_from_the_shipped_files():
    assert ROME_PRESETS == OLD_ROME
    assert MEMIT_PRESETS == OLD_MEMIT


def test_every_shipped_file_names_its_model_and_reference_and_is_valid():
    folders = [p for p in SHIPPED_DIR.iterdir() if p.is_dir() and not p.name.startswith("__")]
    assert {p.name for p in folders} == {"ROME", "MEMIT", "FT-L"}
    classes = {"ROME": ROMEHyperParams, "MEMIT": MEMITHyperParams, "FT-L": FTLHParams}
    for folder in folders:
        for path in folder.glob("*.json"):
            data = json.loads(path.read_text())
            assert data["method"] == folder.name and data["model"] and data["reference"], path
            preset = read_preset(path, folder.name, shipped=True)
            preset.check(classes[folder.name], None)
        assert method_presets(folder.name, classes[folder.name])
    ft_l = {key: (v["norm_constraint"], v["lr"]) for key, v in
            ((k, dict(p.hparams)) for k, p in method_presets("FT-L").items())}
    assert ft_l == OLD_FT_L


# -- overrides ------------------------------------------------------------------------------------
def write_preset(root: Path, method: str, name: str, key: tuple[str, int, int], hparams: dict[str, Any],
                 **extra: Any) -> Path:
    folder = root / method
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    data = {"method": method, "model": name,
            "applies_to": {"model_type": key[0], "n_layers": key[1], "d_model": key[2]}, "hparams": hparams, **extra}
    path.write_text(json.dumps(data))
    return path


TINY_KEY = ("gpt2", 4, 64)  # tiny_model("gpt2")


def test_a_user_preset_sets_its_fields_and_the_rest_follow_the_rules(tmp_path, monkeypatch):
    handle = tiny_model("gpt2")
    write_preset(tmp_path, "ROME", "tiny", TINY_KEY, {"layer": 2, "v_lr": 0.25})
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    hp = ROMEHyperParams.for_model(handle)
    assert (hp.layer, hp.v_lr, hp.fact_token) == (2, 0.25, "last")  # fact_token: the shallow-model rule
    # an explicit hyper-parameter still wins over the preset
    assert get_method("ROME").resolve_hparams(handle, {"layer": 1}).layer == 1
    # another model is not touched
    assert ROMEHyperParams.for_model(tiny_model("gptj")).layer == 0


def test_a_user_file_replaces_the_shipped_file_for_the_same_model(tmp_path, monkeypatch):
    gpt2_xl = keyed_handles()["gpt2-xl"]
    write_preset(tmp_path, "MEMIT", "my-gpt2-xl", ("gpt2", 48, 1600), {"layers": [10, 11]})
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    hp = MEMITHyperParams.for_model(gpt2_xl)
    # the whole shipped file is replaced: λ is the rule's again, not the reference's 20,000
    assert (hp.layers, hp.mom2_update_weight) == ([10, 11], float(deep_lambda(gpt2_xl)))
    assert MEMITHyperParams.for_model(keyed_handles()["gpt-j"]).layers == [3, 4, 5, 6, 7, 8]  # shipped still
    # AlphaEdit reads MEMIT's presets after its own
    assert AlphaEditHyperParams.for_model(gpt2_xl).layers == [10, 11]
    write_preset(tmp_path, "AlphaEdit", "gpt2-xl", ("gpt2", 48, 1600), {"layers": [12], "L2": 5})
    alpha = AlphaEditHyperParams.for_model(gpt2_xl)
    assert (alpha.layers, alpha.L2) == ([12], 5.0) and isinstance(alpha.L2, float)
    assert MEMITHyperParams.for_model(gpt2_xl).layers == [10, 11]


def test_fallbacks_precedence_between_folders_and_fresh_copies(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    write_preset(first, "FT-L", "tiny", TINY_KEY, {"norm_constraint": 0.003, "lr": 0.002, "layers": [1]})
    write_preset(second, "FT-L", "tiny", TINY_KEY, {"norm_constraint": 0.1})
    monkeypatch.setenv(PRESETS_ENV, os.pathsep.join([str(first), str(second)]))
    handle = tiny_model("gpt2")
    ftm = FTMHParams.for_model(handle)  # FT-M falls back to FT-L's presets
    assert (ftm.norm_constraint, ftm.lr, ftm.layers, ftm.objective) == (0.003, 0.002, (1,), "target_new")
    # values handed out are copies: changing one does not change the next
    hp = MEMITHyperParams.for_model(keyed_handles()["gpt2-xl"])
    hp.layers.append(99)
    assert MEMITHyperParams.for_model(keyed_handles()["gpt2-xl"]).layers == [13, 14, 15, 16, 17]
    # an edited file is read again
    write_preset(first, "FT-L", "tiny", TINY_KEY, {"norm_constraint": 0.004, "lr": 0.004, "steps": 3})
    assert FTLHParams.for_model(handle).steps == 3


def test_methods_that_derive_defaults_in_for_model_read_presets_too(tmp_path, monkeypatch):
    handle = tiny_model("gpt2")
    before = GRACEHParams.for_model(handle)
    write_preset(tmp_path, "GRACE", "tiny", TINY_KEY, {"layer": 1})
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    assert GRACEHParams.for_model(handle) == before.replace(layer=1)


# -- bad files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, phrases", [
    ("{not json", ("not valid JSON",)),
    ("[1, 2]", ("JSON object",)),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": 4, "d_model": 64}, "hparams": {}, "extra": 1}),
     ("unknown entry 'extra'",)),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": 4}, "hparams": {}}), ('"applies_to"',)),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": "4", "d_model": 64}, "hparams": {}}),
     ("applies_to.n_layers",)),
    (json.dumps({"method": "MEMIT", "applies_to": {"model_type": "gpt2", "n_layers": 4, "d_model": 64},
                 "hparams": {}}), ("'MEMIT'", "'ROME' folder")),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": 4, "d_model": 64}, "hparams": [1]}),
     ('"hparams"',)),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": 4, "d_model": 64}, "hparams": {"layr": 1}}),
     ("unknown hyper-parameter 'layr'",)),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": 4, "d_model": 64}, "hparams": {"v_lr": 0}}),
     ("v_lr", "> 0")),
    (json.dumps({"applies_to": {"model_type": "gpt2", "n_layers": 4, "d_model": 64},
                 "hparams": {"fact_token": "middle"}}), ("fact_token",)),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_field(tmp_path, monkeypatch, content, phrases):
    path = tmp_path / "ROME" / "broken.json"
    path.parent.mkdir()
    path.write_text(content)
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    with pytest.raises(InvalidHParams) as caught:
        ROMEHyperParams.for_model(tiny_model("gpt2"))
    message = str(caught.value)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_model_bounds_are_checked_when_the_preset_meets_its_model(tmp_path, monkeypatch):
    path = write_preset(tmp_path, "ROME", "tiny", TINY_KEY, {"layer": 9})
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    with pytest.raises(InvalidHParams, match="layer must be a whole number from 0 to 3") as caught:
        ROMEHyperParams.for_model(tiny_model("gpt2"))
    assert str(path) in str(caught.value)


def test_two_files_for_one_model_in_one_folder_are_refused(tmp_path, monkeypatch):
    write_preset(tmp_path, "ROME", "a", TINY_KEY, {"layer": 1})
    write_preset(tmp_path, "ROME", "b", TINY_KEY, {"layer": 2})
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    with pytest.raises(InvalidHParams, match="both apply to"):
        ROMEHyperParams.for_model(tiny_model("gpt2"))


# -- the command lines ----------------------------------------------------------------------------
def test_hparams_argument_reads_inline_json_a_file_or_a_preset_file(tmp_path):
    assert hparams_arg('{"layer": 1}') == {"layer": 1}
    plain = tmp_path / "hp.json"
    plain.write_text('{"layer": 2, "v_lr": 0.1}')
    assert hparams_arg(f"@{plain}") == {"layer": 2, "v_lr": 0.1}
    preset = write_preset(tmp_path, "ROME", "tiny", TINY_KEY, {"layer": 3})
    assert hparams_arg(f"@{preset}") == {"layer": 3}
    for text, phrase in ((f"@{tmp_path / 'missing.json'}", "cannot read it"), ("[1]", "JSON object"),
                         ("{oops", "not valid JSON")):
        with pytest.raises(ValueError, match=phrase):
            hparams_arg(text)


def test_a_bad_value_in_an_hparams_file_is_refused_by_the_cli(demo_handle, tmp_path, capsys):
    path = tmp_path / "hp.json"
    path.write_text('{"layer": 99}')
    status = cli_main(["run", "--method", "ROME", "--n", "2", "--hparams", f"@{path}",
                       "--store", str(tmp_path / "runs.sqlite"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "layer" in err and "from 0 to 3" in err, err


def test_show_the_effective_preset(demo_handle, capsys):
    assert presets_main(["ROME", "--model", "demo"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["preset"] is None and shown["hparams"] == ROMEHyperParams.for_model(demo_handle).to_dict()
    assert presets_main(["MEMIT"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(p["model"] for p in listed) == ["EleutherAI/gpt-j-6B", "gpt2-xl"]
    assert all(p["reference"] and p["source"] == "shipped" for p in listed)
    assert presets_main(["NoSuchMethod"]) == 2
