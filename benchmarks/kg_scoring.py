"""How well does the unedited model answer the KnowledgeSmith probes, as MMLU letters or as cloze
options? (Why ``loka kg run`` scores cloze options by default on small models.)

    python benchmarks/kg_scoring.py --scale 30

For each level: the probes of ``--scale`` forget interventions (the pre-update truth is each probe's
``original`` option), the accuracy of the true option under both scorings by probe type, against
the 0.25 of a random choice. Writes ``benchmarks/results/kg_scoring_<model>.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

from loka.bench.kg import resolve_graph
from loka.bench.probes import generate_probes
from loka.eval.kg_runner import choose
from loka.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scale", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = resolve_graph("curated")
    h = load_model(args.model)
    started = stamp()
    res: dict = {"model": args.model, "scale": args.scale, "levels": {}}
    print(f"{'level':13s} {'probe':11s} {'n':>5s} {'cloze acc':>9s} {'MC letter acc':>13s}")
    for level in ("root", "intermediate", "leaf"):
        _, probes = generate_probes(g, level, args.scale, "forget", args.seed)
        probes = [p for p in probes if p.original is not None]
        acc = {}
        for scoring in ("cloze", "mc"):
            picks = choose(h, probes, scoring)
            by: dict[str, list[float]] = defaultdict(list)
            for p, c in zip(probes, picks):
                by[p.type].append(float(c == p.original))
                by["all"].append(float(c == p.original))
            acc[scoring] = {t: sum(v) / len(v) for t, v in by.items()}
        res["levels"][level] = {
            t: {
                "n": sum(1 for p in probes if t in ("all", p.type)),
                "cloze": acc["cloze"][t],
                "mc": acc["mc"][t],
            }
            for t in acc["cloze"]
        }
        for t, r in res["levels"][level].items():
            print(f"{level:13s} {t:11s} {r['n']:5d} {r['cloze']:9.3f} {r['mc']:13.3f}", flush=True)
    write_result(f"benchmarks/results/kg_scoring_{args.model}.json", res, provenance=started)


if __name__ == "__main__":
    main()
