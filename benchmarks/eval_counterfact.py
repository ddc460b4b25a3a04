"""CounterFact-style results table: unedited, ROME (single), MEMIT (batch), … on generated records.

    python benchmarks/eval_counterfact.py --model smollm2-135m --n 200 --memit-batch 100

Builds the records with ``loka data counterfact`` logic if missing, runs ``loka eval`` for each row
(resumable: rerun the same command after an interruption), prints a markdown table and writes
``benchmarks/results/eval_counterfact_<model>.json`` (rows of an earlier run on the same records are
kept; each row carries the provenance of the run that measured it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import merge_rows, stamp, write_result

import loka
from loka.bench.counterfact import build_counterfact, load_known
from loka.eval.data import load_cases
from loka.eval.metrics import TABLE
from loka.eval.runner import EvalConfig, run_eval
from loka.utils.io import atomic_write_json

#: the summary score S, then the runner's table without the columns these records cannot fill
COLS = ["S", *(c for c in TABLE if c not in ("portability", "multihop"))]


def result(path: Path, head: dict, rows: dict, provenance: dict) -> dict:
    """The payload to write to ``path``: ``head`` (model, n, data) with this run's ``rows``, stamped
    with ``provenance``, added to the rows already in ``path`` when those were scored on the same
    records (same ``n`` and ``data``)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    same = old.get("n") == head["n"] and old.get("data") == head["data"]
    return {**head, "rows": merge_rows(old.get("rows") if same else {}, rows, provenance)}


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
    started = stamp()
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
    head = {"model": args.model, "n": args.n, "data": str(data)}
    write_result(res, result(res, head, table, started), provenance=started)


if __name__ == "__main__":
    main()
