"""A long lifelong-editing stream built offline (``loka data lifelong``), and the unedited model's
scores on it (``loka data lifelong-baseline``).

The stream is CounterFact-format records, in this order: counterfactual rewrites of the known facts
(``known_1000.json``), of MQuAKE-hard's true single-hop facts and of the curated knowledge graph, then
insertions of new facts about fictional subjects (seeded name generators, the Wikidata relations of
``loka.relations``, objects drawn from the real facts' answers) until ``n`` records.

Rules that hold over the whole stream (tests check them at 10,000):

* one (subject, relation) pair at most once; a subject of one source never appears in another;
* no record's subject is a word-level prefix or suffix of another record's subject or of a
  neighbourhood subject ("France" / "Louis XVII of France"): a last-token editor would key both on
  the same token; a fictional subject is also no character-level prefix or suffix of any other;
* **neighbourhood prompts are about facts that no record of the stream edits**: before any record is
  built, a few real facts per relation are set aside (two per object, the commonest objects first,
  known facts before MQuAKE's) and never edited; every record's neighbourhood is drawn from the set-aside
  facts of its relation, the same-object ones first (CounterFact's design), each with its own answer
  (``neighborhood_answers``), never the record's new object. So NS keeps one meaning at every
  checkpoint of a 10,000-edit run: no later edit changes a neighbour's true answer.

Every record has the edit prompt (``{}`` = subject), ``target_new``, ``target_true`` (``null`` for an
insertion: a fictional subject has no true answer), a zsRE-style ``question`` whose answer is
``target_new``, 2 paraphrase prompts, 2–4 neighbourhood prompts with their answers and 2 generation
prompts. The stream for ``n`` is the first ``n`` records of any longer stream of the same seed.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputError, OutputError
from ..relations import RELATIONS
from ..utils.io import (
    atomic_write_bytes,
    check_output_file,
    check_writable,
    read_json,
    sha256_bytes,
    sha256_file,
)
from .counterfact import load_known, mquake_facts

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger("loka")

FORMAT = "loka-lifelong"
BASELINE_FORMAT = "loka-lifelong-baseline"
VERSION = 1
SOURCES = ("known", "mquake", "kg", "synthetic")
MAX_RECORDS = 20_000  # what the name generators are sized for (and a 20,000-record file is ~15 MB)
MAX_NEIGHBOURS = 4
MIN_NEIGHBOURS = 2
RESERVE_MAX = 12  # set-aside neighbourhood facts per relation (a quarter of its facts, at least 3)

#: zsRE-style questions per Wikidata relation (``{}`` = subject); MQuAKE's question templates where it
#: has one for the relation, ours otherwise. The answer is the record's ``target_new``.
QUESTIONS: dict[str, str] = {
    "P101": "Which field does {} work in?",
    "P103": "What is the native language of {}?",
    "P106": "What kind of work does {} do?",
    "P108": "Who is the employer of {}?",
    "P127": "Who owns {}?",
    "P1303": "Which instrument does {} play?",
    "P131": "Where is {} located?",
    "P136": "What type of music does {} play?",
    "P138": "What is {} named after?",
    "P140": "Which religion is {} affiliated with?",
    "P1412": "What language does {} speak?",
    "P159": "Which city is the headquarters of {} located in?",
    "P17": "Which country is {} located in?",
    "P176": "Which company is {} produced by?",
    "P178": "Who is the developer of {}?",
    "P19": "Which city was {} born in?",
    "P190": "Which city is {} twinned with?",
    "P20": "Which city did {} die in?",
    "P27": "What is the country of citizenship of {}?",
    "P276": "Where is {} located?",
    "P30": "Which continent is {} located in?",
    "P36": "What is the capital of {}?",
    "P364": "What is the original language of {}?",
    "P37": "What is the official language of {}?",
    "P39": "What position does {} hold?",
    "P407": "Which language was {} written in?",
    "P413": "What position does {} play?",
    "P449": "Which network first aired {}?",
    "P463": "Which organisation is {} a member of?",
    "P495": "Which country was {} created in?",
    "P641": "Which sport does {} play?",
    "P740": "Where was {} founded?",
    "P937": "Which city did {} work in?",
}

#: The curated graph's relations (by name, without the domain): a question and two paraphrases each
#: (its cloze prompt is the edit prompt). Written for the graph; a relation missing here falls back to
#: "What is the {noun} of {}?" and noun phrases.
KG_PHRASES: dict[str, tuple[str, str, str]] = {
    "family": (
        "Which biological family does {} belong to?",
        "{} is a member of the biological family",
        "The biological family of {} is",
    ),
    "order": ("Which order is {} in?", "{} belongs to the order", "The order that {} belongs to is"),
    "class": ("Which class is {} in?", "{} belongs to the class", "The class that {} belongs to is"),
    "phylum": ("Which phylum is {} in?", "{} belongs to the phylum", "The phylum of {} is"),
    "kingdom": ("Which kingdom is {} in?", "{} belongs to the kingdom", "The kingdom of {} is"),
    "native_continent": (
        "Which continent is {} native to?",
        "{} originally comes from the continent of",
        "The native continent of {} is",
    ),
    "organ_system": (
        "Which organ system is {} part of?",
        "{} belongs to the",
        "The organ system that includes {} is the",
    ),
    "main_organ": (
        "What is the main organ of {}?",
        "The chief organ of {} is the",
        "The most important organ of {} is the",
    ),
    "organelle_function": (
        "What is {} responsible for?",
        "The job of {} in the cell is",
        "In the cell, {} carries out",
    ),
    "pathogen": ("What causes {}?", "The cause of {} is", "{} is an illness caused by"),
    "pathogen_group": (
        "What kind of pathogen is {}?",
        "{} is classified as a",
        "The type of pathogen {} belongs to is",
    ),
    "deficiency_disease": (
        "Which disease does a lack of {} cause?",
        "Too little {} leads to",
        "A deficiency of {} causes",
    ),
    "discoverer": ("Who discovered {}?", "{} was first described by", "The discoverer of {} is"),
    "birth_country": (
        "In which country was {} born?",
        "The country of birth of {} is",
        "{} is a native of the country of",
    ),
    "currency": (
        "What is the currency of {}?",
        "{} uses the currency called the",
        "The official currency of {} is the",
    ),
    "central_bank": (
        "What is the central bank of {}?",
        "The national central bank of {} is the",
        "{}'s central bank is the",
    ),
    "bank_seat": ("Where is {} headquartered?", "The headquarters of {} are in", "{} has its seat in"),
    "city_country": (
        "Which country is {} a city in?",
        "{} is located in the country of",
        "The country where {} lies is",
    ),
    "company_hq": (
        "Where are the headquarters of {}?",
        "{} is headquartered in",
        "The headquarters of {} are in",
    ),
    "industry": ("Which industry is {} in?", "{} operates in the industry of", "The industry of {} is"),
    "author": (
        "Which economist wrote {}?",
        "The author of {} is the economist",
        "{} is a book by the economist",
    ),
    "originator": (
        "Who came up with the idea of {}?",
        "The idea of {} was put forward by",
        "{} was first proposed by",
    ),
    "concept_field": (
        "Which field of economics is {} a concept of?",
        "{} is studied in the field of",
        "{} belongs to the field of",
    ),
    "founder": ("Who founded {}?", "{} was founded by", "The originator of {} is"),
    "war": ("Which war was {} a battle of?", "{} was fought during the", "{} took place during the"),
    "battle_year": ("In which year was {} fought?", "{} took place in the year", "The year of {} is"),
    "start_year": ("In which year did {} begin?", "{} started in the year", "The year {} began is"),
    "end_year": ("In which year did {} end?", "{} came to an end in the year", "The year {} ended is"),
    "ended_war": ("Which war did {} end?", "{} brought an end to the", "{} concluded the"),
    "treaty_year": (
        "In which year was {} signed?",
        "{} was concluded in the year",
        "The year {} was signed is",
    ),
    "led": ("Which state did {} rule?", "{} ruled over", "{} was a leader of"),
    "capital": (
        "What was the capital of {}?",
        "The capital city of {} was",
        "The seat of government of {} was",
    ),
    "event_year": ("In which year did {} happen?", "{} took place in the year", "The year of {} is"),
    "measures": (
        "Which quantity does the SI unit {} measure?",
        "{} is the SI unit of",
        "The quantity measured in {} is",
    ),
    "branch": (
        "Which branch of physics studies {}?",
        "{} is studied in the branch of physics called",
        "The branch of physics that studies {} is",
    ),
    "central_equation": (
        "What is the central equation of {}?",
        "The key equation of {} is",
        "The most important equation of {} is",
    ),
    "particle_discoverer": (
        "Who discovered the particle {}?",
        "{} was discovered by",
        "The discoverer of the particle {} is",
    ),
    "field": ("Which field is {} best known for?", "{} is famous for work in", "The main field of {} is"),
    "particle_family": (
        "What type of particle is {}?",
        "{} belongs to the particle family of",
        "{} is classified as a",
    ),
    "orbits": ("Which planet is {} a moon of?", "{} orbits the planet", "{} is a satellite of the planet"),
    "largest_moon": (
        "What is the largest moon of {}?",
        "The biggest moon of {} is",
        "Of all the moons of {}, the largest is",
    ),
}

# ---- fictional subjects -----------------------------------------------------------------------
_FIRST = (
    "Aaron Ada Adele Agnes Ahmed Aiko Alba Aldo Alina Amara Anders Anika Anton Ari Astrid Aurelio "
    "Beatriz Benedikt Bianca Bram Carmen Cassius Celine Cyrus Dagny Dario Delphine Dmitri Edda Elif "
    "Elio Emeka Enzo Esme Fabian Farida Felix Freya Gaspard Greta Hamid Hana Hugo Ida Idris Ilse "
    "Imogen Ines Ivo Jasper Johan Jonas Kaito Kamala Kasimir Katja Kofi Lars Leila Leon Linnea Lorenzo "
    "Luca Maeve Malik Marek Margot Mateo Mila Mira Nadia Niko Nils Noor Odile Olek Orla Oskar Paloma "
    "Pavel Petra Quentin Rafael Rania Rasmus Rhea Rosa Rune Sanne Selim Signe Silas Soren Talia Tariq "
    "Teodor Thea Tomas Una Valentin Vera Viggo Wanda Wren Yara Yusuf Zora"
).split()
_ONSET = "B Br C Ch D Dr F Fl G Gr H K Kr L M N P Pr R S Sh St T Tr V W Z".split()
_VOWEL = "a e i o u ae ei ou ia".split()
_SIMPLE = "a e i o u".split()
_MID = "l n r s v th nd rk ld m lv rn sk".split()
_SURNAME_END = "ov ski son berg ard ell in ett ane ez ani ova holm stad ley mont quist ides enko wick ander ari ing".split()
_PLACE_END = "ton ford vik grad burg mouth dale ria stad heim polis wick ora enza mere gard haven".split()
_ORG_END = (
    "Systems Motors Holdings Labs Dynamics Group Industries Networks Foods Airlines Energy Textiles "
    "Pharma Logistics Robotics Instruments"
).split()
_PRODUCT_END = "X2 500 Pro GT Mini Neo Zeta S8 Air Duo".split()
_TITLE_END = (
    "Chronicles Affair Files Legacy Inheritance Crossing Tapes Letters Diaries Covenant Orchard".split()
)
_BAND_END = "Collective Quartet Brigade Union Ensemble Society Parade".split()
_LANDMARK_END = "Bridge Tower Cathedral Castle Palace Lighthouse Abbey Dam Observatory Fortress".split()
_EVENT_END = "Festival Summit Open Biennale Marathon Regatta Expo".split()


def _stem(rng: random.Random) -> str:
    s = rng.choice(_ONSET) + rng.choice(_VOWEL) + rng.choice(_MID) + rng.choice(_SIMPLE)
    return s if rng.random() < 0.5 else s + rng.choice(_MID)


def _join(stem: str, end: str) -> str:
    """``stem + end`` without two vowels meeting ("Velma" + "ard" -> "Velmard")."""
    return stem[:-1] + end if stem[-1] in "aeiou" and end[0] in "aeiou" else stem + end


def _person(rng):
    return f"{rng.choice(_FIRST)} {_join(_stem(rng), rng.choice(_SURNAME_END))}"


def _place(rng):
    return _join(_stem(rng), rng.choice(_PLACE_END))


def _org(rng):
    return f"{_stem(rng)} {rng.choice(_ORG_END)}"


def _product(rng):
    return f"{_stem(rng)} {rng.choice(_PRODUCT_END)}"


def _title(rng):
    return f"The {_stem(rng)} {rng.choice(_TITLE_END)}"


def _band(rng):
    return f"The {_stem(rng)} {rng.choice(_BAND_END)}"


def _landmark(rng):
    return f"{_stem(rng)} {rng.choice(_LANDMARK_END)}"


def _event(rng):
    return f"{_stem(rng)} {rng.choice(_EVENT_END)}"


#: Kinds of fictional subject: a name generator, a weight, and groups of relations. An entity gets one
#: relation from each of a seeded subset of its groups (at least one group); relations in one group are
#: alternatives (a town gets a country *or* a region *or* a continent, never two that could disagree).
#: Left out: P36 capital (a fictional country with a real capital contradicts a real fact), P39, P138,
#: P190, P463 (too few real objects to draw from), P413 (positions belong to particular sports).
SYNTHETIC_KINDS: dict[str, tuple[Any, int, list[list[str]]]] = {
    "person": (
        _person,
        6,
        [["P19", "P20", "P937"], ["P27", "P103", "P1412"], ["P106", "P101", "P108", "P140"]],
    ),
    "athlete": (_person, 2, [["P641"], ["P27"], ["P19"]]),
    "musician": (_person, 2, [["P1303", "P136"], ["P27"], ["P19"]]),
    "town": (_place, 3, [["P17", "P131", "P30"], ["P37"]]),
    "company": (_org, 3, [["P159", "P740", "P17"], ["P127"]]),
    "product": (_product, 2, [["P176", "P178"], ["P495"]]),
    "show": (_title, 2, [["P449"], ["P364", "P495"]]),
    "book": (_title, 1, [["P407", "P495"]]),
    "band": (_band, 1, [["P136"], ["P740", "P495"]]),
    "landmark": (_landmark, 2, [["P131", "P17", "P30"]]),
    "event": (_event, 1, [["P276"], ["P17"]]),
}


# ---- subject rules --------------------------------------------------------------------------------
def _words(s: str) -> list[str]:
    return s.lower().split()


def _word_parts(s: str) -> list[str]:
    """The proper word-level prefixes and suffixes of ``s`` (lower case)."""
    w = _words(s)
    return [" ".join(w[:i]) for i in range(1, len(w))] + [" ".join(w[i:]) for i in range(1, len(w))]


def _char_parts(s: str) -> list[str]:
    s = s.lower()
    return [s[:i] for i in range(1, len(s))] + [s[i:] for i in range(1, len(s))]


class Subjects:
    """The subjects used so far (records and set-aside neighbours), with the checks of the stream's rules."""

    def __init__(self):
        self.source: dict[str, str] = {}  # lower-cased subject -> its source
        self.word_parts: set[str] = set()
        self.char_parts: set[str] = set()
        self.pairs: set[tuple[str, str]] = set()  # (subject, relation)

    def allowed(self, subject: str, relation: str, source: str, strict: bool = False) -> bool:
        s = subject.lower().strip()
        if not s or (s, relation) in self.pairs:
            return False
        if s in self.source:  # the same subject again: only in its own source, with another relation
            return self.source[s] == source
        if s in self.word_parts or any(p in self.source for p in _word_parts(s)):
            return False
        return not (strict and (s in self.char_parts or any(p in self.source for p in _char_parts(s))))

    def add(self, subject: str, relation: str | None, source: str) -> None:
        s = subject.lower().strip()
        if s not in self.source:
            self.source[s] = source
            self.word_parts.update(_word_parts(s))
            self.char_parts.update(_char_parts(s))
        if relation is not None:
            self.pairs.add((s, relation))


