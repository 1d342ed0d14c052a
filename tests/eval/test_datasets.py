"""Data set readers on the shared format samples, and malformed files."""

from __future__ import annotations

import json

import pytest

from editing.storage.factbase import FACTBASE_PATH, load_factbase
from eval.datasets import DatasetError, EditCase, detect_format, load_dataset


def kinds(case: EditCase, kind: str) -> list:
    return case.probes.by_kind(kind)


def test_counterfact(shared_datasets):
    cases = load_dataset(shared_datasets / "counterfact.sample.json")
    assert len(cases) == 5 and all(c.source == "counterfact" for c in cases)
    piaf = cases[0]
    assert piaf.case_id == "0"
    (request,) = piaf.requests
    assert (request.prompt, request.subject, request.target_new, request.target_true) == (
        "The mother tongue of {} is", "Édith Piaf", "English", "French")
    (rel,) = kinds(piaf, "reliability")
    assert rel.prompt == "The mother tongue of Édith Piaf is" and rel.answer == "English" and rel.contrast == "French"
    # paraphrase prompts keep their unrelated lead-in sentence, as ROME evaluates them
    gen = kinds(piaf, "generality")
    assert [p.prompt for p in gen] == ["The rain stopped just before noon. Édith Piaf, a native speaker of",
                                       "Nobody expected the match to end that way. Édith Piaf spoke the language"]
    assert all(p.answer == "English" and p.subject == "Édith Piaf" for p in gen)
    loc = kinds(piaf, "locality")
    assert len(loc) == 5 and loc[0].prompt == "The mother tongue of Charles de Gaulle is"
    assert all(p.answer == "French" and p.contrast == "English" for p in loc)  # neighbours keep target_true
    attribute = kinds(piaf, "unrelated")
    assert len(attribute) == 3 and all(p.answer == "English" and p.subkind == "attribute" for p in attribute)
    assert piaf.meta["generation_prompts"][0] == "Édith Piaf's mother tongue is"
    assert all(p.source == "dataset" for p in piaf.probes)
    # "{}, that was created by": the slot sits right before punctuation
    assert cases[2].requests[0].text == "iPhone, that was created by"
    assert len({p.id for p in piaf.probes}) == len(piaf.probes)


def test_zsre(shared_datasets):
    cases = load_dataset(shared_datasets / "zsre.sample.json")
    assert len(cases) == 5 and detect_format(json.loads((shared_datasets / "zsre.sample.json").read_text())) == "zsre"
    ada = cases[0]
    (request,) = ada.requests
    assert request.prompt == "What was the native language of {}?" and request.target_new == "Italian"
    assert request.target_true == "English"
    assert kinds(ada, "generality")[0].prompt == "Which language did Ada Lovelace speak from birth?"
    (loc,) = kinds(ada, "locality")
    assert loc.prompt == "who wrote the opera the marriage of figaro"  # "nq question: " removed
    assert loc.answer == "Wolfgang Amadeus Mozart"
    (port,) = kinds(ada, "portability")
    assert port.answer == "Italy" and port.prompt.startswith("In which country is the language")
    # portability is optional: most records have none
    assert [len(kinds(c, "portability")) for c in cases] == [1, 1, 1, 0, 0]


def test_mquake(shared_datasets):
    cases = load_dataset(shared_datasets / "mquake.sample.json")
    merkel, doctor = cases
    assert merkel.case_id == "1" and len(merkel.requests) == 1
    assert len(doctor.requests) == 2  # several edits in one case
    assert [r.subject for r in doctor.requests] == ["Doctor Who", "Japan"]
    assert [p.request_index for p in kinds(doctor, "reliability")] == [0, 1]
    assert [p.prompt for p in kinds(doctor, "generality")] == ["Which country was Doctor Who created in?",
                                                               "What is the official language of Japan?"]
    port = kinds(merkel, "portability")
    assert len(port) == 3 and all(p.answer == "Ottawa" and p.contrast == "Berlin" for p in port)
    assert port[0].prompt.endswith("?") and port[0].subkind == "multi-hop"  # questions, not clozes
    assert port[0].aliases == ("Ottawa, Ontario",)
    # single hops the edits do not touch must keep their answers
    assert {(p.prompt, p.answer) for p in kinds(merkel, "locality")} == {
        ("The capital of Germany is", "Berlin"), ("The capital of Canada is", "Ottawa")}
    assert {(p.prompt, p.answer) for p in kinds(doctor, "locality")} == {
        ("The official language of United Kingdom is", "English")}


