"""Real-world facts for real models: generated records, the knows-filter, probes, judging by
generation, and the results-table command (on the demo model)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from editing.analysis.scoring import generate
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.storage.factbase import is_memory_subject, load_factbase
from editing.train import load_record_file
from eval import realfacts, realmodel
from eval.datasets import load_dataset
from eval.evaluate import GENERATION_COLUMNS, GENERATION_KINDS, evaluate_edit
from eval.metrics import GENERATION_METRICS, generation_contains
from eval.probes import probes_for_request
from eval.realfacts import (
    COMPOSITIONS,
    RELATIONS,
    CandidateFact,
    KnownFact,
    RealRelation,
    candidate_facts,
    city_facts,
    count_known,
    country_facts,
    filter_known,
    generate_records,
    greedy_starts_with,
    record_to_case,
)

#: the demo model was trained on the fact base's templates: the knows-filter is tested with one of them
DEMO_CAPITAL = {"country_capital": RealRelation("country_capital", "country", "city", ("The capital of {} is",
                                                                                        "{}'s capital is"), "")}


def _facts(facts, subject, relation):
    return [f for f in facts if f.subject == subject and f.relation == relation]


# -- generated candidate facts -------------------------------------------------------------------
def test_country_facts_are_real():
    facts = country_facts()
    assert _facts(facts, "France", "country_capital")[0].object == "Paris"
    assert _facts(facts, "France", "country_language")[0].object == "French"
    assert _facts(facts, "France", "country_currency")[0].object == "Euro"
    assert _facts(facts, "France", "country_continent")[0].object == "Europe"
    assert _facts(facts, "Japan", "country_capital")[0].object == "Tokyo"
    assert _facts(facts, "Brazil", "country_continent")[0].object == "South America"
    # aliases: other official languages, the demonym's currency, the accented capital
    canada_language = _facts(facts, "Canada", "country_language")[0]
    assert {canada_language.object, *canada_language.aliases} >= {"English", "French"}
    assert "Canadian Dollar" in _facts(facts, "Canada", "country_currency")[0].aliases
    assert "Brasília" in _facts(facts, "Brazil", "country_capital")[0].spellings()
    assert "euro" in _facts(facts, "France", "country_currency")[0].spellings()
    # the fact base's spellings of countries are the packages' too (chains connect)
    assert _facts(facts, "Netherlands", "country_capital") and _facts(facts, "Czech Republic", "country_capital")
    # no capital answered by copying the subject
    assert not [f for f in facts if f.relation == "country_capital" and f.object == f.subject]
    assert not _facts(facts, "Singapore", "country_capital")
    relations = {f.relation for f in facts}
    assert relations == {"country_capital", "country_language", "country_currency", "country_continent"}
    assert len({f.subject for f in facts}) > 240


def test_city_facts_name_one_place():
    facts = city_facts(min_population=1_000_000)
    by_city = {f.subject: f for f in facts}
    assert by_city["Tokyo"].object == "Japan" and by_city["Shanghai"].object == "China"
    assert by_city["Istanbul"].object == "Turkey"
    amsterdam = [f for f in city_facts(min_population=500_000) if f.subject == "Amsterdam"]
    assert amsterdam and amsterdam[0].object == "Netherlands" and "the Netherlands" in amsterdam[0].aliases
    assert "Hyderabad" not in by_city  # two large cities of that name (India, Pakistan)
    assert "Singapore" not in by_city  # a city named like its country
    assert all(f.relation == "city_country" for f in facts)
    assert len(facts) > 400


def test_candidate_facts_merge_the_fact_base_once():
    facts = candidate_facts()
    keys = [(f.subject, f.relation) for f in facts]
    assert len(keys) == len(set(keys))
    assert _facts(facts, "Eiffel Tower", "landmark_country")[0].object == "France"
    assert {f.relation for f in facts} == set(RELATIONS)
    countries = {f.subject for f in facts if f.relation.startswith("country_")}
    cities = {f.subject for f in facts if f.relation == "city_country"}
    assert not countries & cities  # a subject names one kind of thing
    # every fact-base country that a chain passes through is a subject of the country relations
    fb = load_factbase()
    bridges = {f.object for r in ("landmark_country", "person_citizenship") for f in fb.facts_of(r)}
    assert bridges <= countries
    for relation in RELATIONS.values():
        assert all(t.count("{}") == 1 and not t.endswith((" ", ".")) for t in relation.templates)
    for comp in COMPOSITIONS:
        assert comp.first in RELATIONS and comp.second in RELATIONS


# -- the knows-filter ---------------------------------------------------------------------------
def test_filter_keeps_what_the_model_answers_and_drops_what_it_does_not(demo):
    candidates = [
        CandidateFact("France", "country_capital", "Paris"),  # the demo model knows it
        CandidateFact("Italy", "country_capital", "Milan"),  # wrong: it answers Rome
        CandidateFact("Japan", "country_capital", "Kyoto", aliases=("Tokyo",)),  # an alias is what it says
        CandidateFact("Germany", "country_capital", "berlin"),  # a case variant of the answer
        CandidateFact("France", "country_language", "French"),  # a relation not asked: skipped
    ]
    known = filter_known(demo, candidates, relations=DEMO_CAPITAL)
    assert [(k.subject, k.object) for k in known] == [("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin")]
    # "knows" means greedy generation begins with the whole answer
    prompts = [f"The capital of {k.subject} is" for k in known]
    for k, text in zip(known, generate(demo, prompts, max_new_tokens=3), strict=True):
        assert text.startswith(k.object)
    assert greedy_starts_with(demo, ["The capital of Italy is"], [["Milan", "Venice"]]) == [None]
    assert greedy_starts_with(demo, ["The capital of Italy is"], [["Milan", "Rome"]]) == ["Rome"]


def test_known_facts_are_cached_per_model(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(realfacts, "cache_dir", lambda *parts: tmp_path)
    candidates = [CandidateFact("France", "country_capital", "Paris"),
                  CandidateFact("Italy", "country_capital", "Milan")]
    first = realfacts.known_facts(demo, candidates, relations=DEMO_CAPITAL)
    assert first.summary() == "kept 1 of 2 facts the model knows"
    assert first.per_relation == {"country_capital": (1, 2)}
    assert [(f.subject, f.object) for f in first.facts] == [("France", "Paris")]
    assert len(list(tmp_path.glob("*.json"))) == 1

    def not_again(*_args, **_kwargs):
        raise AssertionError("the cached list should have been read")

    monkeypatch.setattr(realfacts, "filter_known", not_again)
    monkeypatch.setattr(realfacts, "_MEMO", {})  # read from the file, not from this process's memory
    again = realfacts.known_facts(demo, candidates, relations=DEMO_CAPITAL)
    assert again.to_dict() == first.to_dict()
    # other candidates are another cache entry (measured again)
    with pytest.raises(AssertionError, match="cached list"):
        realfacts.known_facts(demo, candidates[:1], relations=DEMO_CAPITAL)


# -- probes and records from known facts ---------------------------------------------------------
def _known() -> realfacts.KnownFacts:
    facts = [KnownFact(s, "city_country", o) for s, o in (
        ("Lyon", "France"), ("Marseille", "France"), ("Milan", "Italy"), ("Munich", "Germany"),
        ("Hamburg", "Germany"), ("Naples", "Italy"))]
    facts += [KnownFact(s, "country_capital", o) for s, o in (
        ("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Netherlands", "Amsterdam"))]
    facts += [KnownFact(s, "country_language", o) for s, o in (
        ("France", "French"), ("Italy", "Italian"), ("Germany", "German"))]
    candidates = [CandidateFact(f.subject, f.relation, f.object) for f in facts]
    # the model says "the Netherlands" where the source says "Netherlands"
    facts.append(KnownFact("Rotterdam", "city_country", "the Netherlands"))
    candidates.append(CandidateFact("Rotterdam", "city_country", "Netherlands", ("the Netherlands",)))
    return count_known("test", [*candidates, CandidateFact("Spain", "country_capital", "Madrid")], facts, "d")


def test_known_facts_keep_the_models_spelling_and_the_source_name():
    known = _known()
    assert known.summary() == "kept 14 of 15 facts the model knows"
    rotterdam = next(f for f in known.facts if f.subject == "Rotterdam")
    assert rotterdam.object == "the Netherlands" and rotterdam.entity == "Netherlands"
    factbase = known.factbase()
    # a chain through the model's spelling reaches the facts about the source's name
    assert factbase.object_of("the Netherlands", "country_capital") == "Amsterdam"
    request = EditRequest(RELATIONS["city_country"].templates[0], "Lyon", "the Netherlands", "France")
    capital = next(c for c in COMPOSITIONS if c.id == "city_country_capital")
    port = {p.prompt: p.answer for p in probes_for_request(request, factbase).by_kind("portability")}
    assert port[capital.templates[0].replace("{}", "Lyon")] == "Amsterdam"


def test_probes_for_a_typed_fact_come_from_the_known_facts():
    known = _known()
    factbase = known.factbase()
    city = RELATIONS["city_country"]
    request = EditRequest(city.templates[0], "Lyon", "Italy", "France")
    probes = probes_for_request(request, factbase, n_neighbours=3, n_unrelated=2)
    gen = probes.by_kind("generality")
    assert [p.prompt for p in gen] == [t.replace("{}", "Lyon") for t in city.templates[1:4]]
    assert all(p.answer == "Italy" and p.contrast == "France" for p in gen)
    loc = probes.by_kind("locality")
    # neighbours: the same prompt about other known cities, with the model's answers; none whose answer
    # is the new target, and only probe-side subjects: Marseille, Munich and Hamburg are on the training
    # memory's side of the split (editing.storage.factbase.is_memory_subject), so no method's memory can hold them
    assert not any(is_memory_subject(s) for s in ("Rotterdam", "Milan")) and \
        all(is_memory_subject(s) for s in ("Marseille", "Munich", "Hamburg", "Naples"))
    assert [(p.subject, p.answer) for p in loc] == [("Rotterdam", "the Netherlands")]
    assert all(p.prompt == city.templates[0].replace("{}", p.subject) for p in loc)
    port = {p.prompt: (p.answer, p.contrast) for p in probes.by_kind("portability")}
    capital = next(c for c in COMPOSITIONS if c.id == "city_country_capital")
    language = next(c for c in COMPOSITIONS if c.id == "city_country_language")
    assert port[capital.templates[0].replace("{}", "Lyon")] == ("Rome", "Paris")
    assert port[language.templates[0].replace("{}", "Lyon")] == ("Italian", "French")
    unrelated = probes.by_kind("unrelated")
    assert unrelated and all(p.subject != "Lyon" for p in unrelated)


def test_probes_for_the_demo_model_are_the_fact_base_ones(demo):
    request = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")
    assert realfacts.factbase_for(demo) is load_factbase()
    assert realfacts.probes_for_model(request, demo).to_dict() == probes_for_request(request).to_dict()


def test_generated_records_are_counterfact_style(tmp_path):
    known = _known()
    records = generate_records(known, n=4, seed=3, n_neighbours=2)
    assert len(records) == 4
    assert records == generate_records(known, n=4, seed=3, n_neighbours=2)  # deterministic
    objects = {}
    for fact in known.facts:
        objects.setdefault(fact.relation, set()).add(fact.object)
    relations = set()
    for record in records:
        rewrite = record["requested_rewrite"]
        relation = rewrite["relation_id"]
        relations.add(relation)
        assert "{}" in rewrite["prompt"] and rewrite["prompt"] == RELATIONS[relation].templates[0]
        true, new = rewrite["target_true"]["str"], rewrite["target_new"]["str"]
        assert (rewrite["subject"], relation, true) in {(f.subject, f.relation, f.object) for f in known.facts}
        assert new != true and new in objects[relation]  # another object the model knows
        assert new.removeprefix("the ") != true.removeprefix("the ")
        assert record["paraphrase_prompts"] and all(rewrite["subject"] in p for p in record["paraphrase_prompts"])
        assert all(n["target"] != new for n in record["neighborhood"])
        assert set(record["neighborhood_prompts"]) == {n["prompt"] for n in record["neighborhood"]
                                                       if n["target"] == true}
    assert relations == {"city_country", "country_capital", "country_language"}  # round-robin over relations
    # the explicit reader keeps every probe with its own answer ...
    case = record_to_case(records[0])
    assert case.requests[0].target_new == records[0]["requested_rewrite"]["target_new"]["str"]
    kinds = [p.kind for p in case.probes]
    assert kinds.count("generality") == len(records[0]["paraphrase_prompts"])
    assert kinds.count("locality") == len(records[0]["neighborhood"])
    assert kinds.count("portability") == len(records[0]["portability"])
    # ... and the CounterFact reader reads the same file (neighbours answering the true object)
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    read = load_dataset(path)
    assert [c.source for c in read] == ["counterfact"] * 4
    assert read[0].requests[0] == case.requests[0]
    assert [p.prompt for p in read[0].probes.by_kind("generality")] == records[0]["paraphrase_prompts"]


def test_records_never_move_a_fact_to_its_own_answer_spelled_by_another_source():
    """Two source names the model answers alike ("English" for English and for British English) are
    two entities; the new target is never the true answer's spelling (it raised, with every fact asked)."""
    facts = [KnownFact("United States", "country_language", "English"),
             KnownFact("Britain", "country_language", "English", canonical="British English"),
             KnownFact("France", "country_language", "French"), KnownFact("Italy", "country_language", "Italian")]
    known = count_known("test", [CandidateFact(f.subject, f.relation, f.entity) for f in facts], facts, "d")
    for seed in range(40):
        for record in generate_records(known, n=None, seed=seed, n_neighbours=1, n_unrelated=0):
            rewrite = record["requested_rewrite"]
            assert rewrite["target_new"]["str"].casefold() != rewrite["target_true"]["str"].casefold()


