"""Bad input to the editing core is refused once, in the shared path, before any work (issue 13).

Targets the demo's word-level vocabulary cannot spell, broken text, malformed request dicts, wrong
argument types, equal targets, and hyper-parameters outside their allowed range (every method,
every field, through the one declarative ``HParams.validate``).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from editing.core.edit import handle_stack
from editing.core.request import EditRequest, InvalidEditRequest
from editing.core.session import EditSession
from editing.methods import InvalidHParams, available_methods, get_method, method_class
from editing.methods.base import HParams, check_spelled
from editing.models.tiny import tiny_model
from editing.models.tokens import unknown_words
from tests.helpers import assert_params_equal, params_snapshot

CAPITAL = "The capital of {} is"
REQ = EditRequest(CAPITAL, "France", "Berlin")


@pytest.fixture
def no_work(monkeypatch):
    """Make every method's computation fail loudly: a refusal must come before it."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the method computed before the input was checked")

    for name in available_methods():
        monkeypatch.setattr(method_class(name), "_execute", forbidden)


# -- targets the tokenizer cannot spell -----------------------------------------------------------
UNSPELLABLE = ["Zürich", "東京", "🗼", "france", "qwertyuiop"]


@pytest.mark.parametrize("method", ["ROME", "FT-L", "GRACE"])
@pytest.mark.parametrize("target", UNSPELLABLE)
def test_a_target_the_vocabulary_cannot_spell_is_refused_naming_the_word(demo, no_work, method, target):
    session = EditSession(demo)
    with pytest.raises(InvalidEditRequest, match="vocabulary does not know") as info:
        session.apply(method, EditRequest("The Eiffel Tower is located in", "Eiffel Tower", target))
    assert repr(target) in str(info.value) and "<unk>" in str(info.value)
    assert session.edits == () and not handle_stack(demo)


def test_only_the_unknown_words_are_named_and_the_true_target_is_checked_too(demo, no_work):
    with pytest.raises(InvalidEditRequest) as info:
        get_method("ROME").apply(demo, [EditRequest(CAPITAL, "France", "New Zürich 東京 York")])
    message = str(info.value)
    assert "'Zürich', '東京'" in message and "'New'" not in message and "'York'" not in message
    with pytest.raises(InvalidEditRequest, match="true target 'Pariss'"):
        get_method("ROME").apply(demo, [EditRequest(CAPITAL, "France", "Berlin", "Pariss")])
    assert unknown_words(demo.tokenizer, "New York , Paris .") == []  # known words, punctuation


