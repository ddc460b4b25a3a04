"""Unlearning on the known-facts forget task: every forget method on facts the model really knows.

    python benchmarks/unlearn_known.py --model smollm2-135m --n-forget 100

Data: ``data/generated/cf_smollm2.json`` (CounterFact records built from the facts SmolLM2 answers
correctly; ``loka data counterfact --known-by``). The first ``n_forget`` records' true facts are
forgotten; the next ``n_retain`` are the retain set used in training; the rest are held out.
Per method (each on the unedited model, reverted afterwards):

* forget efficacy: share of forget prompts whose true answer is no longer an exact match (teacher
  forcing, every answer token argmax), and the mean normalised probability P̄ of that answer;
* paraphrase forget: the same on the records' paraphrase prompts;
* retain: exact-match rate on the held-out known facts and on the forget records' neighbourhood
  prompts (other subjects with the same true object), before → after;
* the general-ability guard (held-out perplexity, TOFU real-authors / world-facts multiple choice);
* training steps, whether the forget target was met (early stop) and seconds.

Prints one table and writes ``benchmarks/results/unlearn_known_<model>.json`` (rows of an earlier run
of the same task are kept; each row carries the provenance of the run that measured it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import merge_rows, stamp, write_result

import loka
from loka.cli.common import parse_overrides
from loka.eval.guard import general_guard
from loka.forgetting.metrics import answer_stats
from loka.requests import ForgetRequest, RetainRequest, request_from_record

#: every registered method made for forgetting, in registration order
METHODS = [name for name, m in loka.METHODS.items() if m.primary == "forget"]


def _em(handle, prompts, answers) -> tuple[float, float]:
    rows = answer_stats(handle, prompts, answers)
    return (sum(r["em"] for r in rows) / len(rows), sum(r["p_norm"] for r in rows) / len(rows))


def measure(handle, forget, held, neigh) -> dict:
    f_em, f_p = _em(handle, [r.text for r in forget], [r.target_true for r in forget])
    para = [(p, r.target_true) for r in forget for p in r.paraphrases]
    p_em, p_p = _em(handle, [p for p, _ in para], [a for _, a in para])
    h_em, _ = _em(handle, [r.text for r in held], [r.target_new for r in held])
    n_em, _ = _em(handle, [p for p, _ in neigh], [a for _, a in neigh])
    return {
        "forget_em": f_em,
        "forget_p": f_p,
        "para_em": p_em,
        "para_p": p_p,
        "heldout_em": h_em,
        "neigh_em": n_em,
        **general_guard(handle),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_smollm2.json")
    ap.add_argument("--n-forget", type=int, default=100)
    ap.add_argument("--n-retain", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter override for every method",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    recs = json.loads(Path(args.data).read_text())
    forget = [request_from_record(r, f"cf[{i}]", ForgetRequest) for i, r in enumerate(recs[: args.n_forget])]
    rest = recs[args.n_forget :]

    def as_keep(r):
        return RetainRequest(
            r["requested_rewrite"]["prompt"],
            r["requested_rewrite"]["subject"],
            r["requested_rewrite"]["target_true"]["str"],
            case_id=r["case_id"],
        )

    retain = [as_keep(r) for r in rest[: args.n_retain]]
    held = [as_keep(r) for r in rest[args.n_retain :]]
    neigh = [(p, r.target_true) for r in forget for p in r.neighborhood[:2]]
    over = parse_overrides(args.set)
    handle = loka.load_model(args.model)
    started = stamp()
    res = {
        "model": args.model,
        "n_forget": len(forget),
        "n_retain": len(retain),
        "n_heldout": len(held),
        "overrides": over,
        "rows": {},
    }
    t = time.time()
    res["rows"]["unedited"] = measure(handle, forget, held, neigh)
    res["rows"]["unedited"]["seconds"] = 0.0
    print("unedited", json.dumps(res["rows"]["unedited"]), f"({time.time() - t:.0f}s to measure)", flush=True)
    for m in args.methods:
        t = time.time()
        art = loka.unlearn(handle, forget, retain, m, over)
        sec = time.time() - t
        row = measure(handle, forget, held, neigh)
        ex = art.manifest["extra"]
        row.update(seconds=round(sec, 1), steps=ex.get("steps"), stopped_early=bool(ex.get("stopped_early")))
        art.revert(handle)
        res["rows"][m] = row
        print(m, json.dumps(row), flush=True)
    out = Path(args.out or f"benchmarks/results/unlearn_known_{args.model}.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    # the same task and overrides: keep the rows of earlier runs (e.g. --methods relearn)
    same = all(old.get(k) == res[k] for k in ("model", "n_forget", "n_retain", "n_heldout", "overrides"))
    res["rows"] = merge_rows(old.get("rows") if same else {}, res["rows"], started)
    write_result(out, res, provenance=started)
    print(
        f"\n| {args.model}: forget {len(forget)} known facts, retain {len(retain)}, held out {len(held)} | "
        "forget EM | forget P̄ | paraphrase EM | held-out EM | neighbour EM | ppl | MC authors | MC world | steps | s |"
    )
    print("|---" * 11 + "|")
    for name, r in res["rows"].items():
        print(
            f"| {name} | {r['forget_em']:.3f} | {r['forget_p']:.3f} | {r['para_em']:.3f} | {r['heldout_em']:.3f} | "
            f"{r['neigh_em']:.3f} | {r['ppl']:.1f} | {r['mc_real_authors']:.2f} | {r['mc_world_facts']:.2f} | "
            f"{r.get('steps', '–')}{'*' if r.get('stopped_early') else ''} | {r['seconds']:.0f} |"
        )
    print("\n(* the forget target was met and training stopped early)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
