"""Causal tracing: the heatmap's invariants on every family, localisation on the demo model, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from editing.analysis.trace import (
    KINDS,
    TraceResult,
    causal_trace,
    default_window,
    embedding_noise_level,
    locate_subject,
    main,
    trace_all,
)


def test_trace_shapes_and_invariants_on_every_family(tiny_handle):
    results = trace_all(tiny_handle, "The capital of France is", "France", n_samples=3)
    assert set(results) == set(KINDS)
    for kind, result in results.items():
        assert result.kind == kind
        assert result.scores.shape == (len(result.tokens), tiny_handle.n_layers)
        assert torch.isfinite(result.scores).all() and (result.scores >= 0).all() and (result.scores <= 1).all()
        assert "".join(result.tokens[result.subject_range[0]: result.subject_range[1]]).strip() == "France"
        assert result.answer == results["block"].answer  # one answer for all kinds
    block = results["block"]
    # Tokens before the subject are never corrupted: restoring them changes nothing.
    assert torch.allclose(block.scores[: block.subject_range[0]], torch.tensor(block.low_score), atol=1e-6)
    # The whole residual stream at the last token of the last layer is the clean one.
    assert block.scores[-1, -1] == pytest.approx(block.base_score, abs=1e-6)


def test_subject_location_accepts_braces_or_verbatim_subject(demo_handle):
    text, ids, (start, end) = locate_subject(demo_handle, "The {} is located in", "Eiffel Tower")
    assert text == "The Eiffel Tower is located in"
    assert [demo_handle.tokenizer.decode([i]) for i in ids[start:end]] == ["Eiffel", "Tower"]
    assert locate_subject(demo_handle, text, "Eiffel Tower")[2] == (start, end)
    with pytest.raises(ValueError, match="does not occur"):
        locate_subject(demo_handle, text, "Louvre")
    with pytest.raises(ValueError, match="Unknown trace kind"):
        causal_trace(demo_handle, text, "Eiffel Tower", kind="heads")


DEMO_FACTS = [("The capital of {} is", "France"), ("{} is located in", "Eiffel Tower"),
              ("The official language of {} is", "Italy"), ("{} was founded by", "Microsoft")]


def test_corrupting_the_subject_destroys_recall_on_the_demo_model(demo):
    """Corrupting the subject destroys recall; restoring the last token's residual stream at any
    layer brings it back; restoring a token before the subject cannot change anything."""
    for prompt, subject in DEMO_FACTS[:3]:
        result = causal_trace(demo, prompt, subject, kind="block", n_samples=8)
        start, _end = result.subject_range
        assert result.base_score > 0.5, result.render()
        assert result.low_score < 0.5 * result.base_score, result.render()
        assert (result.scores[-1] > result.low_score + 0.8 * (result.base_score - result.low_score)).all()
        if start > 0:
            assert torch.allclose(result.scores[:start], torch.tensor(result.low_score), atol=1e-5)


def test_demo_model_recalls_facts_at_the_last_token_in_the_first_mlp(demo):
    """Where the demo model keeps its facts — the reason ROME/MEMIT edit it at the last token in
    the first layers (editing.methods.rome.SHALLOW_MAX_LAYERS): with a one-layer window, restoring
    the first MLP's output at the last token recovers most of P(answer), while restoring any MLP
    output at the subject's tokens recovers far less (unlike GPT-2 XL, where ROME finds the
    subject's last token in the middle layers)."""
    for prompt, subject in DEMO_FACTS:
        result = causal_trace(demo, prompt, subject, kind="mlp", window=1, n_samples=8)
        start, end = result.subject_range
        recovered = (result.scores - result.low_score) / (result.base_score - result.low_score)
        assert int(recovered[-1].argmax()) == 0, result.render()
        assert float(recovered[-1, 0]) > 0.8, result.render()
        assert float(recovered[start:end].max()) < 0.5 * float(recovered[-1, 0]), result.render()


def test_noise_default_is_three_embedding_stds(demo_handle):
    level = embedding_noise_level(demo_handle)
    assert 3 * 0.5 * float(demo_handle.model.transformer.wte.weight.std()) < level
    assert level < 3 * 2 * float(demo_handle.model.transformer.wte.weight.std())
    quiet = causal_trace(demo_handle, "The capital of France is", "France", noise=0.0, n_samples=2)
    assert quiet.low_score == pytest.approx(quiet.base_score, abs=1e-5)  # no noise, nothing lost


def test_cli_prints_heatmap_and_writes_json(demo_handle, tmp_path, capsys):
    out = tmp_path / "trace.json"
    code = main(["--model", "demo", "--prompt", "The Eiffel Tower is located in", "--subject", "Eiffel Tower",
                 "--kind", "mlp", "--samples", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "*Eiffel" in printed and "L3" in printed and "answer" in printed
    result = TraceResult.from_dict(json.loads(out.read_text()))
    assert result.kind == "mlp" and result.scores.shape == (len(result.tokens), 4)
    assert main(["--model", "demo", "--prompt", "The capital of France is", "--subject", "Spain"]) == 2


def test_the_default_window_scales_with_depth_and_is_recorded(demo):
    assert [default_window(n) for n in (1, 4, 12, 28, 48, 80)] == [1, 1, 3, 7, 10, 10]
    result = causal_trace(demo, "The capital of {} is", "France", kind="attn", n_samples=2)
    assert result.window == default_window(demo.n_layers) == 1
    assert TraceResult.from_dict(result.to_dict()).window == 1 and "window 1" in result.render()
    # ROME's 10 on the 4-layer demo model: every layer's window holds all layers, every column is equal
    wide = causal_trace(demo, "The capital of {} is", "France", kind="attn", n_samples=2, window=10)
    assert torch.allclose(wide.scores[:, 0], wide.scores[:, -1])
    assert not torch.allclose(result.scores[:, 0], result.scores[:, -1])