def test_knowedit(shared_datasets):
    cases = load_dataset(shared_datasets / "knowedit.sample.json")
    kili, leonardo, toronto = cases
    (request,) = kili.requests
    assert request.prompt == "{} is located in the country of" and request.target_true == "Tanzania"
    port = {p.subkind: p for p in kinds(kili, "portability")}
    assert set(port) == {"subject-alias", "reasoning", "logical"}
    assert port["subject-alias"].answer == "Kenya"  # ground truth as a string
    assert port["reasoning"].answer == "Nairobi"  # as a list of aliases
    assert port["logical"].answer == "No"  # as a list of lists of aliases
    loc = {p.subkind: p for p in kinds(kili, "locality")}
    assert loc["relation-specificity"].answer == "5,895 metres"
    assert loc["relation-specificity"].aliases == ("5895 m",)
    assert loc["forgetfulness"].answer == "Eastern Arc"
    # absent categories are simply absent
    assert {p.subkind for p in kinds(leonardo, "portability")} == {"subject-alias", "reasoning"}
    assert {p.subkind for p in kinds(leonardo, "locality")} == {"relation-specificity"}
    assert {p.subkind for p in kinds(toronto, "portability")} == {"reasoning"}
    assert kinds(toronto, "generality")[0].prompt == "Toronto serves as the capital city of the province of"


def test_limit_and_explicit_format(shared_datasets):
    assert len(load_dataset(shared_datasets / "counterfact.sample.json", limit=2)) == 2
    with pytest.raises(DatasetError, match="record 0: field 'subject' is missing"):
        load_dataset(shared_datasets / "counterfact.sample.json", fmt="zsre")


def test_demo_and_factbase_cases():
    cases = load_dataset("demo", limit=30)
    assert len(cases) == 30 and all(c.source == "factbase" for c in cases)
    factbase = load_factbase()
    relations = set()
    for case in cases:
        (request,) = case.requests
        relation = next(r for r in factbase.relations.values() if request.prompt in r.train_templates)
        relations.add(relation.id)
        assert factbase.object_of(request.subject, relation.id) == request.target_true != request.target_new
        assert case.probes.by_kind("reliability")[0].prompt == request.text
        assert case.probes.by_kind("generality") and case.probes.by_kind("locality")
    assert len(relations) >= 5  # shuffled: a prefix covers many relations
    from_file = load_dataset(FACTBASE_PATH, limit=3)
    assert [c.requests for c in from_file] == [c.requests for c in cases[:3]]


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_json_names_the_file_and_position(tmp_path):
    path = write(tmp_path, "broken.json", '[{"src": "x",]')
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON at line 1, column"):
        load_dataset(path)


def test_missing_field_names_record_and_field(tmp_path, shared_datasets):
    records = json.loads((shared_datasets / "counterfact.sample.json").read_text())
    del records[3]["requested_rewrite"]["target_new"]["str"]
    path = write(tmp_path, "cf.json", records)
    message = r"cf\.json: record 3: field 'requested_rewrite\.target_new\.str' is missing"
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)
    records = json.loads((shared_datasets / "zsre.sample.json").read_text())
    records[2]["alt"] = 7
    with pytest.raises(DatasetError, match=r"record 2: field 'alt' should be str, not int"):
        load_dataset(write(tmp_path, "z.json", records))
    records = json.loads((shared_datasets / "knowedit.sample.json").read_text())
    records[1]["portability"]["Reasoning"][0]["ground_truth"] = [{"x": 1}]
    with pytest.raises(DatasetError, match=r"record 1: field 'portability\.Reasoning\[0\]\.ground_truth'"):
        load_dataset(write(tmp_path, "k.json", records))
    records = json.loads((shared_datasets / "mquake.sample.json").read_text())
    records[1]["requested_rewrite"][1]["prompt"] = "The official language is"  # no slot, no subject
    with pytest.raises(DatasetError, match=r"record 1: field 'requested_rewrite\[1\]\.prompt' does not make a valid"):
        load_dataset(write(tmp_path, "m.json", records))
    del records[0]["requested_rewrite"][0]["subject"]
    with pytest.raises(DatasetError, match=r"record 0: field 'requested_rewrite\[0\]\.subject' is missing"):
        load_dataset(write(tmp_path, "m.json", records))


def test_unknown_layouts_fail_clearly(tmp_path):
    with pytest.raises(DatasetError, match="matches no known format"):
        load_dataset(write(tmp_path, "odd.json", [{"question": "?"}]))
    with pytest.raises(DatasetError, match="non-empty list"):
        load_dataset(write(tmp_path, "empty.json", []))
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="Unknown data set format"):
        load_dataset("demo", fmt="wikidata")
    lines = write(tmp_path, "z.jsonl", '{"subject": "Nokia", "src": "Where is Nokia?", "alt": "Oslo"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"record 1 \(line 2\) is not valid JSON"):
        load_dataset(lines)