# ---- facts ----------------------------------------------------------------------------------------
def _real_facts(known_file: str | Path | None) -> list[dict]:
    """Known facts then MQuAKE's, each ``{subject, relation, true, prompt, source, known_id}``; only
    relations with templates here and prompts holding the subject once (or first)."""
    known = load_known(known_file)
    out = []
    for src, facts in (("known", known), ("mquake", mquake_facts(exclude=known))):
        for f in facts:
            rel, subj, prompt = f["relation_id"], f["subject"].strip(), f["prompt"]
            if rel not in RELATIONS or not subj or subj not in prompt:
                continue
            if not prompt.startswith(subj) and prompt.count(subj) != 1:
                continue
            out.append(
                {
                    "subject": subj,
                    "relation": rel,
                    "true": f["attribute"].strip(),
                    "template": prompt.replace(subj, "{}", 1),
                    "source": src,
                    "known_id": f.get("known_id"),
                }
            )
    return out


def _kg_facts() -> tuple[list[dict], dict[str, list[str]]]:
    """The curated graph's triples as facts (one per head and relation), and each relation's tails."""
    from .kg import resolve_graph

    g = resolve_graph("curated")
    facts, seen = [], set()
    tails: dict[str, list[str]] = defaultdict(list)
    for t in g.triples:
        rel = g.relations[t.relation]
        tail = g.name_of(t.tail)
        if tail not in tails[t.relation]:
            tails[t.relation].append(tail)
        if (t.head, t.relation) in seen:
            continue
        seen.add((t.head, t.relation))
        noun = rel.noun
        q, *paras = KG_PHRASES.get(
            t.relation.split("/")[-1],
            (f"What is the {noun} of {{}}?", f"The {noun} of {{}} is", f"{{}}'s {noun} is"),
        )
        facts.append(
            {
                "subject": g.name_of(t.head),
                "relation": t.relation,
                "true": tail,
                "all_true": [g.name_of(x) for x in g.tails(t.head, t.relation)],
                "template": rel.cloze,
                "paraphrases": [p for p in paras if p != rel.cloze] or [f"The {noun} of {{}} is"],
                "question": q,
                "generation": ["{} is", "The story of {}"],
                "source": "kg",
            }
        )
    return facts, tails


