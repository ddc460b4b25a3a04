"""Measuring updates: ``loka eval``, ``loka report`` and ``loka compare``."""

from __future__ import annotations

import json

from .common import MethodNames, add_json, add_model, add_overrides, add_prune, hparam_overrides


def cmd_eval(args) -> int:
    from ..eval.data import load_cases
    from ..eval.runner import EvalConfig, format_summary, run_eval
    from ..models import load_model

    cases = load_cases(args.data, args.n)
    handle = load_model(args.model, device=args.device)
    cfg = EvalConfig(
        method=args.method,
        mode=args.mode,
        batch_size=args.batch_size,
        hparams=hparam_overrides(args),
        generation=args.generation,
        wild=args.wild,
        guard=not args.no_guard,
        prune=args.prune,
        score_sample=args.score_sample,
    )
    name = handle.name.replace("/", "--")  # a hub id (org/name) names one folder, not two
    out = args.out or f"out/eval/{name}-{args.method}{'-prune' if args.prune else ''}-{args.mode}"
    summary = run_eval(handle, cases, cfg, out, resume=args.resume, force=args.force)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(
            f"results in {out} (summary.json, results.jsonl"
            + (", sequential.png)" if args.mode == "sequential" else ")")
        )
    return 0


def cmd_report(args) -> int:
    from ..eval.run_report import write_report

    p = write_report(args.runs, args.out, args.title)
    print(f"wrote {p} ({p.stat().st_size // 1024} KiB, self-contained)")
    return 0


def cmd_compare(args) -> int:
    from ..eval.run_report import (
        COMPARE_CORE,
        COMPARE_METRICS,
        compare,
        compare_html,
        compare_rows,
        format_compare,
    )
    from ..utils.io import atomic_write_bytes

    runs = compare(args.runs)
    if args.html:
        atomic_write_bytes(args.html, compare_html(runs).encode("utf-8"))
    if args.json:
        head, rows = compare_rows(runs)
        print(json.dumps([dict(zip(head, r)) for r in rows], indent=2))
    else:
        print(format_compare(runs, COMPARE_METRICS if args.all else COMPARE_CORE))
        if args.html:
            print(f"wrote {args.html}")
    return 0


def register(sub, methods, forgetters) -> None:
    """Add this group's commands to the ``loka`` parser."""

    s = sub.add_parser("eval", help="edit benchmark cases and measure the edits (resumable)")
    add_model(s)
    s.add_argument(
        "--method",
        default="rome",
        choices=MethodNames(extra=("none",)),
        metavar="METHOD",
        help="one of %(choices)s (default rome); 'none' gives the unedited row",
    )
    s.add_argument("--data", required=True, help="CounterFact / zsRE / MQuAKE / loka JSON(L) file")
    s.add_argument("--n", type=int, help="use the first N cases")
    s.add_argument(
        "--mode",
        default="single",
        choices=["single", "batch", "sequential"],
        help="single: one case per edit, reverted before the next; batch: --batch-size cases per edit, "
        "reverted; sequential: batches kept, scored at checkpoints (default single)",
    )
    s.add_argument(
        "--batch-size",
        type=int,
        help="cases per edit (default: all of them in batch mode, 1 in sequential mode)",
    )
    s.add_argument("--out", help="output folder (default out/eval/MODEL-METHOD-MODE)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier run in --out (a folder loka did not write is never replaced)",
    )
    s.add_argument("--generation", action="store_true", help="also greedy-generation metrics (slower)")
    s.add_argument(
        "--wild",
        action="store_true",
        help="also WILD's generation scores: the question answered by greedy decoding to a stop rule, "
        "matched after normalisation; paraphrases; neighbours answered as before (slower)",
    )
    s.add_argument("--no-guard", action="store_true", help="skip perplexity / multiple-choice guard")
    add_prune(s)
    s.add_argument(
        "--score-sample",
        type=int,
        metavar="N",
        help="sequential mode: score a seeded random sample of N edited cases at each checkpoint "
        "instead of all of them (an estimate, for slow-scoring methods such as scr)",
    )
    add_overrides(s, layers=True)
    add_json(s, "print summary.json")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser(
        "report",
        help="a self-contained HTML report (tables, plots, per-case before/after) of eval and kg runs",
    )
    s.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="folders written by `loka eval --out` or `loka kg run --out` (or folders of them)",
    )
    s.add_argument("--out", default="report.html", help="output HTML file (default report.html)")
    s.add_argument("--title", help="page title (default: loka report)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("compare", help="evaluation runs side by side: summary metrics, guard, time")
    s.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="folders written by `loka eval --out` (or folders of them)"
    )
    s.add_argument(
        "--html", metavar="FILE", help="also write the table (every metric) as a self-contained HTML page"
    )
    s.add_argument(
        "--all",
        action="store_true",
        help="every metric (default: S, ES, PS, NS and generation/portability/multi-hop)",
    )
    add_json(s, "print the rows as JSON")
    s.set_defaults(fn=cmd_compare)
