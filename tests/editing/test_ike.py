"""IKE (in-context editing) and the shared sentence encoder."""

from __future__ import annotations

import pytest
import torch

from editing.analysis.embeddings import MiniLMEncoder, ModelMeanEncoder, sentence_encoder, top_k_similar
from editing.analysis.scoring import score_routes, score_targets
from editing.core.edit import EditError, handle_stack
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import get_method
from editing.methods.ike import (
    IkeEdit,
    IKEHParams,
    IkeRoute,
    demonstration_types,
    new_fact,
    pool_with_keys,
    select_demonstrations,
)
from editing.models.tiny import tiny_model
from editing.models.tokens import encode
from editing.train import edit_records
from tests.helpers import assert_params_equal, params_snapshot

FRANCE = EditRequest("The capital of {} is", "France", "Berlin", "Paris")
JAPAN = EditRequest("The official language of {} is", "Japan", "Spanish", "Japanese")


# -- sentence encoder ----------------------------------------------------------------------------
def test_minilm_ranks_paraphrases_above_other_facts():
    encoder = sentence_encoder(kind="minilm")
    assert isinstance(encoder, MiniLMEncoder) and encoder.dim == 384
    vectors = encoder.encode(["The capital of France is", "France's capital city is",
                              "The official language of Japan is", "The capital of France is"])
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(vectors[0], vectors[3])  # cached rows come back identical
    sims = vectors[0] @ vectors.T
    assert sims[1] > 0.8 > sims[2]
    values, indices = top_k_similar(vectors[1:2], vectors[:3], k=2)
    assert indices[0].tolist() == [1, 0] and values[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_fallback_encoder_uses_mid_depth_hidden_states(tiny_handle, monkeypatch):
    monkeypatch.setenv("EDITSCOPE_SENTENCE_ENCODER", "model")
    encoder = sentence_encoder(tiny_handle)
    assert isinstance(encoder, ModelMeanEncoder)
    assert encoder.layer == tiny_handle.n_layers // 2 and encoder.dim == tiny_handle.d_model
    before = params_snapshot(tiny_handle)
    vectors = encoder.encode(["The capital of France is", "Tokyo is a city in", "The capital of France is"])
    assert vectors.shape == (3, tiny_handle.d_model) and torch.isfinite(vectors).all()
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vectors[0], vectors[2], atol=1e-6)  # padding does not leak into the mean
    assert_params_equal(tiny_handle, before)


# -- demonstrations ------------------------------------------------------------------------------
def test_demonstration_types_follow_the_papers_ratio():
    import random

    types = demonstration_types(32, random.Random(0))
    assert (types.count("copy"), types.count("update"), types.count("retain")) == (4, 12, 16)
    assert len(demonstration_types(8, random.Random(1))) == 8
    assert demonstration_types(8, random.Random(1)) == demonstration_types(8, random.Random(1))


def test_paper_format_for_long_contexts_and_compact_for_the_demo(demo_handle):
    assert demo_handle.max_length < 256
    compact = IKEHParams.for_model(demo_handle)
    assert compact.fact_prefix == "" and compact.k == 8
    handle = tiny_model("gpt2")  # 128 positions: still short
    handle.model.config.n_positions = 1024
    paper = IKEHParams.for_model(handle)
    assert paper.demonstration("F", "P", "A") == "New Fact: F\nPrompt: P A\n\n"
    assert paper.query_prefix("F") == "New Fact: F\nPrompt: "


