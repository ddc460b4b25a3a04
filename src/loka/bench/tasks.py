"""Known-facts unlearning tasks: forget, retain and joint edit + forget sets (LOKA's two settings).

Input: CounterFact-format records built from facts the model gets right (``loka data counterfact
--known-by``). Every record is one known fact ``(s, r, o)`` with paraphrase prompts and a
same-relation counterfactual object. A task splits the records into disjoint subject sets:

* ``forget``: facts whose true object must go (:class:`~loka.requests.ForgetRequest`);
* ``edit``: facts rewritten to their ``target_new`` (CounterFact records, so they can be evaluated);
* ``retain``: facts kept during training (:class:`~loka.requests.RetainRequest`);
* ``remaining``: held-out known facts, never trained on, that should still be answered.

Settings (LOKA, arXiv 2502.00158): **in-profile** — edit and forget facts share their relations (the
edits ask the model to change answers of the very relations it must forget; the conflicting case);
**out-profile** — edit and forget relations are disjoint. Each fact also carries ``perturbed``: up
to three other objects of its relation, the wrong answers of the truth ratio.
"""

from __future__ import annotations

import random
from collections import defaultdict

from ..errors import LokaError


def _rw(rec: dict) -> dict:
    return rec["requested_rewrite"]


def _obj(x) -> str:
    return x["str"] if isinstance(x, dict) else x


def _fact(rec: dict, perturbed: list[str]) -> dict:
    rw = _rw(rec)
    return {
        "prompt": rw["prompt"],
        "subject": rw["subject"],
        "answer": _obj(rw["target_true"]),
        "paraphrases": list(rec.get("paraphrase_prompts", [])),
        "perturbed": perturbed,
        "case_id": rec.get("case_id"),
        "relation_id": rw.get("relation_id"),
    }


def build_tasks(
    records: list[dict], setting: str, n_edit: int, n_forget: int, n_retain: int, seed: int = 0
) -> dict:
    """Split known-fact records into ``edit`` / ``forget`` / ``retain`` / ``remaining`` for ``setting``
    (``"in"`` or ``"out"`` profile). Raises when the records cannot fill the sizes asked."""
    if setting not in ("in", "out"):
        raise LokaError(f"setting must be 'in' or 'out' (profile), got {setting!r}")
    for i, r in enumerate(records):
        if "requested_rewrite" not in r:
            raise LokaError(f"record {i}: not a CounterFact record (no 'requested_rewrite')")
    rng = random.Random(seed)
    by_rel: dict[str, list[dict]] = defaultdict(list)
    objects: dict[str, set[str]] = defaultdict(set)
    for r in records:
        rel = _rw(r).get("relation_id") or "?"
        by_rel[rel].append(r)
        objects[rel].add(_obj(_rw(r)["target_true"]))
        objects[rel].add(_obj(_rw(r)["target_new"]))
    rels = sorted(by_rel, key=lambda k: (-len(by_rel[k]), k))
    for rel in rels:
        rng.shuffle(by_rel[rel])
    edit, forget = [], []
    if setting == "in":  # within each relation, facts alternate between the forget and the edit side
        for rel in rels:
            keep = []
            for k, f in enumerate(by_rel[rel]):
                if k % 2 == 0 and len(forget) < n_forget:
                    forget.append(f)
                elif k % 2 == 1 and len(edit) < n_edit:
                    edit.append(f)
                else:
                    keep.append(f)
            by_rel[rel] = keep
            if len(forget) >= n_forget and len(edit) >= n_edit:
                break
    else:  # each relation goes whole to one side: the side that still needs more facts
        for rel in rels:
            need_f, need_e = n_forget - len(forget), n_edit - len(edit)
            if need_f <= 0 and need_e <= 0:
                break
            take, k = (forget, need_f) if need_f >= need_e else (edit, need_e)
            take += by_rel[rel][:k]
            by_rel[rel] = by_rel[rel][k:]
    if len(forget) < n_forget or len(edit) < n_edit:
        raise LokaError(
            f"{len(records)} records give only {len(forget)} forget and {len(edit)} edit facts for the "
            f"{setting}-profile setting; ask for fewer (--n-forget/--n-edit)"
        )
    used = {id(r) for r in forget + edit}
    rest = [r for rel in rels for r in by_rel[rel] if id(r) not in used]
    rng.shuffle(rest)
    if len(rest) < n_retain + 1:
        raise LokaError(f"only {len(rest)} records are left for retain + remaining; lower --n-retain")
    retain, remaining = rest[:n_retain], rest[n_retain:]

    def pert(rec):
        rel = _rw(rec).get("relation_id") or "?"
        wrong = sorted(objects[rel] - {_obj(_rw(rec)["target_true"])})
        return rng.sample(wrong, min(3, len(wrong)))

    return {
        "setting": setting,
        "seed": seed,
        "edit": edit,
        "forget": [_fact(r, pert(r)) for r in forget],
        "retain": [_fact(r, pert(r)) for r in retain],
        "remaining": [_fact(r, pert(r)) for r in remaining],
        "relations": {
            "edit": sorted({_rw(r).get("relation_id") for r in edit}),
            "forget": sorted({_rw(r).get("relation_id") for r in forget}),
        },
    }
