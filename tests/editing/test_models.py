"""ArchSpec resolution and model loading."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from editing.core.edit import float_masters
from editing.core.request import EditRequest
from editing.methods import get_method
from editing.models import loader as models
from editing.models.arch import UnsupportedArchitecture, arch_for
from editing.models.loader import ModelNotFound, check_placement, handle_from_model, load_model, main_device, pick_dtype
from editing.models.tiny import demo_tokenizer, tiny_model
from tests.helpers import assert_params_equal, params_snapshot, random_delta


def test_archspec_resolves_every_module(tiny_handle):
    arch, model = tiny_handle.arch, tiny_handle.model
    assert arch.n_layers(model) == 4
    for layer in range(arch.n_layers(model)):
        block = arch.block(model, layer)
        for part in (arch.mlp, arch.mlp_out, arch.attn, arch.attn_out, *arch.mlp_in):
            assert isinstance(tiny_handle.module(arch.module_name(layer, part)), torch.nn.Module)
        assert block is tiny_handle.module(arch.block_name(layer))
    for name in (arch.embed, arch.final_norm, arch.lm_head):
        assert isinstance(tiny_handle.module(name), torch.nn.Module)


def test_mlp_out_weight_is_out_by_in_view(tiny_handle):
    weight = tiny_handle.arch.mlp_out_weight(tiny_handle.model, 1)
    assert weight.shape == (tiny_handle.d_model, tiny_handle.d_ff)
    # it is a view: writing through it changes the model
    with torch.no_grad():
        weight[0, 0] = 123.0
    assert tiny_handle.arch.mlp_out_weight(tiny_handle.model, 1)[0, 0] == 123.0


def test_conv1d_flag_matches_storage(tiny_handle):
    module = tiny_handle.module(tiny_handle.arch.mlp_out_name(0))
    stored = tuple(module.weight.shape)
    if tiny_handle.arch.conv1d:
        assert stored == (tiny_handle.d_ff, tiny_handle.d_model)
    else:
        assert stored == (tiny_handle.d_model, tiny_handle.d_ff)


def test_handle_is_frozen_and_right_padded(tiny_handle):
    assert all(not p.requires_grad for p in tiny_handle.model.parameters())
    assert tiny_handle.tokenizer.padding_side == "right"
    assert tiny_handle.tokenizer.pad_token_id is not None


def test_unsupported_architecture_names_supported_families():
    tok = demo_tokenizer()
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedArchitecture, match="GPT-2, GPT-J, GPT-NeoX"):
        arch_for(bert)
    with pytest.raises(UnsupportedArchitecture):
        handle_from_model(bert, tok, "bert")


def test_missing_model_fails_clearly(tmp_path):
    with pytest.raises(ModelNotFound, match="local cache"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelNotFound):
        load_model("   ")


def test_load_model_from_local_directory(tmp_path, tiny_handle):
    tiny_handle.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_handle.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.arch.family == tiny_handle.arch.family
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny_handle.model(ids).logits, atol=1e-5)


def test_local_directory_with_unsupported_model(tmp_path):
    tok = demo_tokenizer()
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="'bert'"):
        load_model(str(tmp_path))


def test_dtype_is_float32_on_cpu_and_half_precision_by_default_on_a_gpu(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert pick_dtype(cpu) == pick_dtype(cpu, "bfloat16") == torch.float32
    monkeypatch.setattr(models, "_bf16_supported", lambda: True)
    assert pick_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(models, "_bf16_supported", lambda: False)  # pre-Ampere cards
    assert pick_dtype(cuda) == torch.float16 and pick_dtype(mps) == torch.float16
    assert pick_dtype(cuda, "float32") == torch.float32 and pick_dtype(cuda, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        pick_dtype(cuda, "float8")


def test_main_device_of_a_device_map():
    assert main_device({"": "cpu"}) == torch.device("cpu")
    assert main_device({"model.embed": "cpu", "model.layers": 1}) == torch.device("cuda", 1)
    assert main_device({"a": "cpu", "b": "cuda:1", "c": "disk"}) == torch.device("cuda", 1)
    assert main_device("auto") == models.pick_device(None)  # the CPU on this machine


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"])
def test_load_with_a_device_map_then_edit_and_revert_exactly(tmp_path, device_map):
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    handle = load_model(str(tmp_path), device_map=device_map)  # "auto" resolves to the CPU here
    assert handle.devices == [torch.device("cpu")] and handle.dtype == torch.float32
    before = params_snapshot(handle)
    edit = random_delta(handle, rank=2)
    edit.apply(handle)
    assert not all(torch.equal(p, before[n]) for n, p in handle.model.named_parameters())
    edit.revert(handle)
    assert_params_equal(handle, before)
    request = EditRequest("The capital of {} is", "France", "Rome", "Paris")
    edit = get_method("FT-L").apply(handle, [request], {"steps": 3})
    edit.revert(handle)
    assert_params_equal(handle, before)
    assert float_masters(handle) == {}


def test_offloaded_weights_are_refused():
    """accelerate keeps weights it offloads (to CPU beside a GPU, or to disk) on the meta device:
    edits could not write them."""
    handle = tiny_model("gpt2")
    check_placement(handle.model, "tiny")  # all on a device: fine
    handle.model.transformer.h[3].mlp.to("meta")
    with pytest.raises(ValueError, match=r"offloads weights \(transformer\.h\.3\.mlp\.c_fc"):
        check_placement(handle.model, "tiny")


def test_on_cuda_the_model_loads_straight_onto_the_gpu_in_half_precision(tmp_path, monkeypatch):
    """No GPU here: the loader is spied on to check what a CUDA machine would ask transformers for."""
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    calls = []

    def spy(source, **kwargs):
        calls.append(kwargs)
        return tiny.model

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(models, "pick_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(models.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(models, "_bf16_supported", lambda: True)
    load_model(str(tmp_path))
    assert calls[-1]["device_map"] == {"": 0} and calls[-1]["dtype"] == torch.bfloat16
    load_model(str(tmp_path), device_map="auto", max_memory={0: "20GiB", 1: "20GiB"}, dtype="float16")
    assert calls[-1]["device_map"] == "auto" and calls[-1]["max_memory"] == {0: "20GiB", 1: "20GiB"}
    assert calls[-1]["dtype"] == torch.float16