def test_byte_level_tokenizers_spell_everything():
    """A byte-level BPE (GPT-2, SmolLM2: its unk token is <|endoftext|>) never writes an unknown token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(["The capital of France is Paris."], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert tokenizer.unk_token_id is not None
    for target in UNSPELLABLE:
        assert unknown_words(tokenizer, target) == []
        check_spelled(SimpleNamespace(tokenizer=tokenizer), [EditRequest(CAPITAL, "France", target)])


# -- edit requests --------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "subject", "target_new", "target_true"])
def test_a_lone_surrogate_is_refused_when_the_request_is_built(field):
    values = {"prompt": CAPITAL, "subject": "France", "target_new": "Italy", "target_true": "Paris"}
    values[field] = "Ita\ud800ly" if field != "prompt" else "The capital \ud800of {} is"
    with pytest.raises(InvalidEditRequest, match="lone surrogate, U\\+D800"):
        EditRequest(**values)


@pytest.mark.parametrize("missing", ["prompt", "subject", "target_new"])
def test_from_dict_names_a_missing_field(missing):
    data = {"prompt": CAPITAL, "subject": "France", "target_new": "Italy"}
    del data[missing]
    with pytest.raises(InvalidEditRequest, match=f"lacks the field {missing}"):
        EditRequest.from_dict(data)
    with pytest.raises(InvalidEditRequest, match="mapping"):
        EditRequest.from_dict(["prompt", "subject"])  # type: ignore[arg-type]
    assert EditRequest.from_dict({"prompt": CAPITAL, "subject": "France", "target_new": "Italy"}).target_true is None


@pytest.mark.parametrize("new, true", [("paris", "Paris"), (" PARIS ", "Paris"), ("New  York", "new york"),
                                       ("new\tYORK", "New York")])
def test_a_new_target_equal_to_the_true_one_up_to_case_and_spacing_is_refused(new, true):
    with pytest.raises(InvalidEditRequest, match="nothing would change"):
        EditRequest(CAPITAL, "France", new, true)
    assert EditRequest(CAPITAL, "France", "Parisian", "Paris").target_new == "Parisian"  # a real change


@pytest.mark.parametrize("bad", [None, 5, 2.5])
def test_apply_with_a_wrong_method_or_requests_type_is_a_type_error(bad):
    handle = tiny_model("gpt2")
    session = EditSession(handle)
    with pytest.raises(TypeError, match="method must be a method name"):
        session.apply(bad, REQ)
    with pytest.raises(TypeError, match="Edit requests must be an EditRequest"):
        session.apply("ROME", bad)
    with pytest.raises(TypeError, match="Edit requests must be an EditRequest"):
        get_method("ROME").apply(handle, bad)
    assert session.edits == () and not handle_stack(handle)


def test_requests_of_the_wrong_kind_are_type_errors():
    session = EditSession(tiny_model("gpt2"))
    for bad in ("The capital of France is", {"prompt": CAPITAL}, [REQ, "Berlin"], [REQ.to_dict()]):
        with pytest.raises(TypeError, match="Edit requests must be"):
            session.apply("FT-L", bad)
    assert session.edits == ()


# -- hyper-parameters -----------------------------------------------------------------------------
#: (method, changes, words the message must contain) — each once accepted or a raw crash
BAD_HPARAMS = [
    ("ROME", {"layer": 99}, ("layer", "from 0 to 3")),
    ("ROME", {"layer": -1}, ("layer", "from 0 to 3")),
    ("ROME", {"layer": 1.5}, ("layer", "whole number")),
    ("ROME", {"layer": "0"}, ("layer", "got '0'")),
    ("ROME", {"clamp_norm_factor": math.nan}, ("clamp_norm_factor", "> 0")),
    ("ROME", {"context_template_length_params": [[10**6, 1]]}, ("context_template_length_params[0][0] (tokens)",
                                                                "from 1 to 64")),
    ("ROME", {"context_template_length_params": [[-1, 5]]}, ("context_template_length_params[0][0]",)),
    ("ROME", {"context_template_length_params": [[5, 0]]}, ("[0][1] (count)",)),
    ("MEMIT", {"layers": []}, ("layers", "non-empty list")),
    ("MEMIT", {"mom2_update_weight": -1e9}, ("mom2_update_weight", "> 0")),
    ("AlphaEdit", {"layers": [4]}, ("layers[0]", "from 0 to 3")),
    ("IKE", {"reserve_tokens": -100}, ("reserve_tokens", "from 1 to 64")),
    ("IKE", {"k": -1}, ("k", "from 1 to 256")),
    ("IKE", {"k": 10**6}, ("k", "from 1 to 256")),
    ("SERAC", {"threshold": math.nan}, ("threshold", "[0, 1)")),
    ("SERAC", {"threshold": 1.0}, ("threshold", "[0, 1)")),
    ("FT", {"layers": (1, 1)}, ("layers", "without repeats")),
    ("FT-M", {"steps": True}, ("steps", "got True")),
    ("KN", {"min_neurons": 6, "max_neurons": 5}, ("min_neurons", "max_neurons")),
    ("T-Patcher", {"memory_margin": 1.0}, ("memory_margin", "act_margin")),
    ("GRACE", {"value_init": "hot"}, ("value_init", "'warm', 'cold'")),
    ("MEND", {"lr_scale": math.inf}, ("lr_scale",)),
]


@pytest.mark.parametrize("method, changes, phrases", BAD_HPARAMS, ids=[f"{m}-{sorted(c)[0]}-{i}" for i, (m, c, _)
                                                                      in enumerate(BAD_HPARAMS)])
def test_bad_hyper_parameters_are_refused_before_any_work(method, changes, phrases, no_work):
    handle = tiny_model("gpt2")  # 4 layers, 128 positions
    before = params_snapshot(handle)
    session = EditSession(handle)
    with pytest.raises(InvalidHParams) as info:
        session.apply(method, REQ, changes)
    for phrase in phrases:
        assert phrase in str(info.value), str(info.value)
    assert session.edits == () and not handle_stack(handle)
    assert_params_equal(handle, before)


def test_layers_are_checked_against_the_loaded_model(demo, no_work):
    with pytest.raises(InvalidHParams, match="from 0 to 3"):
        get_method("ROME").apply(demo, [REQ], {"layer": 4})  # the demo model has 4 layers
    deep = tiny_model("llama", n_layers=6)
    assert get_method("ROME").default_hparams(deep).replace(layer=5).validate(deep) is None
    with pytest.raises(InvalidHParams, match="from 0 to 5"):
        get_method("ROME").default_hparams(deep).replace(layer=6).validate(deep)


@pytest.mark.parametrize("method", available_methods())
def test_every_field_of_every_method_declares_its_check_and_defaults_pass(method, demo_handle):
    cls = get_method(method).hparams_class
    declared: dict = {}
    for klass in reversed(cls.__mro__):
        declared.update(vars(klass).get("checks", {}))
    names = [spec.name for spec in dataclasses.fields(cls)]
    assert sorted(declared) == sorted(names), f"{method}: fields without a declared check or checks without a field"
    for handle in (tiny_model("gpt2"), tiny_model("qwen2"), demo_handle):
        get_method(method).default_hparams(handle).validate(handle)  # valid input stays valid
        get_method(method).default_hparams(handle).validate()  # without a model: its bounds are skipped


@pytest.mark.parametrize("method", available_methods())
def test_every_field_refuses_a_value_of_the_wrong_kind_naming_the_field(method):
    handle = tiny_model("gpt2")
    defaults = get_method(method).default_hparams(handle)
    for spec in dataclasses.fields(defaults):
        for bad in (object(), math.nan):
            with pytest.raises(InvalidHParams, match=f"Hyper-parameter {spec.name}\\b.* must be"):
                defaults.replace(**{spec.name: bad}).validate(handle)


def test_pushed_ike_edit_with_a_negative_reserve_cannot_happen(demo):
    session = EditSession(demo)
    with pytest.raises(InvalidHParams, match="reserve_tokens"):
        session.apply("IKE", EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome"),
                      {"reserve_tokens": -100, "encoder": "model"})
    assert session.edits == ()


@dataclasses.dataclass
class _Plain(HParams):
    """A method's settings with no declared checks: the field types still are checked."""

    layer: int = 0
    strength: float = 1.0
    cap: float | None = None
    name: str = "x"
    on: bool = True


def test_fields_without_a_declared_check_are_checked_by_their_type():
    _Plain().validate()
    for changes in ({"layer": "0"}, {"layer": 1.5}, {"strength": math.nan}, {"strength": "1"}, {"cap": math.inf},
                    {"name": 3}, {"on": 1}):
        with pytest.raises(InvalidHParams, match=f"Hyper-parameter {next(iter(changes))} must be"):
            _Plain(**changes).validate()
    _Plain(layer=7, strength=2, cap=None).validate()  # an int is a fine float; no model, no layer bound
