"""KnowledgeSmith: ``loka kg build``, ``stats``, ``probes`` and ``run``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .common import add_json, add_model, add_overrides, hparam_overrides


def _graph(spec: str):
    from ..bench.kg import resolve_graph

    return resolve_graph(spec)


def _print_kg_stats(g, as_json: bool) -> None:
    st = g.stats()
    if as_json:
        print(
            json.dumps(
                {
                    "name": g.name,
                    "triples": len(g.triples),
                    "nodes": len(g.nodes),
                    "relations": len(g.relations),
                    "domains": st,
                },
                indent=2,
            )
        )
        return
    print(f"graph {g.name}: {len(g.triples)} triples, {len(g.nodes)} nodes, {len(g.relations)} relations")
    print(
        f"{'domain':10s} {'triples':>7s} {'relations':>9s} {'root':>5s} {'interm.':>7s} {'leaf':>5s}   "
        f"{'heads at root/interm./leaf':>26s} {'2-hop chains':>12s}"
    )
    for d, x in st.items():
        n, h = x["nodes"], x["triples_by_head_level"]
        print(
            f"{d:10s} {x['triples']:7d} {x['relations']:9d} {n.get('root', 0):5d} {n.get('intermediate', 0):7d} "
            f"{n.get('leaf', 0):5d}   {h.get('root', 0):>8d} /{h.get('intermediate', 0):>6d} /{h.get('leaf', 0):>6d}"
            f"   {x['two_hop_chains']:12d}"
        )


def cmd_kg_build(args) -> int:
    from ..bench import kg

    if not (args.curated or args.derived):
        raise ConfigError("say what to build: --curated, --derived or both (merged into one graph)")
    graphs = []
    if args.curated:
        graphs.append(kg.build_curated(args.src))
    if args.derived:
        graphs.append(kg.build_derived(args.known, args.mquake))
    g = graphs[0] if len(graphs) == 1 else kg.merge_graphs(graphs)
    g.save(args.out)
    _print_kg_stats(g, args.json)
    if not args.json:
        print(f"wrote {args.out}")
    return 0


def cmd_kg_stats(args) -> int:
    _print_kg_stats(_graph(args.graph), args.json)
    return 0


def cmd_kg_probes(args) -> int:
    from collections import Counter
    from dataclasses import asdict

    from ..bench.probes import generate_probes
    from ..utils.io import atomic_write_bytes

    g = _graph(args.graph)
    ivs, probes = generate_probes(
        g, args.level, args.scale, args.task, args.seed, args.domain, args.phrasings, args.n_context
    )
    lines = [
        json.dumps({"kind": "intervention", **asdict(iv), "request": iv.request(g).to_dict()}) for iv in ivs
    ]
    lines += [json.dumps({"kind": "probe", **p.to_dict(), "mc_prompt": p.mc_prompt()}) for p in probes]
    atomic_write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    counts = Counter(p.type for p in probes)
    if args.json:
        print(
            json.dumps(
                {"interventions": len(ivs), "probes": len(probes), "by_type": dict(counts), "out": args.out}
            )
        )
        return 0
    print(
        f"{len(ivs)} intervention(s) at level {args.level} ({args.task}), {len(probes)} probes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    iv = ivs[0]
    print(
        f"intervention 0: ({g.name_of(iv.head)}, {g.relations[iv.relation].noun}, {g.name_of(iv.old)})"
        + (f" -> {g.name_of(iv.new)}" if iv.new else " forgotten")
    )
    for t in ("direct", "reverse", "multihop", "comparison", "conflict", "contextual"):
        p = next((p for p in probes if p.intervention == 0 and p.type == t), None)
        if p is not None:
            mark = "" if p.target is None else f" [target {'ABCD'[p.target]}]"
            print(
                f"  {t:10s} cloze: {p.cloze!r}\n  {'':10s} mc:    {p.question} "
                + " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(p.options))
                + mark
            )
    print(f"wrote {args.out}")
    return 0


def cmd_kg_run(args) -> int:
    from ..eval.kg_runner import format_summary, run_kg
    from ..models import load_model

    g = _graph(args.graph)
    handle = load_model(args.model, device=args.device)
    out = args.out or f"out/kg/{args.method}-{args.level}-{args.scale}"
    s = run_kg(
        handle,
        g,
        args.method,
        args.level,
        args.scale,
        task=args.task,
        seed=args.seed,
        domains=args.domain,
        phrasings=args.phrasings,
        n_context=args.n_context,
        scoring=args.scoring,
        hparams=hparam_overrides(args) or None,
        retain_n=args.retain_n,
        out_dir=out,
        graph_name=Path(args.graph).stem,
        progress=not args.json,
        save_artifact=args.save_artifact,
        known_first=not args.any_facts,
    )
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_summary(s))
        print(f"run folder: {out}")
    return 0


def register(sub, methods, forgetters) -> None:
    """Add this group's commands to the ``loka`` parser."""
    from ..models.catalog import DEFAULT_MODEL

    s = sub.add_parser("kg", help="KnowledgeSmith: knowledge graphs, propagation probes and runs")
    ksub = s.add_subparsers(dest="kg_command", required=True, metavar="COMMAND")
    k = ksub.add_parser(
        "build",
        help="build the curated four-domain graph and/or the graph derived from "
        "known_1000 + MQuAKE-hard, validated, as JSON",
    )
    k.add_argument(
        "--curated", action="store_true", help="the hand-written biology/economics/history/physics graph"
    )
    k.add_argument(
        "--derived", action="store_true", help="the graph derived from known_1000.json and MQuAKE-hard.json"
    )
    k.add_argument(
        "--src", help="folder of .kg domain files (default: the curated sources shipped with loka)"
    )
    k.add_argument("--known", help="known_1000.json to derive from (default: the copy shipped with loka)")
    k.add_argument("--mquake", help="MQuAKE-hard.json to derive from (default: the copy shipped with loka)")
    k.add_argument("--out", required=True, help="output graph JSON")
    add_json(k, "print the statistics as JSON")
    k.set_defaults(fn=cmd_kg_build)
    k = ksub.add_parser("stats", help="triples, nodes per level and chains per domain of a graph")
    k.add_argument("--graph", default="curated", help="graph JSON/CSV, or curated | derived | merged")
    add_json(k)
    k.set_defaults(fn=cmd_kg_stats)
    for name, hlp in (
        ("probes", "interventions and their six probe types (MC and cloze) as JSONL"),
        ("run", "apply a method to K interventions and measure every probe before and after"),
    ):
        k = ksub.add_parser(name, help=hlp)
        k.add_argument("--graph", default="curated", help="graph JSON/CSV, or curated | derived | merged")
        k.add_argument(
            "--level",
            required=True,
            choices=["root", "intermediate", "leaf"],
            help="level of the intervened subjects",
        )
        k.add_argument("--scale", type=int, default=10, help="number of interventions K (1, 10, 100, 1000)")
        k.add_argument(
            "--seed", type=int, default=0, help="picks the interventions, new objects and option order"
        )
        k.add_argument("--domain", nargs="+", help="restrict to these domains (default: all, spread evenly)")
        k.add_argument(
            "--phrasings", type=int, default=3, choices=[1, 2, 3], help="phrasings per Q+ probe type"
        )
        k.add_argument(
            "--n-context",
            type=int,
            default=6,
            help="contextual probes per intervention (half near, half far)",
        )
        if name == "probes":
            k.add_argument(
                "--task",
                choices=["edit", "forget"],
                default="edit",
                help="probes for editing or for unlearning (default edit)",
            )
            k.add_argument("--out", required=True, help="output JSONL (interventions, then probes)")
            add_json(k, "print counts as JSON")
            k.set_defaults(fn=cmd_kg_probes)
        else:
            add_model(k, f"model name or folder (default {DEFAULT_MODEL})")
            k.add_argument(
                "--method",
                required=True,
                choices=methods,
                metavar="METHOD",
                help="one of %(choices)s; editing methods get edit interventions, unlearning ones forget",
            )
            k.add_argument(
                "--task",
                choices=["edit", "forget"],
                help="default: forget for unlearning-only methods (ga, gd, npo, ...), else edit",
            )
            k.add_argument(
                "--scoring",
                choices=["cloze", "mc"],
                default="cloze",
                help="cloze: the option with the highest log-probability after the cloze prompt "
                "(default; a 135M model answers MMLU-style letters near chance); mc: the letter",
            )
            k.add_argument(
                "--retain-n", type=int, help="retain facts for unlearning (default min(max(2K, 10), 100))"
            )
            k.add_argument("--out", help="run folder (default out/kg/METHOD-LEVEL-K)")
            k.add_argument(
                "--save-artifact",
                action="store_true",
                help="also save the update's artifact in the run folder",
            )
            k.add_argument(
                "--any-facts",
                action="store_true",
                help="intervene on facts regardless of whether the model knows them (default: known facts first)",
            )
            add_overrides(k, layers=True)
            add_json(k, "print summary.json")
            k.set_defaults(fn=cmd_kg_run)
