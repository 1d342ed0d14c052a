"""Probability scoring, tokenisation conventions and hooks agree with a plain forward pass."""

from __future__ import annotations

import pytest
import torch

from editing.analysis.scoring import PromptTooLong, generate, score_targets, top_predictions
from editing.core.hooks import capture, forward_until, modify
from editing.models.tiny import tiny_model
from editing.models.tokens import encode, subject_last_token, target_ids


def test_target_ids_exclude_prompt_and_bos():
    handle = tiny_model("gpt2")
    tok = handle.tokenizer
    ids = target_ids(tok, "The capital of France is", "Paris")
    assert ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids


def test_subject_last_token_index():
    handle = tiny_model("gpt2")
    tok = handle.tokenizer
    index = subject_last_token(tok, "The {} is located in", "Eiffel Tower")
    ids = encode(tok, "The Eiffel Tower is located in")
    assert tok.convert_ids_to_tokens(ids[index]) == "Tower"


def test_score_targets_matches_unbatched_forward(tiny_handle):
    prompts = ["The capital of France is", "Paris is a city in", "The Eiffel Tower is in"]
    targets = ["Paris", "France", "United Kingdom"]
    scores = score_targets(tiny_handle, prompts, targets, batch_size=2)
    for prompt, target, score in zip(prompts, targets, scores, strict=True):
        p_ids = encode(tiny_handle.tokenizer, prompt)
        t_ids = target_ids(tiny_handle.tokenizer, prompt, target)
        with torch.no_grad():
            logits = tiny_handle.model(torch.tensor([p_ids + t_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected = torch.tensor([logp[len(p_ids) - 1 + i, t] for i, t in enumerate(t_ids)])
        assert torch.allclose(score.logprobs, expected, atol=1e-4)
        assert score.token_ids == t_ids
        assert score.hits.tolist() == [int(logits[len(p_ids) - 1 + i].argmax()) == t for i, t in enumerate(t_ids)]


def test_top_predictions_sorted_probabilities():
    handle = tiny_model("llama")
    preds = top_predictions(handle, ["The capital of France is", "Tokyo is in"], k=4)
    assert len(preds) == 2 and all(len(p) == 4 for p in preds)
    for row in preds:
        probs = [p.prob for p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def _greedy_without_cache(handle, prompt: str, n: int) -> str:
    ids, new = encode(handle.tokenizer, prompt), []
    for _ in range(n):
        logits = handle.model(input_ids=torch.tensor([ids + new])).logits
        token = int(logits[0, -1].argmax())
        if token == handle.tokenizer.eos_token_id:
            break
        new.append(token)
    return handle.tokenizer.decode(new).strip()


def test_cached_generation_equals_greedy_decoding_of_the_whole_prefix(tiny_handle):
    """The key/value-cached loop gives what recomputing the prefix each step gives, also with a
    per-position hook in the model (as module-patch edits add)."""
    prompts = ["The capital of France is", "Paris is"]
    got = generate(tiny_handle, prompts, max_new_tokens=5)
    assert got == [_greedy_without_cache(tiny_handle, p, 5) for p in prompts]
    shift = torch.randn(tiny_handle.d_model, generator=torch.Generator().manual_seed(0))
    module = tiny_handle.module(tiny_handle.arch.mlp_out_name(0))
    hook = module.register_forward_hook(lambda _m, _a, output: output + shift)
    try:
        hooked = generate(tiny_handle, prompts, max_new_tokens=5)
        assert hooked == [_greedy_without_cache(tiny_handle, p, 5) for p in prompts]
    finally:
        hook.remove()


def test_too_long_prompt_raises_clear_error():
    handle = tiny_model("gpt2")
    with pytest.raises(PromptTooLong, match="at most 128"):
        score_targets(handle, ["France " * 200], ["Paris"])


def test_capture_and_modify_hooks(tiny_handle):
    arch = tiny_handle.arch
    ids = torch.tensor([encode(tiny_handle.tokenizer, "The capital of France is")])
    name = arch.mlp_out_name(1)
    with capture(tiny_handle.model, [name], inputs=True) as keys, capture(tiny_handle.model, [name]) as outs:
        forward_until(tiny_handle.model, name, input_ids=ids)
    assert keys[name].shape[-1] == tiny_handle.d_ff and outs[name].shape[-1] == tiny_handle.d_model
    with torch.no_grad():
        base = tiny_handle.model(ids).logits
        with modify(tiny_handle.model, arch.mlp_name(1), lambda h: h * 0):
            zeroed = tiny_handle.model(ids).logits
        again = tiny_handle.model(ids).logits
    assert not torch.allclose(base, zeroed) and torch.equal(base, again)