def _overlapping(subjects: list[str]) -> set[str]:
    """Subjects (lower case) that are a word-level prefix or suffix of another one of ``subjects``."""
    low = {s.lower() for s in subjects}
    out = set()
    for s in low:
        for p in _word_parts(s):
            if p in low:
                out.update((s, p))
    return out


def _reserve(facts: list[dict], rng: random.Random, avoid: set[str]) -> dict[str, list[dict]]:
    """Per relation, the facts set aside as neighbourhood (never edited): two per object, commonest
    objects first, known facts before MQuAKE's; relations with fewer than 5 facts get none."""
    by_rel: dict[str, list[dict]] = defaultdict(list)
    for f in facts:
        by_rel[f["relation"]].append(f)
    out: dict[str, list[dict]] = {}
    for rel in sorted(by_rel):
        fs = [f for f in by_rel[rel] if f["subject"].lower() not in avoid]
        subjects = {f["subject"].lower() for f in by_rel[rel]}
        if len(subjects) < 5:
            continue
        k = min(RESERVE_MAX, max(3, len(subjects) // 4))
        by_obj: dict[str, list[dict]] = defaultdict(list)
        for f in fs:
            by_obj[f["true"]].append(f)
        objs = sorted(by_obj)
        rng.shuffle(objs)
        objs.sort(key=lambda o: -len(by_obj[o]))
        chosen: list[dict] = []
        taken: set[str] = set()
        for o in objs:
            group = list(by_obj[o])
            rng.shuffle(group)
            group.sort(key=lambda f: f["source"] != "known")
            for f in group:
                if sum(g["true"] == o for g in chosen) >= 2 or len(chosen) >= k:
                    break
                if f["subject"].lower() not in taken:
                    chosen.append(f)
                    taken.add(f["subject"].lower())
            if len(chosen) >= k:
                break
        if len(chosen) >= MIN_NEIGHBOURS + 1:
            out[rel] = chosen
    return out


def _clash(a: str, b: str) -> bool:
    """Whether two answers are the same or one contains the other ("Apple" / "Apple Inc.")."""
    a, b = a.lower().strip(), b.lower().strip()
    return a in b or b in a


def _neighbours(pool: list[dict], true: str | None, new: str, rng: random.Random) -> list[dict]:
    """Up to :data:`MAX_NEIGHBOURS` set-aside facts whose answer is not ``new``: same object first."""
    ok = [f for f in pool if not _clash(f["true"], new)]
    rng.shuffle(ok)
    ok.sort(key=lambda f: true is None or f["true"] != true)
    return ok[:MAX_NEIGHBOURS]


def _new_target(
    rng: random.Random, objects: list[str], avoid: list[str], pool: list[dict], true: str | None
) -> tuple[str, list[dict]] | None:
    """A seeded new object that clashes with none of ``avoid`` and leaves ≥ 2 neighbours."""
    cands = [o for o in objects if not any(_clash(o, a) for a in avoid)]
    rng.shuffle(cands)
    for o in cands:
        nb = _neighbours(pool, true, o, rng)
        if len(nb) >= MIN_NEIGHBOURS:
            return o, nb
    return None


def _record(
    case_id: int,
    source: str,
    subject: str,
    relation: str,
    template: str,
    new: str,
    true: str | None,
    question: str,
    paraphrases: list[str],
    neighbours: list[dict],
    generation: list[str],
    extra: dict | None = None,
) -> dict:
    rw = {
        "prompt": template,
        "relation_id": relation,
        "subject": subject,
        "target_new": {"str": new},
        "target_true": {"str": true} if true is not None else None,
    }
    return {
        "case_id": case_id,
        "source": source,
        **(extra or {}),
        "requested_rewrite": rw,
        "question": question.replace("{}", subject),
        "paraphrase_prompts": [p.replace("{}", subject) for p in paraphrases],
        "neighborhood_prompts": [template.replace("{}", f["subject"]) for f in neighbours],
        "neighborhood_answers": [f["true"] for f in neighbours],
        "generation_prompts": [g.replace("{}", subject) for g in generation],
    }


def _paraphrases(relation: str, template: str, rng: random.Random) -> list[str]:
    ts = [t for t in RELATIONS[relation]["cloze"] if t != template]
    rng.shuffle(ts)
    return ts[:2]


def _generation(relation: str) -> list[str]:
    return [*RELATIONS[relation]["gen"], "{} is"]


def build_lifelong(
    n: int = 10_000, seed: int = 0, known_file: str | Path | None = None
) -> tuple[list[dict], dict]:
    """The first ``n`` records of the stream of ``seed`` and its composition (see the module)."""
    if not isinstance(n, int) or n < 1 or n > MAX_RECORDS:
        raise ConfigError(
            f"--n must be between 1 and {MAX_RECORDS:,} (got {n}): the fictional-name generators are "
            "sized for at most that"
        )
    real = _real_facts(known_file)
    kg_facts, kg_tails = _kg_facts()
    avoid = _overlapping([f["subject"] for f in real + kg_facts])
    reserved = _reserve(real, random.Random(f"{seed}:reserve"), avoid)
    subjects = Subjects()
    for fs in reserved.values():
        for f in fs:
            subjects.add(f["subject"], None, "neighbourhood")
    reserved_ids = {id(f) for fs in reserved.values() for f in fs}
    objects: dict[str, list[str]] = defaultdict(list)
    for f in real:
        if f["true"] not in objects[f["relation"]]:
            objects[f["relation"]].append(f["true"])
    objects = {r: sorted(v) for r, v in objects.items()}

    out: list[dict] = []
    counts = dict.fromkeys(SOURCES, 0)
    skipped: dict[str, int] = defaultdict(int)

    def emit(source: str, rec_args: dict) -> None:
        out.append(_record(len(out), source, **rec_args))
        counts[source] += 1

    # 1-2: the known facts, then MQuAKE's
    for source in ("known", "mquake"):
        rng = random.Random(f"{seed}:{source}")
        facts = [f for f in real if f["source"] == source and id(f) not in reserved_ids]
        rng.shuffle(facts)
        for f in facts:
            if len(out) >= n:
                break
            rel, subj = f["relation"], f["subject"]
            made = (
                _new_target(rng, objects[rel], [f["true"]], reserved[rel], f["true"])
                if rel in reserved and subjects.allowed(subj, rel, source)
                else None
            )
            if made is None:
                skipped[source] += 1
                continue
            subjects.add(subj, rel, source)
            emit(
                source,
                {
                    "subject": subj,
                    "relation": rel,
                    "template": f["template"],
                    "new": made[0],
                    "true": f["true"],
                    "question": QUESTIONS[rel],
                    "paraphrases": _paraphrases(rel, f["template"], rng),
                    "neighbours": made[1],
                    "generation": _generation(rel),
                    "extra": {"known_id": f["known_id"]} if source == "known" else None,
                },
            )

    # 3: the curated knowledge graph (its own set-aside neighbours, relation by relation)
    rng = random.Random(f"{seed}:kg")
    kg_ok = [
        f
        for f in kg_facts
        if f["subject"].lower() not in avoid and f["subject"].lower() not in subjects.source
    ]
    kg_reserved = _reserve(kg_ok, random.Random(f"{seed}:kg-reserve"), set())
    for fs in kg_reserved.values():
        for f in fs:
            subjects.add(f["subject"], None, "neighbourhood")
    kg_reserved_ids = {id(f) for fs in kg_reserved.values() for f in fs}
    facts = [f for f in kg_facts if id(f) not in kg_reserved_ids]
    rng.shuffle(facts)
    for f in facts:
        if len(out) >= n:
            break
        rel, subj = f["relation"], f["subject"]
        key = rel.split("/")[-1]  # birth_country of two domains is one relation for the pair rule
        made = (
            _new_target(rng, sorted(kg_tails[rel]), f["all_true"], kg_reserved[rel], f["true"])
            if rel in kg_reserved and subjects.allowed(subj, key, "kg")
            else None
        )
        if made is None:
            skipped["kg"] += 1
            continue
        subjects.add(subj, key, "kg")
        emit(
            "kg",
            {
                "subject": subj,
                "relation": rel,
                "template": f["template"],
                "new": made[0],
                "true": f["true"],
                "question": f["question"],
                "paraphrases": f["paraphrases"],
                "neighbours": made[1],
                "generation": f["generation"],
            },
        )

    # 4: fictional subjects, new facts (no true answer), until n
    rng = random.Random(f"{seed}:synthetic")
    kinds = sorted(SYNTHETIC_KINDS)
    weights = [SYNTHETIC_KINDS[k][1] for k in kinds]
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * MAX_RECORDS:  # the generators ran dry (cannot happen below MAX_RECORDS)
            raise ConfigError(f"only {len(out)} records could be generated; use a smaller --n")
        kind = rng.choices(kinds, weights)[0]
        make, _, groups = SYNTHETIC_KINDS[kind]
        subj = make(rng)
        if subj.lower() in subjects.source:  # a new entity gets a new name
            continue
        chosen = [g for g in groups if rng.random() < 0.6] or [rng.choice(groups)]
        rels = [rng.choice(g) for g in chosen]
        if not all(subjects.allowed(subj, r, "synthetic", strict=True) for r in rels):
            continue
        for rel in rels:
            if len(out) >= n or rel not in reserved:
                continue
            template = rng.choice(RELATIONS[rel]["cloze"])
            made = _new_target(rng, objects[rel], [], reserved[rel], None)
            if made is None:
                continue
            subjects.add(subj, rel, "synthetic")
            emit(
                "synthetic",
                {
                    "subject": subj,
                    "relation": rel,
                    "template": template,
                    "new": made[0],
                    "true": None,
                    "question": QUESTIONS[rel],
                    "paraphrases": _paraphrases(rel, template, rng),
                    "neighbours": made[1],
                    "generation": _generation(rel),
                    "extra": {"kind": kind},
                },
            )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "n": n,
        "records": len(out),
        "composition": counts,
        "order": list(SOURCES),
        "set_aside_neighbourhood_facts": {
            "real": sum(len(v) for v in reserved.values()),
            "kg": sum(len(v) for v in kg_reserved.values()),
        },
        "skipped_facts": {k: skipped[k] for k in ("known", "mquake", "kg") if skipped[k]},
    }
    return out, meta


# ---- writing and reading -------------------------------------------------------------------------
def dumps_records(records: list[dict]) -> bytes:
    """A JSON list with one record per line (valid JSON, diff- and grep-friendly, ~40 % of indented JSON)."""
    lines = ",\n".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records)
    return ("[\n" + lines + "\n]\n").encode()


