"""Metrics on hand-computed cases, and batched scoring equal to one-prompt-at-a-time scoring."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from editing.analysis.scoring import TargetScore
from editing.core.session import EditSession
from editing.models.tiny import tiny_model
from eval.evaluate import predict
from eval.metrics import (
    METRIC_KEYS,
    agreement,
    counterfact_magnitude,
    counterfact_success,
    fluency,
    harmonic_mean,
    ngram_entropy,
    per_token_prob,
    summarize,
    teacher_forced_accuracy,
    tfidf_similarity,
    token_accuracy,
)
from eval.probes import Probe


def test_token_accuracy_is_the_share_of_argmax_hits():
    assert token_accuracy([True, False, True, True]) == 0.75
    assert token_accuracy(torch.tensor([True, True])) == 1.0
    assert math.isnan(token_accuracy([]))


def test_agreement_compares_argmax_tokens_position_by_position():
    assert agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert agreement([7], [7]) == 1.0
    assert agreement([1, 2], [1]) == 0.5  # a missing position disagrees
    assert math.isnan(agreement([], []))


def test_per_token_probability_is_the_geometric_mean():
    score = TargetScore([4, 5], torch.log(torch.tensor([0.5, 0.2])), torch.tensor([True, False]))
    assert per_token_prob(score) == pytest.approx(math.sqrt(0.1))
    assert score.prob == pytest.approx(0.1)


def test_counterfact_score_and_magnitude():
    p_new, p_true = [0.5, 0.2, 0.3, float("nan")], [0.1, 0.4, 0.3, 0.9]
    assert counterfact_success(p_new, p_true) == pytest.approx(1 / 3)  # a tie is no success; NaN skipped
    assert counterfact_magnitude(p_new, p_true) == pytest.approx((0.4 - 0.2 + 0.0) / 3)
    assert math.isnan(counterfact_success([], []))


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.5, float("nan")]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.0]) == 0.0
    assert math.isnan(harmonic_mean([float("nan")]))


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("word") == 0.0
    repetitive = "Paris Paris Paris Paris Paris Paris Paris Paris"
    varied = "Paris is the capital of France and a city on the Seine"
    assert fluency([repetitive]) < fluency([varied])
    assert fluency([repetitive, varied]) == pytest.approx((ngram_entropy(repetitive) + ngram_entropy(varied)) / 2)
    assert math.isnan(fluency([]))


def test_tfidf_similarity():
    assert tfidf_similarity(["the capital is Rome"], ["the capital is Rome"]) == pytest.approx(1.0)
    assert tfidf_similarity(["alpha beta"], ["gamma delta"]) == 0.0
    close = tfidf_similarity(["Rome is in Italy"], ["Italy has Rome as capital"])
    far = tfidf_similarity(["Rome is in Italy"], ["Berlin lies in Germany"])
    assert 0 < far < close < 1


def _row(kind, acc_before, acc_after, agree, answer_after=np.nan, contrast_after=np.nan,
         answer_before=np.nan, contrast_before=np.nan):
    return {"kind": kind, "acc_before": acc_before, "acc_after": acc_after, "agreement": agree,
            "pcf_answer_before": answer_before, "pcf_answer_after": answer_after,
            "pcf_contrast_before": contrast_before, "pcf_contrast_after": contrast_after}


def test_summarize_by_hand():
    table = pd.DataFrame([
        _row("reliability", 0.0, 1.0, 0.0, 0.6, 0.1, 0.1, 0.6),
        _row("generality", 0.0, 1.0, 0.0, 0.5, 0.2, 0.1, 0.5),
        _row("generality", 0.0, 0.5, 1.0, 0.1, 0.3, 0.1, 0.5),
        _row("locality", 1.0, 1.0, 1.0, 0.7, 0.2, 0.8, 0.1),  # answer = true, contrast = new
        _row("locality", 1.0, 0.0, 0.5, 0.2, 0.4, 0.8, 0.1),
        _row("unrelated", 1.0, 1.0, 0.25),
    ])
    m = summarize(table)
    assert list(m)[: len(METRIC_KEYS)] == list(METRIC_KEYS)
    assert m["reliability"] == 1.0 and m["generality"] == 0.75 and m["reliability_before"] == 0.0
    assert m["locality"] == 0.75 and m["unrelated"] == 0.25
    assert math.isnan(m["portability"]) and math.isnan(m["portability_score"])
    assert m["efficacy_score"] == 1.0 and m["efficacy_magnitude"] == pytest.approx(0.5)
    assert m["paraphrase_score"] == 0.5 and m["paraphrase_magnitude"] == pytest.approx((0.3 - 0.2) / 2)
    assert m["neighborhood_score"] == 0.5 and m["neighborhood_magnitude"] == pytest.approx((0.5 - 0.2) / 2)
    assert m["score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.5))
    assert m["efficacy_score_before"] == 0.0 and m["neighborhood_score_before"] == 1.0
    assert m["score_before"] == 0.0


def _scoped(kind, acc_before, acc_after, agree, subkind=None, answer_after=np.nan, contrast_after=np.nan):
    return {**_row(kind, acc_before, acc_after, agree, answer_after, contrast_after), "subkind": subkind}


def test_locality_over_known_neighbours_does_not_credit_facts_the_model_never_knew():
    """A neighbour answered "of" before and after agrees with itself: agreement scores it 1.0, but the model
    never knew the fact, so CounterFact-style locality leaves it out (and says how many neighbours are left)."""
    table = pd.DataFrame([
        _scoped("reliability", 0.0, 1.0, 0.0),
        _scoped("locality", 0.0, 0.0, 1.0, "neighbourhood"),  # never knew it, answered "of" both times
        _scoped("locality", 0.0, 0.0, 1.0, "neighbourhood"),
        _scoped("locality", 1.0, 0.0, 0.0, "neighbourhood"),  # knew it, the edit broke it
        _scoped("locality", 1.0, 1.0, 1.0, "relation-specificity"),  # knew it, kept it
        _scoped("unrelated", 1.0, 1.0, 1.0),
        _scoped("unrelated", 1.0, 0.5, 0.5),  # one of two answer tokens moved: the answer changed
        _scoped("unrelated", 0.0, 0.0, 1.0),
    ])
    m = summarize(table)
    assert m["locality"] == 0.75  # agreement, unchanged: the never-known neighbours count as kept
    assert m["locality_known"] == 0.5 and m["n_locality_known"] == 2 and m["n_locality"] == 4
    assert m["locality_same_relation"] == pytest.approx(2 / 3)  # the edit's relation, other subjects
    assert m["unrelated"] == pytest.approx(2.5 / 3)  # agreement, unchanged
    assert m["unrelated_unchanged"] == pytest.approx(2 / 3) and m["n_unrelated"] == 3
    nobody_known = summarize(table[(table["kind"] != "locality") | (table["acc_before"] < 1)])
    assert nobody_known["n_locality_known"] == 0 and math.isnan(nobody_known["locality_known"])


def test_efficacy_without_reliability_is_a_failed_edit():
    """FT-L after 50 edits: the new target beat the old one on 4 of 5 first edits (efficacy 0.8) while the
    model answered the new target on none (reliability 0.0). Edit success counts those as failures."""
    rows = [_scoped("reliability", 0.0, 0.0, 0.0, answer_after=0.2, contrast_after=0.1) for _ in range(4)]
    rows.append(_scoped("reliability", 0.0, 0.0, 0.0, answer_after=0.1, contrast_after=0.3))
    m = summarize(pd.DataFrame(rows))
    assert m["efficacy_score"] == pytest.approx(0.8) and m["reliability"] == 0.0
    assert m["edit_success"] == 0.0 and m["edit_success_before"] == 0.0
    assert m["n_efficacy_without_reliability"] == 4
    written = summarize(pd.DataFrame([_scoped("reliability", 0.0, 1.0, 0.0, answer_after=0.6, contrast_after=0.1),
                                      _scoped("reliability", 0.0, 0.5, 0.0, answer_after=0.6, contrast_after=0.1)]))
    # half a two-token target is 0.5 reliability but not an answer
    assert written["edit_success"] == 0.5 and written["n_efficacy_without_reliability"] == 1
    assert math.isnan(summarize(pd.DataFrame([_scoped("reliability", 0.0, 1.0, 0.0)]))[
        "n_efficacy_without_reliability"])  # nothing to compare (no true target): no count


def test_summarize_of_no_probes_is_all_nan():
    empty = pd.DataFrame(columns=["kind", "acc_before", "acc_after", "agreement", "pcf_answer_before",
                                  "pcf_answer_after", "pcf_contrast_before", "pcf_contrast_after"])
    assert all(math.isnan(v) for v in summarize(empty).values())


def test_batched_outcomes_equal_one_prompt_at_a_time():
    """Padding and batching do not change any per-probe number (no per-token loops needed)."""
    handle = tiny_model("llama")
    session = EditSession(handle)
    probes = [Probe(f"p{i}", prompt, answer, "reliability", contrast=contrast) for i, (prompt, answer, contrast) in
              enumerate([("The capital of France is", "Paris", "Rome"),
                         ("Eiffel Tower is a famous landmark in the country of", "France", "Italy"),
                         ("Tokyo is", "Japan", None)])]
    together = predict(session, probes, k=3)
    for probe, batched in zip(probes, together, strict=True):
        alone = predict(session, [probe], k=3)[0]
        assert alone.argmax_ids == batched.argmax_ids and alone.pred_id == batched.pred_id
        assert alone.answer_prob == pytest.approx(batched.answer_prob, rel=1e-4)
        assert alone.accuracy == batched.accuracy
        if probe.contrast:
            assert alone.pcf_contrast == pytest.approx(batched.pcf_contrast, rel=1e-4)
        else:
            assert math.isnan(batched.pcf_contrast)
    # the teacher-forced accuracy by hand: argmax at each answer position against the answer token
    prompt, answer = probes[1].prompt, probes[1].answer
    tok = handle.tokenizer
    ids = tok(prompt)["input_ids"]
    answer_ids = tok(f"{prompt} {answer}")["input_ids"][len(ids):]
    with torch.no_grad():
        logits = handle.model(torch.tensor([ids + answer_ids])).logits[0]
    hits = [int(logits[len(ids) - 1 + j].argmax()) == t for j, t in enumerate(answer_ids)]
    assert teacher_forced_accuracy(handle, [prompt], [answer]) == [sum(hits) / len(hits)]
    assert together[1].accuracy == sum(hits) / len(hits)
