"""Probe sets built from the fact base for typed facts."""

from __future__ import annotations

import pytest

from editing.core.request import EditRequest
from editing.storage.factbase import load_factbase
from eval.probes import IN_SCOPE_KINDS, PROBE_KINDS, Probe, ProbeSet, probes_for_request, probes_for_requests

EIFFEL = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")


@pytest.fixture(scope="module")
def factbase():
    return load_factbase()


def test_eiffel_tower_to_italy(factbase):
    probes = probes_for_request(EIFFEL, factbase)
    (rel,) = probes.by_kind("reliability")
    assert (rel.prompt, rel.answer, rel.contrast) == ("Eiffel Tower is a famous landmark in", "Italy", "France")
    relation = factbase.relations["landmark_country"]
    gen = probes.by_kind("generality")
    # the relation's held-out templates first, filled with the subject
    assert [p.prompt for p in gen] == [t.replace("{}", "Eiffel Tower") for t in relation.heldout_templates]
    assert all(p.answer == "Italy" for p in gen)
    # portability: the 2-hop chain through the NEW object
    port = {p.prompt: p for p in probes.by_kind("portability")}
    capital = port["The capital of the country where Eiffel Tower is located is"]
    assert capital.answer == "Rome" and capital.contrast == "Paris" and capital.subkind == "multi-hop"
    assert port["Eiffel Tower is located on the continent of"].answer == "Europe"
    # neighbours: other landmarks, asked the same way, expecting their own true countries
    loc = probes.by_kind("locality")
    assert len(loc) == 5
    for probe in loc:
        assert probe.subject != "Eiffel Tower" and probe.prompt == f"{probe.subject} is a famous landmark in"
        assert factbase.object_of(probe.subject, "landmark_country") == probe.answer != "Italy"
        assert probe.contrast == "Italy" and not probe.in_scope
    assert sum(p.answer == "France" for p in loc) >= 3  # CounterFact-style: same true object first
    unrel = probes.by_kind("unrelated")
    assert len(unrel) == 5
    for probe in unrel:  # true facts of other relations about other subjects
        relations = {f.relation for f in factbase.facts_about(probe.subject) if f.object == probe.answer}
        assert probe.subject != "Eiffel Tower" and relations and "landmark_country" not in relations
    assert {p.kind for p in probes} == set(PROBE_KINDS)
    assert len({p.id for p in probes}) == len(probes)
    assert [p.in_scope for p in probes] == [p.kind in IN_SCOPE_KINDS for p in probes]


def test_deterministic_and_seeded(factbase):
    a = probes_for_request(EIFFEL, factbase, seed=1)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in probes_for_request(EIFFEL, factbase, seed=1)]
    other = probes_for_request(EIFFEL, factbase, seed=2)
    assert [p.prompt for p in a.by_kind("unrelated")] != [p.prompt for p in other.by_kind("unrelated")]


def test_prompt_not_a_template_uses_the_subjects_relation(factbase):
    request = EditRequest("{} is the capital city of", "Kyoto", "China")  # free wording, no true target
    probes = probes_for_request(request, factbase)
    assert probes.by_kind("generality")[0].prompt == "Kyoto is a city situated in"
    assert probes.by_kind("reliability")[0].contrast == "Japan"  # from the fact base
    assert all(factbase.object_of(p.subject, "city_country") == p.answer for p in probes.by_kind("locality"))


def test_unknown_subject_with_a_known_template(factbase):
    request = EditRequest("{} is a famous landmark in", "Mount Foobar", "Italy")
    probes = probes_for_request(request, factbase)
    assert probes.by_kind("generality") and len(probes.by_kind("locality")) == 5
    capital = [p for p in probes.by_kind("portability") if p.answer == "Rome"]
    assert capital and capital[0].contrast is None  # no old chain is known


def test_unknown_fact_gives_reliability_and_unrelated(factbase):
    request = EditRequest("My neighbour {} likes to eat", "Zorblax", "pancakes")
    probes = probes_for_request(request, factbase, n_unrelated=4)
    assert [p.kind for p in probes] == ["reliability"] + ["unrelated"] * 4
    assert probes.by_kind("reliability")[0].contrast is None


def test_relation_specificity_option(factbase):
    request = EditRequest("{} is a citizen of", "Victor Hugo", "Italy")
    probes = probes_for_request(request, factbase, n_relation_specificity=2)
    specific = [p for p in probes.by_kind("locality") if p.subkind == "relation-specificity"]
    assert len(specific) == 2 and all(p.subject == "Victor Hugo" for p in specific)


def test_user_probes_and_ids():
    probes = ProbeSet([EIFFEL], [Probe("rel-0", EIFFEL.text, "Italy", "reliability")])
    added = probes.add("Eiffel Tower  stands in", "Italy", "generality")
    assert (added.id, added.source, added.subject, added.prompt) == ("user-0", "user", "Eiffel Tower",
                                                                     "Eiffel Tower stands in")
    assert added.contrast == "France"
    assert probes.add("Big Ben is in", "United Kingdom", "locality").id == "user-1"
    assert probes.get("user-1").contrast == "Italy"
    with pytest.raises(ValueError, match="Unknown probe kind"):
        probes.add("x", "y", "sideways")
    with pytest.raises(ValueError, match="unique"):
        ProbeSet([EIFFEL], [Probe("a", "p", "q", "locality"), Probe("a", "r", "s", "locality")])
    assert ProbeSet.from_dict(probes.to_dict()).probes == probes.probes


def test_merged_probes_drop_neighbours_that_another_edit_changes(factbase):
    first = probes_for_request(EIFFEL, factbase)
    neighbour = first.by_kind("locality")[0].subject
    second = EditRequest("{} is a famous landmark in", neighbour, "Spain")
    merged = probes_for_requests([EIFFEL, second], factbase)
    assert merged.requests == [EIFFEL, second]
    assert all(p.subject != neighbour for p in merged.probes if not p.in_scope)
    assert {p.request_index for p in merged.by_kind("reliability")} == {0, 1}
    assert all(p.id.startswith(("e0-", "e1-")) for p in merged.probes)
    assert len({p.id for p in merged.probes}) == len(merged.probes)
