"""CounterFact-style results table: unedited, ROME (single), MEMIT (batch), … on generated records.

    python benchmarks/eval_counterfact.py --model smollm2-135m --n 200 --memit-batch 100

Builds the records with ``loka data counterfact`` logic if missing, runs ``loka eval`` for each row
(resumable: rerun the same command after an interruption), prints a markdown table and writes
``benchmarks/results/eval_counterfact_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import loka
from loka.bench.counterfact import build_counterfact, load_known
from loka.eval.data import load_cases
from loka.eval.metrics import TABLE
from loka.eval.runner import EvalConfig, run_eval
from loka.utils.io import atomic_write_json

#: the summary score S, then the runner's table without the columns these records cannot fill
COLS = ["S", *(c for c in TABLE if c not in ("portability", "multihop"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--memit-batch", type=int, default=100, help="batch size of the --batch-rows methods")
    ap.add_argument("--batch-rows", nargs="+", default=["memit", "lora"], help="methods run in batch mode")
    ap.add_argument("--data", default="data/generated/cf_all_300.json")
    ap.add_argument("--rows", nargs="+", default=["none", "rome", "memit"])
    ap.add_argument("--generation", action="store_true")
    ap.add_argument("--out", default="out/eval")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.exists():
        atomic_write_json(data, build_counterfact(load_known(), 300, seed=0))
    cases = load_cases(data, args.n)
    handle = loka.load_model(args.model)
    table = {}
    for row in args.rows:
        mode, bs = ("batch", args.memit_batch) if row in args.batch_rows else ("single", 1)
        cfg = EvalConfig(method=row, mode=mode, batch_size=bs, generation=args.generation)
        out = Path(args.out) / f"{handle.name}-{row}-{mode}{bs if mode == 'batch' else ''}-n{args.n}"
        s = run_eval(handle, cases, cfg, out, resume=(out / "config.json").exists())
        label = (
            "unedited"
            if row == "none"
            else f"{row.upper()} ({'batch ' + str(bs) if mode == 'batch' else 'single'})"
        )
        table[label] = {
            **s["post"],
            "guard": s.get("guard_post", s.get("guard_pre") if row == "none" else None),
            "seconds": s["seconds"],
        }
        print(label, json.dumps(table[label]), flush=True)
    print(f"\n| {args.model}, {args.n} records | " + " | ".join(COLS) + " |")
    print("|---" * (len(COLS) + 1) + "|")
    for label, r in table.items():
        print(f"| {label} | " + " | ".join(f"{r[c]:.3f}" if c in r else "–" for c in COLS) + " |")
    res = Path("benchmarks/results") / f"eval_counterfact_{args.model}.json"
    old = json.loads(res.read_text()) if res.exists() else {}
    if old.get("n") == args.n and old.get("data") == str(data):  # same records: add to the earlier rows
        table = {**old.get("rows", {}), **table}
    atomic_write_json(res, {"model": args.model, "n": args.n, "data": str(data), "rows": table})


if __name__ == "__main__":
    main()
