"""KnowledgeSmith study (ICLR 2026) on the curated four-domain graph: editing (AlphaEdit) against
unlearning (NPO by default; ``--forget-methods npo relearn`` adds the paper's ReLearn) at the root, intermediate and leaf levels and scales 1 / 10 / 100.

    python benchmarks/knowledgesmith.py                       # the README's study (about an hour on 2 cores)
    python benchmarks/knowledgesmith.py --scales 1 10 --levels leaf   # a quick look

Each setting is one ``loka kg run`` (the same code path) into ``out/kg_study/METHOD-LEVEL-K``; a
setting whose ``summary.json`` exists is not run again, so an interrupted study resumes. Settings run
smallest scale first. At the end: a table per question the issue asks (over/under-spreading,
consistency–capacity, domains, SVD geometry), ``benchmarks/results/knowledgesmith_<model>.json``,
the self-contained ``knowledgesmith_<model>.html`` report and its PNG plots. Each run folder gets a
``provenance.json`` (the stamp of the invocation that ran it), which its row in the JSON carries: the
rows of a resumed study come from several invocations.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _stamp import stamp, write_result

from loka.bench.kg import resolve_graph
from loka.eval.kg_report import (
    domain_rows,
    geometry_rows,
    load_runs,
    main_rows,
    normalise,
    render,
    transfer_rows,
)
from loka.eval.kg_runner import format_summary, run_kg
from loka.models import load_model
from loka.utils.io import atomic_write_bytes, atomic_write_json

KEEP = (
    "method",
    "task",
    "level",
    "scale",
    "seed",
    "interventions",
    "probes",
    "ccr",
    "ccr_near",
    "ccr_far",
    "rr",
    "conflict_rate",
    "conflict_rate_before",
    "inconsistency",
    "inconsistency_before",
    "by_type",
    "by_domain",
    "kl",
    "cka",
    "cka_last",
    "geometry_mean",
    "seconds",
    "artifact",
    "known_interventions",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--graph", default="curated", help="graph file, or curated | derived | merged")
    ap.add_argument("--edit-method", default="alphaedit")
    ap.add_argument(
        "--forget-methods", nargs="+", default=["npo"], help="unlearning methods (npo, relearn, ...)"
    )
    ap.add_argument(
        "--forget-hparams",
        default='{"stop_forget_em": -1}',
        help="JSON overrides for the unlearning method (default: no early stop, the full "
        "40-step budget, as the seed trains its unlearner for a fixed budget)",
    )
    ap.add_argument("--edit-hparams", default="{}", help="JSON overrides for the editing method")
    ap.add_argument("--levels", nargs="+", default=["root", "intermediate", "leaf"])
    ap.add_argument("--scales", nargs="+", type=int, default=[1, 10, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="out/kg_study", help="folder of run folders")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--report-only", action="store_true", help="run nothing; tabulate the finished runs")
    args = ap.parse_args()
    g = resolve_graph(args.graph)
    handle = load_model(args.model)
    started = stamp()
    root = Path(args.runs)
    for k in sorted(args.scales):
        for method in (args.edit_method, *args.forget_methods):
            for level in args.levels:
                out = root / f"{method}-{level}-{k}"
                if (out / "summary.json").exists() or args.report_only:
                    continue
                t = time.time()
                hp = json.loads(args.forget_hparams if method in args.forget_methods else args.edit_hparams)
                s = run_kg(
                    handle,
                    g,
                    method,
                    level,
                    k,
                    seed=args.seed,
                    out_dir=out,
                    graph_name="curated",
                    hparams=hp or None,
                    progress=False,
                )
                atomic_write_json(out / "provenance.json", started)
                print(format_summary(s), flush=True)
                print(f"[{method} {level} k={k}: {time.time() - t:.0f}s]\n", flush=True)
    runs = [
        r
        for r in load_runs([root])
        if r["scale"] in args.scales
        and r["level"] in args.levels
        and r["method"] in (args.edit_method, *args.forget_methods)
    ]
    normalise(runs)
    for title, (head, rows) in (
        ("propagation", main_rows(runs)),
        ("Q+ transfer", transfer_rows(runs)),
        ("domains", domain_rows(runs)),
        ("SVD geometry", geometry_rows(runs)),
    ):
        print(f"\n== {title} ==")
        print(" | ".join(head))
        for r in rows:
            print(" | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in r))
    res = Path(args.results)
    tag = args.model
    write_result(
        res / f"knowledgesmith_{tag}.json",
        {"model": args.model, "graph": args.graph, "runs": [_row(r) for r in runs]},
        provenance=started,
    )
    page = render(runs, f"KnowledgeSmith study on {args.model}")
    atomic_write_bytes(res / f"knowledgesmith_{tag}.html", page.encode())
    for name, b64 in re.findall(r"alt='(\w+)' src='data:image/png;base64,([^']+)'", page):
        atomic_write_bytes(res / "plots" / f"knowledgesmith_{name}.png", base64.b64decode(b64))
    print(f"\nwrote {res}/knowledgesmith_{tag}.json, .html and plots/knowledgesmith_*.png")


def _row(run: dict) -> dict:
    """The kept fields of a run, with the stamp in its folder's ``provenance.json`` when there is one."""
    row = {k: run.get(k) for k in KEEP}
    p = Path(run["_dir"]) / "provenance.json"
    if p.is_file():
        row["provenance"] = json.loads(p.read_text())
    return row


if __name__ == "__main__":
    main()
