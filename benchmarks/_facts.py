"""Small fact sets for layer sweeps and speed benchmarks, drawn from loka/data/known_1000.json."""

from __future__ import annotations

import json
import random
from collections import defaultdict

from loka import EditRequest
from loka.resources import data_dir

DATA = data_dir() / "known_1000.json"


def counterfactual_requests(n: int, seed: int = 0, n_neighbours: int = 3) -> list[EditRequest]:
    """``n`` requests: a known fact, a new object seen with the same relation, same-relation neighbours."""
    facts = json.loads(DATA.read_text())
    by_rel = defaultdict(list)
    for f in facts:
        by_rel[f["relation_id"]].append(f)
    rng = random.Random(seed)
    pool = [f for f in facts if len({g["attribute"] for g in by_rel[f["relation_id"]]}) > 1]
    rng.shuffle(pool)
    out, seen = [], set()
    for f in pool:
        if len(out) == n:
            break
        if f["subject"] in seen or f["subject"] not in f["prompt"]:
            continue
        seen.add(f["subject"])
        others = [g for g in by_rel[f["relation_id"]] if g["attribute"] != f["attribute"]]
        new = rng.choice(others)["attribute"]
        neigh = [
            g for g in by_rel[f["relation_id"]] if g["subject"] != f["subject"] and g["attribute"] != new
        ]
        neigh = rng.sample(neigh, min(n_neighbours, len(neigh)))
        out.append(
            EditRequest(
                prompt=f["prompt"].replace(f["subject"], "{}", 1),
                subject=f["subject"],
                target_new=new,
                target_true=f["attribute"],
                paraphrases=[
                    f"Here is a fact. {f['prompt']}",
                    f"According to the encyclopedia, {f['prompt']}",
                ],
                neighborhood=[g["prompt"] for g in neigh],
                case_id=f["known_id"],
                relation_id=f["relation_id"],
            )
        )
        out[-1].neighborhood_true = [g["attribute"] for g in neigh]  # type: ignore[attr-defined]
    return out