# -- the edit ------------------------------------------------------------------------------------
def test_ike_prefixes_retrieved_demonstrations_and_reverts_exactly(tiny_handle, tmp_path):
    before = params_snapshot(tiny_handle)
    edit = get_method("IKE").apply(tiny_handle, [FRANCE])
    assert isinstance(edit, IkeEdit) and edit.is_applied
    edit.revert(tiny_handle)
    assert_params_equal(tiny_handle, before)
    context = edit.contexts[0]
    assert 1 <= len(context["demonstrations"]) <= IKEHParams.for_model(tiny_handle).k
    assert edit.info["demonstrations"] == [len(context["demonstrations"])]
    assert context["similarities"] == sorted(context["similarities"])  # most similar next to the query
    pool, _keys = pool_with_keys(sentence_encoder(tiny_handle), seed=0)
    assert not any(d.startswith(p.fact) for d in context["demonstrations"] for p in pool if p.subject == "France")
    session = EditSession(tiny_handle)
    session.push(edit)
    query = "France's capital city is"
    route = session.route(query)
    assert isinstance(route, IkeRoute) and route.handle is tiny_handle and route.routed_by == "IKE"
    assert route.prompt.endswith(query) and route.prompt[route.prefix_chars:] == query
    assert len(encode(tiny_handle.tokenizer, route.prompt)) + edit.reserve_tokens <= tiny_handle.max_length
    kept = context["demonstrations"][len(context["demonstrations"]) - route.n_demonstrations:]
    # the most similar demonstrations are the ones kept, then the new fact as the query's context
    assert route.prompt[: route.prefix_chars] == "".join(kept) + context["query_prefix"]
    scores = score_routes([route], ["Berlin"])
    assert torch.isfinite(scores[0].logprobs).all()
    session.save(tmp_path / "s")
    loaded = EditSession(tiny_handle)
    loaded.load(tmp_path / "s")
    assert loaded.route(query).prompt == route.prompt
    assert_params_equal(tiny_handle, before)


def test_ike_keeps_the_demonstrations_that_fit_the_demo_model(demo):
    """The edit holds as many of the most similar demonstrations as fit the 64-token context before
    the edit prompt (one more would not), says how many in its info, and longer queries drop more."""
    hparams = IKEHParams.for_model(demo)
    edit = get_method("IKE").apply(demo, [FRANCE])
    edit.revert(demo)
    demos = edit.contexts[0]["demonstrations"]
    assert 0 < len(demos) < hparams.k and edit.info["demonstrations"] == [len(demos)]
    assert edit.info["demonstrations_asked"] == hparams.k and edit.info["context_tokens"] == demo.max_length
    encoder = sentence_encoder(demo, edit.encoder_kind)
    pool, keys = pool_with_keys(encoder, hparams.seed)
    one_more = select_demonstrations(FRANCE, encoder.encode([new_fact(FRANCE)])[0], pool, keys, hparams, len(demos) + 1)
    query = edit.contexts[0]["query_prefix"] + FRANCE.text
    assert len(encode(demo.tokenizer, "".join(demos) + query)) + edit.reserve_tokens <= demo.max_length
    assert len(encode(demo.tokenizer, "".join(t for t, _s in one_more) + query)) + edit.reserve_tokens > demo.max_length
    session = EditSession(demo)
    session.push(edit)
    assert session.route(FRANCE.text).n_demonstrations == len(demos)
    for query in ("In France, the capital city is", "According to the encyclopedia, France's capital city is"):
        route = session.route(query)
        assert route.prompt.endswith(query)
        assert len(encode(demo.tokenizer, route.prompt)) + edit.reserve_tokens <= demo.max_length
        assert route.n_demonstrations <= len(demos)
    assert "<unk>" not in demo.tokenizer.decode(encode(demo.tokenizer, session.route(query).prompt))


def test_ike_refuses_when_not_even_one_demonstration_fits(demo):
    """A prompt that fits the model, but leaves no room for a demonstration beside the new fact."""
    words = 0
    while len(encode(demo.tokenizer, f"The capital of the {'big ' * words}country France is")) < 28:
        words += 1
    long = EditRequest(f"The capital of the {'big ' * words}country {{}} is", "France", "Berlin", "Paris")
    with pytest.raises(EditError, match="not even one demonstration fits"):
        get_method("IKE").apply(demo, [long])
    assert not handle_stack(demo)


def test_the_new_fact_is_only_the_querys_context_not_a_copy_demonstration(demo):
    """The paper's test prompt: other facts' demonstrations, then ``New Fact: <edit> Prompt: <query>``.
    The new fact appears once, as the context of the query — no copy demonstration of the new fact
    itself stands before a paraphrase or a neighbour (it showed them the answer to copy)."""
    edit = get_method("IKE").apply(demo, [FRANCE])
    edit.revert(demo)
    session = EditSession(demo)
    session.push(edit)
    fact = new_fact(FRANCE)
    for query in (FRANCE.text, "In France, the capital city is", "The capital of Germany is"):
        route = session.route(query)
        assert route.prompt.count(fact) == 1, route.prompt
        assert route.prompt[: route.prefix_chars].endswith(IKEHParams.for_model(demo).query_prefix(fact))
    assert all(not d.startswith(fact) for d in edit.contexts[0]["demonstrations"])


