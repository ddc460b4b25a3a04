"""Choose edit layers by sweeping: ROME at each candidate layer (and MEMIT windows) on known facts.

For each setting: efficacy (P(new) > P(true) on the edit prompt), generalisation (same on two
context-prefixed prompts), specificity (same-relation neighbours keep P(true) > P(new)), their
harmonic mean, and seconds per edit. Prints a table and writes JSON. Evidence for configs/.

    python benchmarks/layer_sweep.py --model smollm2-135m --layers 2 4 6 8 10 12 15 --n 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _facts import counterfactual_requests
from _stamp import stamp, write_result

import loka


def score(handle, reqs) -> dict:
    es, gs, ns = [], [], []
    for r in reqs:
        prompts = [r.text, *r.paraphrases]
        new = loka.target_logprobs(handle, prompts, [r.target_new] * len(prompts))
        old = loka.target_logprobs(handle, prompts, [r.target_true] * len(prompts))
        es.append(new[0]["mean_logprob"] > old[0]["mean_logprob"])
        gs += [a["mean_logprob"] > b["mean_logprob"] for a, b in zip(new[1:], old[1:])]
        tn = loka.target_logprobs(handle, r.neighborhood, [r.target_new] * len(r.neighborhood))
        tt = loka.target_logprobs(handle, r.neighborhood, r.neighborhood_true)
        ns += [b["mean_logprob"] > a["mean_logprob"] for a, b in zip(tn, tt)]
    m = {k: sum(v) / len(v) for k, v in (("ES", es), ("GS", gs), ("NS", ns))}
    m["score"] = 3 / sum(1 / max(v, 1e-9) for v in m.values())
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 15])
    ap.add_argument(
        "--memit-windows", type=int, nargs="*", default=[], help="first layer of 5-layer MEMIT windows"
    )
    ap.add_argument(
        "--memit-weights", type=float, nargs="+", default=[15000.0], help="MEMIT λ values to try per window"
    )
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/layer_sweep.json")
    args = ap.parse_args()
    handle = loka.load_model(args.model)
    started = stamp()
    reqs = counterfactual_requests(args.n, seed=1)
    rows = [{"setting": "unedited", **score(handle, reqs), "sec_per_edit": 0.0}]
    for layer in args.layers:
        per = []
        res = {"ES": [], "GS": [], "NS": []}
        for r in reqs:
            t = time.time()
            art = loka.edit(handle, r, "rome", {"layer": layer}, progress=False)
            per.append(time.time() - t)
            s = score(handle, [r])
            art.revert(handle)
            for k in res:
                res[k].append(s[k])
        m = {k: sum(v) / len(v) for k, v in res.items()}
        m["score"] = 3 / sum(1 / max(v, 1e-9) for v in m.values())
        rows.append({"setting": f"rome L{layer}", **m, "sec_per_edit": statistics.median(per)})
        print(rows[-1], flush=True)
    for first in args.memit_windows:
        for lam in args.memit_weights:
            layers = list(range(first, first + 5))
            t = time.time()
            art = loka.edit(
                handle, reqs, "memit", {"layers": layers, "mom2_update_weight": lam}, progress=False
            )
            sec = (time.time() - t) / len(reqs)
            rows.append(
                {
                    "setting": f"memit L{layers[0]}-{layers[-1]} λ{lam:g} (batch {len(reqs)})",
                    **score(handle, reqs),
                    "sec_per_edit": sec,
                }
            )
            art.revert(handle)
            print(rows[-1], flush=True)
    print(f"\n{'setting':32s} {'ES':>6s} {'GS':>6s} {'NS':>6s} {'score':>6s} {'s/edit':>7s}")
    for r in rows:
        print(
            f"{r['setting']:32s} {r['ES']:6.2f} {r['GS']:6.2f} {r['NS']:6.2f} {r['score']:6.2f} {r['sec_per_edit']:7.2f}"
        )
    write_result(args.out, {"model": args.model, "n": args.n, "rows": rows}, provenance=started)


if __name__ == "__main__":
    main()