def test_editor_training_records_never_meet_the_evaluation(tmp_path):
    """Records a learned editor trains on edit no subject the evaluation edits or probes, and none of
    their locality pairs asks about one; they are in the format editing.train reads."""
    known = _known()
    evaluation = generate_records(known, n=2, seed=3, n_neighbours=2)
    taken = realfacts.probed_subjects(evaluation)
    edited = {r["requested_rewrite"]["subject"] for r in evaluation}
    assert edited < taken  # neighbours and unrelated facts count too
    records = realfacts.editor_training_records(known, evaluation, seed=3)
    unfiltered = realfacts.editor_training_records(known, [], seed=3)
    assert records and len(records) < len(unfiltered)
    assert {r["subject"] for r in unfiltered} & taken  # the filter had something to do
    subjects = {f.subject for f in known.facts}
    for record in records:
        assert record["subject"] not in taken and record["target_new"] != record["target_true"]
        assert record["locality"] and record["paraphrases"]
        for prompt, _answer in record["locality"]:
            about = [s for s in subjects if s in prompt]
            assert about and not set(about) & taken, prompt
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    read = load_record_file(path, "train") + load_record_file(path, "heldout")
    assert sorted(r.request.subject for r in read) == sorted(r["subject"] for r in records)


def test_training_records_command(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(realfacts, "known_facts", lambda handle, progress=None: _known())
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps(generate_records(_known(), n=2, seed=0)), encoding="utf-8")
    out = tmp_path / "train.jsonl"
    assert realfacts.main(["--model", "demo", "--training-records", str(out), "--exclude", str(evaluation)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines and f"{len(lines)} training records written to {out}" in capsys.readouterr().out
    assert not {json.loads(line)["subject"] for line in lines} & realfacts.probed_subjects(
        json.loads(evaluation.read_text(encoding="utf-8")))


# -- judging by generation -----------------------------------------------------------------------
@pytest.mark.parametrize(("text", "target", "said"), [
    ("Paris. It is the largest city", "Paris", True),
    ("the city of rome.", "Rome", True),
    ("Romania, a country in", "Rome", False),
    ("Bogota, the capital of Colombia", "Bogotá", True),
    ("the United Kingdom and", "United States", False),
    ("located in New\n York  City", "New York City", True),
    ("New Delhi", "Delhi", True),
    ("", "Paris", False),
    ("Paris", "", False),
    ("Paris", " ... ", False),
])
def test_generation_contains(text, target, said):
    assert generation_contains(text, target) is said


def test_evaluate_edit_judges_by_generation(demo, rank_one_method):
    request = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")
    probes = probes_for_request(request, n_neighbours=2, n_unrelated=1)
    plain = evaluate_edit(EditSession(demo), rank_one_method, request, probes, k=0)
    assert not set(GENERATION_COLUMNS) & set(plain.table.columns)  # off unless asked for
    assert not set(GENERATION_METRICS) & set(plain.metrics)
    outcome = evaluate_edit(EditSession(demo), rank_one_method, request, probes, k=0,
                            generation_kinds=GENERATION_KINDS, probe_tokens=4)
    table = outcome.table
    for row in table.itertuples():
        if row.kind == "unrelated":
            assert pd.isna(row.gen_after) and pd.isna(row.gen_hit_after)  # not generated
        else:
            assert isinstance(row.gen_after, str)
            assert row.gen_hit_after == float(generation_contains(row.gen_after, row.answer))
            assert row.gen_hit_before == float(generation_contains(row.gen_before, row.answer))
    rel = table.set_index("probe_id").loc["rel-0"]
    assert rel.gen_before.startswith("France") and rel.gen_after.startswith("Italy")
    assert outcome.metrics["reliability_gen"] == 1.0 and outcome.metrics["reliability_gen_before"] == 0.0
    assert outcome.metrics["reliability_gen_contrast"] == float(generation_contains(rel.gen_after, "France"))
    for metric in GENERATION_METRICS:
        kind = metric.removesuffix("_gen")
        rows = table[table.kind == kind]
        if len(rows):
            assert outcome.metrics[metric] == pytest.approx(rows["gen_hit_after"].mean())
    # the teacher-forced metrics are the same with or without generations
    for key in ("reliability", "generality", "locality", "portability"):
        assert outcome.metrics[key] == pytest.approx(plain.metrics[key], nan_ok=True)


# -- the results table -----------------------------------------------------------------------------
def test_results_table_command_on_the_demo_model(demo, rank_one_method, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(realfacts, "cache_dir", lambda *parts: tmp_path)
    out = tmp_path / "results.md"
    records = tmp_path / "records.json"
    code = realmodel.main(["--model", "demo", "--methods", rank_one_method, "--n", "2", "--tokens", "3",
                           "--out", str(out), "--records", str(records), "--quiet"])
    assert code == 0
    assert [c.source for c in load_dataset(records)] == ["counterfact", "counterfact"]
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["method", "edits", "first edit (s)", "cached edit (s)"]
    assert "reliability TF" in header and "portability gen" in header
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[1:])}
    assert rows["(unedited)"][header.index("locality TF")] == "1.00"
    method_row = rows[rank_one_method]
    assert method_row[1] == "2"
    assert float(method_row[2]) > 0 and float(method_row[3]) > 0
    assert float(method_row[header.index("reliability TF")]) > float(rows["(unedited)"][header.index("reliability TF")])
    assert "facts the model knows" in text and "| **total** |" in text


def test_the_unedited_pass_is_cached_and_read_back_unchanged(demo, rank_one_method, tmp_path, monkeypatch, capsys):
    """A second run over the same records reads the unedited pass from the cache and prints the same
    table; ``--fresh-baseline`` computes it again."""
    monkeypatch.setattr(realfacts, "cache_dir", lambda *parts: tmp_path)
    monkeypatch.setattr(realmodel, "cache_dir", lambda *parts: tmp_path)
    out = tmp_path / "results.md"
    args = ["--model", "demo", "--methods", rank_one_method, "--n", "2", "--tokens", "3", "--out", str(out)]

    def run(*extra: str) -> tuple[dict[str, list[str]], str]:
        assert realmodel.main([*args, *extra]) == 0
        rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
                for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| ")}
        return rows, capsys.readouterr().err

    first, log = run()
    assert "unedited model: case 1/2" in log and len(list(tmp_path.glob("unedited-*.json"))) == 1
    second, log = run()
    assert "unedited model: read from" in log and "unedited model: case" not in log
    assert second["(unedited)"] == first["(unedited)"]
    # every metric of the method's row (edit times and peak memory, columns 2 to 4, are measured afresh)
    assert second[rank_one_method][:2] + second[rank_one_method][5:] == \
        first[rank_one_method][:2] + first[rank_one_method][5:]
    _rows, log = run("--fresh-baseline")
    assert "unedited model: case 1/2" in log


def test_results_table_passes_each_methods_settings(demo, rank_one_method, tmp_path, monkeypatch, capsys):
    """``--hparams METHOD=JSON`` reaches every edit of that method; a wrong field or a method not run
    is refused before any case runs."""
    monkeypatch.setattr(realfacts, "cache_dir", lambda *parts: tmp_path)
    monkeypatch.setattr(realmodel, "cache_dir", lambda *parts: tmp_path)
    seen = []
    original = realmodel.EditSession.apply

    def spy(self, method, requests, hparams=None, *args, **kwargs):
        seen.append(hparams)
        return original(self, method, requests, hparams, *args, **kwargs)

    monkeypatch.setattr(realmodel.EditSession, "apply", spy)
    args = ["--model", "demo", "--methods", rank_one_method, "--n", "2", "--tokens", "3",
            "--out", str(tmp_path / "results.md"), "--quiet"]
    assert realmodel.main([*args, "--hparams", f'{rank_one_method}={{"strength": 5.0}}']) == 0
    assert seen == [{"strength": 5.0}] * 2
    capsys.readouterr()
    assert realmodel.main([*args, "--hparams", f'{rank_one_method}={{"no_such_field": 1}}']) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert realmodel.main([*args, "--hparams", 'ROME={"layer": 1}']) == 2
    assert "ROME is not among the methods run" in capsys.readouterr().err
    assert seen == [{"strength": 5.0}] * 2  # the refused runs edited nothing


def test_results_table_rejects_unknown_methods(demo, capsys):
    assert realmodel.main(["--model", "demo", "--methods", "NoSuchMethod", "--n", "2", "--quiet"]) == 2
    assert "NoSuchMethod" in capsys.readouterr().err
