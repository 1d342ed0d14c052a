"""ArchSpec resolution and model loading."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from editing.arch import UnsupportedArchitecture, arch_for
from editing.models import ModelNotFound, handle_from_model, load_model
from editing.tiny import demo_tokenizer


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
