"""Tiny random models of every supported family, built from configs (no download).

Used by the tests and the benchmark to check that every method runs on every architecture.
They share the demo tokenizer (word-level over the fact base), so fact prompts tokenise.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from editing.models.loader import ModelHandle, handle_from_model
from editing.storage.factbase import load_corpus, load_factbase

TINY_FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")


@lru_cache(maxsize=1)
def demo_tokenizer() -> PreTrainedTokenizerFast:
    """The demo model's tokenizer, built from the bundled data (no training needed)."""
    from editing.models.demo import build_tokenizer

    return build_tokenizer(load_factbase(), load_corpus())


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, d_model: int = 64) -> PretrainedConfig:
    heads = 4
    common_llama = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                        max_position_embeddings=128, tie_word_embeddings=False)
    configs = {
        "gpt2": lambda: GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=d_model, n_layer=n_layers,
                                   n_head=heads),
        "gptj": lambda: GPTJConfig(vocab_size=vocab_size, n_positions=128, n_embd=d_model, n_layer=n_layers,
                                   n_head=heads, rotary_dim=8),
        "gpt_neox": lambda: GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                                          num_hidden_layers=n_layers, num_attention_heads=heads,
                                          max_position_embeddings=128),
        "llama": lambda: LlamaConfig(**common_llama),
        "mistral": lambda: MistralConfig(**common_llama),
        "qwen2": lambda: Qwen2Config(**common_llama),
    }
    if family not in configs:
        raise ValueError(f"No tiny config for {family!r}; choose from {TINY_FAMILIES}.")
    return configs[family]()


def tiny_model(family: str, seed: int = 0, n_layers: int = 4, d_model: int = 64) -> ModelHandle:
    """A randomly initialised model of ``family`` with the demo tokenizer, in a fresh handle."""
    tokenizer = demo_tokenizer()
    config = tiny_config(family, len(tokenizer), n_layers, d_model)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    return handle_from_model(model, tokenizer, name=f"tiny-{family}")
