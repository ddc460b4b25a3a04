"""CounterFact-format records built from ``known_1000.json``, the way CounterFact itself was built.

For a known fact (s, r, o): ``target_new`` is another object seen with relation r; paraphrase prompts
use other templates of r; neighbourhood prompts are other subjects with the same relation *and* the
same true object o (so the edit must not move them to the new object); attribute prompts are
subjects whose true object is the new one; generation prompts are open prompts about s.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import LokaError
from ..relations import RELATIONS
from ..resources import data_dir
from ..utils.io import read_json
from ..utils.progress import track

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

DATA = data_dir()  # the package data (loka/data)


def load_known(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else DATA / "known_1000.json"
    if not path.exists():
        raise LokaError(f"known-facts file {path} not found")
    facts = read_json(path)
    for i, f in enumerate(facts):
        missing = [k for k in ("subject", "attribute", "prompt", "relation_id") if k not in f]
        if missing:
            raise LokaError(f"{path}[{i}]: missing field(s) {missing}")
    return facts


def mquake_facts(path: str | Path | None = None, exclude: list[dict] | None = None) -> list[dict]:
    """The true single-hop facts of MQuAKE (``orig.triples_labeled`` and each rewrite's true target) whose
    relation has templates here, as known-facts records (prompt: the relation's first cloze template).

    Why: the 1,209 known facts give at most 920 CounterFact records; with MQuAKE's 608 further facts
    (other subjects of the same relations) a 1,000-edit lifelong run has 1,000 distinct records.
    Facts whose (subject, relation) is already in ``exclude`` are left out; ``known_id`` is None.
    """
    path = Path(path) if path else DATA / "mquake" / "MQuAKE-hard.json"
    if not path.exists():
        raise LokaError(f"MQuAKE file {path} not found")
    seen = {(f["subject"], f["relation_id"]) for f in exclude or []}
    out: dict[tuple[str, str], dict] = {}

    def add(subject: str, rel: str, obj: str) -> None:
        if rel in RELATIONS and (subject, rel) not in seen and (subject, rel) not in out and subject and obj:
            out[(subject, rel)] = {
                "subject": subject,
                "attribute": obj,
                "relation_id": rel,
                "known_id": None,
                "prompt": RELATIONS[rel]["cloze"][0].replace("{}", subject),
                "source": "mquake",
            }

    for i, case in enumerate(read_json(path)):
        try:
            for (_, rel, _), (subj, _, obj) in zip(case["orig"]["triples"], case["orig"]["triples_labeled"]):
                add(subj, rel, obj)
            for rw in case["requested_rewrite"]:
                add(rw["subject"], rw["relation_id"], rw["target_true"]["str"])
        except (KeyError, TypeError, ValueError) as e:
            raise LokaError(f"{path}[{i}]: not an MQuAKE record ({e})") from e
    return list(out.values())


@torch.no_grad()
def facts_known_by(handle: ModelHandle, facts: list[dict], batch_size: int = 32) -> list[dict]:
    """The facts whose greedy continuation starts with the true object."""
    from ..scoring import generate

    keep = []
    for s in track(range(0, len(facts), batch_size), desc=f"which facts {handle.name} knows", unit="batch"):
        chunk = facts[s : s + batch_size]
        outs = generate(handle, [f["prompt"] for f in chunk], max_new_tokens=6)
        for f, o in zip(chunk, outs):
            if o.strip().lower().startswith(f["attribute"].strip().lower()):
                keep.append(f)
    return keep


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject)


def build_counterfact(
    facts: list[dict],
    n: int | None = None,
    seed: int = 0,
    *,
    all_facts: list[dict] | None = None,
    min_neighbours: int = 5,
    max_neighbours: int = 10,
    min_subjects: int = 3,
) -> list[dict]:
    """Records for up to ``n`` of ``facts`` (those with enough same-object neighbours), seeded.

    ``all_facts`` (default: ``facts``) supplies the objects and neighbours, so that filtering the
    edited facts (e.g. to what a model knows) does not shrink the neighbourhoods. A fact needs
    ``min_subjects`` distinct same-relation, same-object neighbours (3 gives 757 records from the
    1,209 known facts; 1 gives more, with neighbourhoods filled by further phrasings).
    """
    pool = all_facts if all_facts is not None else facts
    rng = random.Random(seed)
    objects = defaultdict(set)
    same = defaultdict(list)
    for f in pool:
        objects[f["relation_id"]].add(f["attribute"])
        same[(f["relation_id"], f["attribute"])].append(f)
    order = list(facts)
    rng.shuffle(order)
    out = []
    for f in order:
        if n is not None and len(out) >= n:
            break
        rel, subj, true = f["relation_id"], f["subject"], f["attribute"]
        if (
            rel not in RELATIONS
            or subj not in f["prompt"]
            or not f["prompt"].startswith(subj)
            and f["prompt"].count(subj) != 1
        ):
            continue
        choices = sorted(objects[rel] - {true})
        siblings = [g for g in same[(rel, true)] if g["subject"] != subj]
        if not choices or len({g["subject"] for g in siblings}) < min_subjects:
            continue
        new = rng.choice(choices)
        tmpls = RELATIONS[rel]["cloze"]
        edit_prompt = f["prompt"].replace(subj, "{}", 1)
        para_t = [t for t in tmpls if t != edit_prompt]
        rng.shuffle(para_t)
        paraphrases = [_fill(t, subj) for t in para_t[:2]]
        rng.shuffle(siblings)
        neigh = []
        for t in [edit_prompt, *tmpls]:  # distinct subjects first, then more phrasings
            for g in siblings:
                p = _fill(t, g["subject"])
                if p not in neigh:
                    neigh.append(p)
                if len(neigh) >= max_neighbours:
                    break
            if len(neigh) >= max_neighbours:
                break
        if len(neigh) < min_neighbours:
            continue
        attr_subjects = [g["subject"] for g in same[(rel, new)] if g["subject"] != subj]
        rng.shuffle(attr_subjects)
        attribute_prompts = [_fill(tmpls[0], s) for s in attr_subjects[:5]]
        gen = [_fill(t, subj) for t in RELATIONS[rel]["gen"]] + [f"{subj} is", f"The story of {subj}"]
        out.append(
            {
                "case_id": len(out),
                "known_id": f.get("known_id"),
                "requested_rewrite": {
                    "prompt": edit_prompt,
                    "relation_id": rel,
                    "subject": subj,
                    "target_new": {"str": new},
                    "target_true": {"str": true},
                },
                "paraphrase_prompts": paraphrases,
                "neighborhood_prompts": neigh,
                "attribute_prompts": attribute_prompts,
                "generation_prompts": gen,
            }
        )
    return out