def test_batch_and_stacked_ike_edits_put_the_matching_fact_in_context(demo):
    batch = get_method("IKE").apply(demo, [FRANCE, JAPAN])
    batch.revert(demo)
    session = EditSession(demo)
    session.push(batch)
    assert new_fact(JAPAN) in session.route("In Japan, people mainly speak").prompt
    assert new_fact(FRANCE) in session.route("France's capital city is").prompt
    stacked = EditSession(demo)
    for request in (FRANCE, JAPAN):
        stacked.apply("IKE", request)
    for query, request, other in (("In Japan, people mainly speak", JAPAN, FRANCE),
                                  ("France's capital city is", FRANCE, JAPAN)):
        route = stacked.route(query)
        assert new_fact(request) in route.prompt and new_fact(other) not in route.prompt
        assert route.prompt[route.prefix_chars:] == query  # one context, not two stacked ones


def test_ike_on_held_out_edits_of_the_demo_model(demo):
    """What in-context editing does to the demo model, which never saw a multi-sentence context.

    Measured on 60 held-out edits (one batch IKE edit; about 2 demonstrations of other facts fit the
    64-token context, then the new fact as the query's context): log P(new target) rises by 6.0
    nats on average on the edit prompts (for 92% of them) and by 5.6 nats on held-out-template
    paraphrases (for 92%), but the new target becomes the top-1 answer for only 3% / 2% of them
    (0% without context); and the context hurts locality: the true answer of an unrelated fact
    stays top-1 for only 23% of locality prompts (100% without context). Before issue 13 (the new
    fact's own copy demonstration before every query, about 1 other demonstration): 5.7 / 5.1
    nats, 93% / 91%, top-1 3% / 3%, locality 29%. The test holds the method to what holds.
    """
    records = edit_records("heldout")[:60]
    edit = get_method("IKE").apply(demo, [r.request for r in records])
    edit.revert(demo)
    session = EditSession(demo)
    session.push(edit)
    for name, prompts_of, own_fact_rate in (("edit prompts", lambda r: [r.request.text], 1.0),
                                            ("paraphrases", lambda r: list(r.paraphrases), 0.9)):
        pairs = [(p, r) for r in records for p in prompts_of(r)]
        prompts = [p for p, _r in pairs]
        targets = [r.request.target_new for _p, r in pairs]
        routes = session.routes(prompts)
        # batch retrieval puts the query's own new fact into its context (measured: all edit prompts,
        # 172 of 180 paraphrases; the misses pick another edit of the same subject)
        own = [new_fact(r.request) in route.prompt for (_p, r), route in zip(pairs, routes, strict=True)]
        assert sum(own) / len(own) >= own_fact_rate
        plain = score_targets(demo, prompts, targets)
        edited = score_routes(routes, targets)
        gain = torch.tensor([e.logprob - p.logprob for e, p in zip(edited, plain, strict=True)])
        top1 = [sum(s.hits[0].item() for s in scores) / len(scores) for scores in (plain, edited)]
        print(f"IKE, {len(records)} held-out edits, {len(prompts)} {name}: log P(new) {gain.mean():+.1f} nats, "
              f"rises for {(gain > 0).float().mean():.0%}; new target top-1 {top1[1]:.0%} ({top1[0]:.0%} without "
              f"context); own new fact in the context for {sum(own) / len(own):.0%}; "
              f"{sum(r.n_demonstrations for r in routes) / len(routes):.1f} demonstrations per query")
        assert top1[0] <= 0.05
        assert gain.mean() > 3.0 and (gain > 0).float().mean() >= 0.8


def test_ike_retrieves_with_the_models_own_states_when_asked(demo):
    """The fallback retriever (mean mid-depth hidden states of the demo model) still finds
    demonstrations of the same relation for a capital-city fact."""
    edit = get_method("IKE").apply(demo, [FRANCE], {"encoder": "model"})
    edit.revert(demo)
    assert edit.encoder_kind == "model" and edit.prompt_keys.shape == (1, demo.d_model)
    assert edit.info["encoder"].startswith("mean-hidden")
    demos = edit.contexts[0]["demonstrations"]
    assert sum("capital" in d for d in demos) >= len(demos) // 2
    session = EditSession(demo)
    session.push(edit)
    route = session.route("France's capital city is")
    assert isinstance(route, IkeRoute) and route.prompt.endswith("France's capital city is")