def meta_path(out: str | Path) -> Path:
    """The sidecar of a stream file: ``X.json`` -> ``X.meta.json``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".meta.json")


def is_lifelong_output(path: str | Path) -> bool:
    """Whether ``path`` is a stream loka wrote: its sidecar names the format and the file's sha256."""
    path, side = Path(path), meta_path(path)
    try:
        meta = read_json(side, 1 << 20)
        return (
            isinstance(meta, dict)
            and meta.get("format") == FORMAT
            and path.is_file()
            and meta.get("sha256") == sha256_file(path)
        )
    except (InputError, OSError, ValueError):
        return False


def check_lifelong_output(out: str | Path, force: bool = False) -> Path:
    """Before any work: may a stream be written at ``out``? A new path may; a stream loka wrote there
    only with ``force``; anything else (a folder, a link, a file loka did not write) never."""
    out = Path(out)
    if out.suffix != ".json":
        raise ConfigError(f"--out {out}: the stream is a .json file (its sidecar is {meta_path(out).name})")
    return check_output_file(
        out, is_ours=is_lifelong_output, what="a lifelong stream", force=force, companions=(meta_path(out),)
    )


def write_lifelong(records: list[dict], meta: dict, out: str | Path, command: str) -> dict:
    """Write the stream and its sidecar (composition, build command, the stream's sha256)."""
    data = dumps_records(records)
    meta = {
        **meta,
        "command": command,
        "file": Path(out).name,
        "sha256": sha256_bytes(data),
        "bytes": len(data),
    }
    atomic_write_bytes(out, data)
    atomic_write_bytes(meta_path(out), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


# ---- the unedited model's scores -------------------------------------------------------------------
def _round(x: float) -> float:
    return round(float(x), 5)


def baseline_row(handle: ModelHandle, case, scores: dict) -> dict:
    """One line of a baseline file: the case's pre-edit metrics, the mean per-token log-probability of
    the new (and true / the neighbours' own) target on every prompt, and the top next token."""
    import numpy as np

    from ..eval.metrics import case_metrics

    lp = {
        g: {w: [_round(np.mean(sc["token_logprobs"])) for sc in rows] for w, rows in d.items()}
        for g, d in scores.items()
        if not g.startswith("_")
    }
    rw = scores.get("rewrite", {}).get("new", [])
    return {
        "case_id": case.case_id,
        "metrics": {k: _round(v) for k, v in case_metrics(scores, None).items()},
        "top": handle.tokenizer.decode([rw[0]["argmax_ids"][0]]) if rw else None,
        "mean_logprob": lp,
    }


def _read_baseline(path: Path) -> tuple[dict | None, list[dict]]:
    header, rows = None, []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption: it is scored again
            continue
        if i == 0:
            header = obj if isinstance(obj, dict) and obj.get("format") == BASELINE_FORMAT else None
            if header is None:
                break
        else:
            rows.append(obj)
    return header, rows


def check_baseline_output(out: str | Path, resume: bool = False, force: bool = False) -> dict | None:
    """Before any work: may unedited scores be written at ``out``? A new path may; a baseline file loka
    wrote only with ``resume`` (continue it) or ``force`` (replace it); anything else never. Returns the
    existing file's header, if any."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise OutputError(f"{out} is not a regular file: choose another --out")
    if not out.exists():
        check_writable(out.parent if str(out.parent) else Path("."))
        return None
    header, _ = _read_baseline(out)
    if header is None:
        raise OutputError(
            f"{out} is not a baseline file loka wrote; loka never replaces it, even with --force: "
            "choose another --out"
        )
    if not (resume or force):
        raise OutputError(
            f"{out} already holds unedited scores: pass --resume to continue or --force to replace"
        )
    return header


def unedited_scores(
    handle: ModelHandle,
    data: str | Path,
    out: str | Path,
    n: int | None = None,
    resume: bool = False,
    force: bool = False,
    group: int = 4,
    progress: bool = True,
) -> dict:
    """Score the first ``n`` records of ``data`` on the unedited model into ``out`` (JSON lines: a
    header, then one row per record, appended and flushed one by one). ``resume`` continues a file
    of the same model and data (rows already there are kept); ``force`` replaces one loka wrote."""
    from ..eval.data import load_cases
    from ..eval.metrics import score_cases
    from ..utils.progress import bar

    data, out = Path(data), Path(out)
    old = check_baseline_output(out, resume, force)
    cases = load_cases(data, n)
    header = {
        "format": BASELINE_FORMAT,
        "version": VERSION,
        "model": handle.name,
        "data": str(data),
        "data_sha256": sha256_file(data),
    }
    done: set = set()
    if old is not None and resume:
        if (old.get("model"), old.get("data_sha256")) != (header["model"], header["data_sha256"]):
            raise ConfigError(
                f"{out} holds scores of {old.get('model')} on {old.get('data')}, not of {handle.name} on "
                f"{data} as it is now; use another --out"
            )
        _, rows = _read_baseline(out)
        done = {r.get("case_id") for r in rows}
        keep = [json.dumps(old)] + [json.dumps(r) for r in rows]
        atomic_write_bytes(out, ("\n".join(keep) + "\n").encode())  # drops a line cut by an interruption
    else:
        atomic_write_bytes(out, (json.dumps(header) + "\n").encode())
    todo = [c for c in cases if c.case_id not in done]
    with (
        open(out, "a", encoding="utf-8") as f,
        bar(
            total=len(cases),
            desc=f"unedited scores of {handle.name}",
            unit="record",
            disable=not progress,
            initial=len(cases) - len(todo),
        ) as b,
    ):
        for i in range(0, len(todo), group):
            chunk = todo[i : i + group]
            for c, s in zip(chunk, score_cases(handle, chunk)):
                f.write(json.dumps(baseline_row(handle, c, s)) + "\n")
            f.flush()
            b.update(len(chunk))
    _, rows = _read_baseline(out)
    return summarise_baseline(rows, handle.name, out, scored=len(todo))


def summarise_baseline(rows: list[dict], model: str, out: Path, scored: int) -> dict:
    """Mean of each pre-edit metric over the rows that have it (ES/PS: counterfactual records only)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for k, v in r.get("metrics", {}).items():
            sums[k].append(v)
    return {
        "model": model,
        "records": len(rows),
        "scored_now": scored,
        "out": str(out),
        "mean": {k: round(sum(v) / len(v), 4) for k, v in sums.items()},
        "n": {k: len(v) for k, v in sums.items()},
    }
