"""Evaluation throughput: CounterFact records per second for the probability metrics (every prompt of
a record scored with the new and the true target in one packed forward). Prints a table, writes JSON.

    python benchmarks/eval_throughput.py --model smollm2-135m --n 60

Rows: the scoring modes of ``loka.scoring`` in float32 (``full`` = one padded row per
(prompt, target), the method before packing), ``flat`` packing (one tree per prompt: a prompt and
its target branches) for one record per call and four records per call (``score_cases``, how the
runner scores batches and sequential checkpoints), the same with oneDNN-prepacked linear weights
(``loka.fastlinear``), the token tree (``packed``, the default: prefixes shared across the prompts
of the call run once), and the token tree with the model cast to bfloat16, with the largest and
mean |Δ log p| against the first row. Target: >= 4 records/s on SmolLM2 (2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result

import loka
from loka.eval.data import load_cases
from loka.eval.metrics import score_case, score_cases
from loka.fastlinear import packed_linears


def _flat(s: dict) -> list[float]:
    return [x for g in s.values() for v in g.values() for r in v for x in r["token_logprobs"]]


def _run(handle, cases, mode: str, per_call: int = 1):
    t = time.time()
    scores = []
    for i in range(0, len(cases), per_call):
        scores += score_cases(handle, cases[i : i + per_call], mode=mode)
    return scores, time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/generated/cf_all_300.json")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    started = stamp()
    cases = load_cases(args.data, args.n)
    tok = handle.tokenizer
    rows_per = sum(2 * len(c.rewrite + c.paraphrase + c.neighborhood) for c in cases) / len(cases)
    prompt_tokens = sum(
        len(tok(p)["input_ids"]) for c in cases for p in c.rewrite + c.paraphrase + c.neighborhood
    )
    fed: dict[str, int] = {}
    hook = handle.model.register_forward_pre_hook(
        lambda m, a, kw: fed.__setitem__("n", fed.get("n", 0) + kw["input_ids"].numel()), with_kwargs=True
    )
    ref = None
    results = []
    fast = packed_linears(handle)
    for label, mode, dtype, per, prepack in [
        ("full rows, float32", "full", torch.float32, 1, False),
        ("flat packed, float32", "flat", torch.float32, 1, False),
        ("flat packed x4 records", "flat", torch.float32, 4, False),
        ("flat x4, prepacked weights", "flat", torch.float32, 4, True),
        ("token tree x4, prepacked", "packed", torch.float32, 4, True),
        ("token tree x4, bfloat16", "packed", torch.bfloat16, 4, False),
    ]:
        handle.model.to(dtype)
        fast.enabled = prepack
        score_case(handle, cases[0], mode=mode)  # warm-up
        fed["n"] = 0
        scores, sec = _run(handle, cases, mode, per)
        row = {
            "scoring": label,
            "records": len(cases),
            "seconds": round(sec, 2),
            "records_per_s": round(len(cases) / sec, 2),
            "rows_per_record": rows_per,
            "prompt_tokens_per_s": round(prompt_tokens / sec),
            "tokens_fed_per_record": round(fed["n"] / len(cases), 1),
        }
        if ref is None:
            ref = scores
        else:
            d = [abs(a - b) for r, g in zip(ref, scores) for a, b in zip(_flat(r), _flat(g))]
            row["max_abs_dlogp"], row["mean_abs_dlogp"] = round(max(d), 5), round(sum(d) / len(d), 5)
        results.append(row)
    hook.remove()
    print(
        f"{'scoring':28s} {'records':>7s} {'seconds':>8s} {'rec/s':>6s} {'rows/rec':>8s} {'fed/rec':>7s} {'tok/s':>6s} "
        f"{'max|dlogp|':>10s} {'mean|dlogp|':>11s}"
    )
    for r in results:
        print(
            f"{r['scoring']:28s} {r['records']:7d} {r['seconds']:8.1f} {r['records_per_s']:6.2f} {r['rows_per_record']:8.1f} "
            f"{r['tokens_fed_per_record']:7.1f} {r['prompt_tokens_per_s']:6d} {r.get('max_abs_dlogp', 0):10.5f} "
            f"{r.get('mean_abs_dlogp', 0):11.5f}"
        )
    write_result(
        args.out, {"model": args.model, "target": ">= 4 records/s", "rows": results}, provenance=started
    )


if __name__ == "__main__":
    main()
