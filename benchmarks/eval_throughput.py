"""Evaluation throughput: CounterFact records per second for the probability metrics (all prompts of
a record, with the new and the true target, scored in one batched forward). Prints a table, writes JSON.

    python benchmarks/eval_throughput.py --model smollm2-135m --n 40

Target: >= 4 records/s on SmolLM2 (2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import loka
from loka.eval.data import load_cases
from loka.eval.metrics import score_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_all_300.json")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    cases = load_cases(args.data, args.n)
    score_case(handle, cases[0])  # warm-up
    t = time.time()
    rows = tokens = 0
    for c in cases:
        s = score_case(handle, c)
        rows += sum(len(v) for g in s.values() for v in g.values())
    sec = time.time() - t
    for c in cases:
        tokens += sum(len(handle.tokenizer(p)["input_ids"]) for p in c.rewrite + c.paraphrase + c.neighborhood) * 2
    res = {"model": args.model, "records": len(cases), "seconds": round(sec, 2), "records_per_s": round(len(cases) / sec, 2),
           "rows_per_record": rows / len(cases), "prompt_tokens_per_s": round(tokens / sec), "target": ">= 4 records/s"}
    print(f"{'model':14s} {'records':>7s} {'seconds':>8s} {'rec/s':>6s} {'rows/rec':>8s} {'tok/s':>6s}")
    print(f"{args.model:14s} {len(cases):7d} {sec:8.1f} {res['records_per_s']:6.2f} {res['rows_per_record']:8.1f} {res['prompt_tokens_per_s']:6d}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
