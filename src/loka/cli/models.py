"""Models and artifacts: ``loka models``, ``generate``, ``apply``, ``export``, ``inspect``, ``stats``, ``analyze`` and ``demo``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError
from .common import add_json, add_model, load_with_artifacts


def cmd_models(args) -> int:
    from ..models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':14s} {'installed':9s} {'cached':6s} description")
    for r in rows:
        print(
            f"{r['name']:14s} {'yes' if r['installed'] else 'no':9s} {'yes' if r['cached'] else 'no':6s} {r['description']}"
        )
        if not r["installed"]:
            print(f"{'':14s} install: {r['install']}")
    return 0


def cmd_generate(args) -> int:
    from ..scoring import generate

    handle = load_with_artifacts(args.model, args.artifact, args.force, args.device)
    outs = generate(handle, args.prompts, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(args.prompts, outs)], indent=2))
    else:
        for p, c in zip(args.prompts, outs):
            print(f"{p}\u2192{c}")
    return 0


def cmd_apply(args) -> int:
    from ..models import load_model
    from ..models.loader import check_export_output
    from .common import load_artifacts

    check_export_output(args.out, force=args.force)
    arts = load_artifacts(args.artifact)
    handle = load_model(args.model, device=args.device)
    for a in arts:
        a.apply(handle, force=args.force)
    out = _save_hf(handle, arts, args.out, args.force)
    print(f"wrote {handle.name} with {len(args.artifact)} artifact(s) applied to {out}")
    return 0


def _save_hf(handle, arts: list, out: str, force: bool) -> Path:
    """The model with ``arts`` applied as a Hugging Face folder (``loka apply --out``, ``loka export --format hf``)."""
    applied = [{"id": a.id, "method": a.method, "kind": a.kind} for a in arts]
    return handle.save_pretrained(out, force=force, info={"artifacts": applied})


def cmd_export(args) -> int:
    from ..export.gguf import check_gguf_output, export_gguf
    from ..models import load_model
    from ..models.loader import check_export_output
    from .common import load_artifacts

    fmt = args.format or ("gguf" if str(args.out).lower().endswith(".gguf") else "hf")
    if fmt == "hf" and args.quant:
        raise ConfigError(
            "--quant applies to --format gguf; a Hugging Face folder keeps the weights in float32"
        )
    (check_export_output if fmt == "hf" else check_gguf_output)(args.out, force=args.force)
    arts = load_artifacts(args.artifact)
    handle = load_model(args.model, device=args.device)
    for a in arts:
        a.apply(handle, force=args.force)
    what = f"{handle.name} with {len(arts)} artifact(s) applied"
    if fmt == "hf":
        out = _save_hf(handle, arts, args.out, args.force)
        if args.json:
            print(json.dumps({"format": "hf", "path": str(out), "artifacts": [a.id for a in arts]}, indent=2))
        else:
            print(f"wrote {what} to {out}")
        return 0
    res = export_gguf(
        handle, args.out, quant=args.quant or "q8_0", verify=not args.no_verify, force=args.force
    )
    if args.json:
        print(json.dumps({"format": "gguf", **res.to_dict()}, indent=2))
        return 0
    print(f"wrote {what} to {res.path} ({res.quant}, {res.bytes / 1e6:.1f} MB, {res.seconds:.1f} s)")
    if res.verified:
        print(f"verified in {res.verify_seconds:.1f} s: {res.summary()}")
        for c in res.lost:
            print(f"  lost: {c.text!r} -> {c.target!r} (artifact {c.artifact})")
        for c in res.not_held:
            print(f"  did not hold before export: {c.text!r} -> {c.target!r} (artifact {c.artifact})")
    else:
        print("not verified (--no-verify)")
    return 0


def cmd_inspect(args) -> int:
    from .. import methods  # noqa: F401  (each method declares its index tensors when registered)
    from ..artifact import load_artifact

    s = load_artifact(args.artifact).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"artifact   {s['id']}  ({args.artifact})")
    print(f"method     {s['method']}")
    print(f"kind       {s['kind']}")
    print(f"model      {s['model']['name']}  hash {s['model']['hash'][:16]}  family {s['model']['family']}")
    print(f"created    {s['created']}  loka {s['loka_version']}")
    print(f"requests   {s['n_requests']}")
    for r in s["requests"][:10]:
        what = (
            f"-> {r['target_new']!r}"
            if r.get("target_new") is not None
            else f"forget {r.get('target_true')!r}"
        )
        print(f"  - {r['prompt'].replace('{}', r['subject'])!r} {what}")
    print("deltas")
    for k, d in s["deltas"].items():
        what = f"norm {d['norm']:.4f}" if "norm" in d else f"{d['dtype']} holding indices (no norm)"
        print(f"  {k:40s} shape {d['shape']}  {what}")
    print("hparams    " + json.dumps(s["hparams"]))
    mem = s.get("extra", {}).get("memories")
    if mem:  # a LOKA codebook
        from collections import Counter

        x = s["extra"]
        tasks = ", ".join(f"{n} {t}" for t, n in sorted(Counter(m["task"] for m in mem).items()))
        print(
            f"codebook   {len(mem)} memories ({tasks}) on {x['module']}, keys {x.get('key_source', 'llm')}, "
            f"router {'τ = ' + str(x['router_threshold']) if x.get('router') else 'off'}, "
            f"{len(x.get('conflict', []))} mixed cluster(s)"
        )
    return 0


def cmd_stats(args) -> int:
    from ..corpus import corpus_from_spec
    from ..models import load_model
    from ..stats import second_moments

    handle = load_model(args.model, device=args.device)
    corpus = corpus_from_spec(args.corpus, handle, args.n_tokens)
    t0 = time.time()
    covs = second_moments(handle, args.layers, corpus, args.n_tokens)
    rows = [{"layer": layer, "dim": int(c.shape[0]), "trace": float(c.trace())} for layer, c in covs.items()]
    if args.json:
        print(json.dumps({"seconds": round(time.time() - t0, 2), "layers": rows}, indent=2))
    else:
        for r in rows:
            print(f"layer {r['layer']}: {r['dim']}x{r['dim']}, trace {r['trace']:.3f}")
        print(f"{time.time() - t0:.1f}s")
    return 0


def _artifact_sequence(args) -> list:
    from ..artifact import load_artifact

    paths = [Path(p) for p in args.artifact or []]
    for folder in args.sequence or []:  # a session, an eval run, or any folder of *.loka in name order
        folder = Path(folder)
        for sub in ("batches", "artifacts"):
            if (folder / sub).is_dir():
                folder = folder / sub
                break
        found = sorted(folder.glob("*.loka"))
        if not found:
            raise ConfigError(f"no *.loka artifacts in {folder}")
        paths += found
    if not paths:
        raise ConfigError("give --artifact A (repeatable) or --sequence DIR")
    return [load_artifact(p) for p in paths]


def cmd_analyze(args) -> int:
    from ..analysis import format_spectrum, plot_spectrum, spectrum
    from ..models import load_model

    arts = _artifact_sequence(args)
    handle = load_model(args.model, device=args.device)
    for a in arts:
        a.check_compatible(handle, force=args.force)
    rows = spectrum(handle, arts, every=args.every)
    if args.png:
        plot_spectrum(
            {args.label or arts[0].method: rows}, args.png, f"{handle.name}: {len(arts)} artifact(s)"
        )
    if args.out:
        from ..utils.io import atomic_write_json

        atomic_write_json(args.out, rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_spectrum(rows))
        if args.png:
            print(f"plot: {args.png}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(args.model, args.out, args.device)


def register(sub, methods, forgetters) -> None:
    """Add this group's commands to the ``loka`` parser."""
    from ..models.catalog import DEFAULT_MODEL

    s = sub.add_parser("models", help="list models and whether each is installed/cached")
    add_json(s, "print JSON")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("generate", help="greedy generation, optionally with artifacts applied")
    add_model(s, f"registered name, tiny-* or HF folder (default {DEFAULT_MODEL})")
    s.add_argument(
        "--artifact",
        action="append",
        default=[],
        help="artifact folder to apply first (repeatable, applied in order)",
    )
    s.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    s.add_argument("--force", action="store_true", help="apply artifacts even if made for other weights")
    add_json(s, "print JSON")
    s.add_argument("prompts", nargs="+", help="prompt(s)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("apply", help="write the model with artifacts applied as a Hugging Face folder")
    add_model(s)
    s.add_argument(
        "--artifact", action="append", required=True, help="artifact folder (repeatable, applied in order)"
    )
    s.add_argument(
        "--out", required=True, help="output folder (new, or one loka exported before, with --force)"
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="apply even if made for other weights, and replace a folder loka exported at --out "
        "(a folder loka did not write is never replaced)",
    )
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser(
        "export",
        help="write the model with artifacts applied as a GGUF file (verified) or a Hugging Face folder",
    )
    add_model(s)
    s.add_argument(
        "--artifact", action="append", default=[], help="artifact folder (repeatable, applied in order)"
    )
    s.add_argument(
        "--out",
        required=True,
        help="output: a .gguf file or a folder (new, or one loka exported before, with --force)",
    )
    s.add_argument(
        "--format",
        choices=("hf", "gguf"),
        help="gguf: one GGUF file for llama.cpp and Ollama; hf: a Hugging Face folder (as loka apply --out); "
        "default: gguf when --out ends in .gguf, else hf",
    )
    s.add_argument(
        "--quant",
        choices=("f16", "q8_0", "q4_0", "q4_1"),
        help="GGUF tensor type of the 2-D weights (default q8_0; norms stay float32)",
    )
    s.add_argument(
        "--no-verify",
        action="store_true",
        help="skip reading the GGUF back with transformers and re-scoring the artifacts' requests on it",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="apply even if made for other weights, and replace an export loka wrote at --out "
        "(a file or folder loka did not write is never replaced)",
    )
    add_json(s, "print the result (and the verification of each request) as JSON")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("inspect", help="show an artifact's manifest")
    s.add_argument("artifact", help="artifact folder")
    add_json(s, "print JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("stats", help="compute (or load cached) second-moment statistics for layers")
    add_model(s)
    s.add_argument(
        "--layers", type=int, nargs="+", required=True, help="layer indices whose statistics to compute"
    )
    s.add_argument(
        "--corpus",
        default="self",
        help="'self' (text sampled from the model), a .txt, a .jsonl or a datasets folder",
    )
    s.add_argument("--n-tokens", type=int, default=20_000, help="corpus tokens to read (default 20000)")
    add_json(s)
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("analyze", help="analyses of edited models (spectrum)")
    asub = s.add_subparsers(dest="what", required=True)
    a = asub.add_parser(
        "spectrum", help="σ_max, σ_min and condition number of each edited matrix against the number of edits"
    )
    add_model(a)
    a.add_argument(
        "--artifact", action="append", help="artifact folder (repeatable; applied cumulatively in order)"
    )
    a.add_argument(
        "--sequence",
        action="append",
        metavar="DIR",
        help="a session (loka edit --state), an eval run or a folder of *.loka, in name order",
    )
    a.add_argument("--every", type=int, default=1, help="measure after every K-th artifact (and the last)")
    a.add_argument("--png", help="write the plot here")
    a.add_argument("--out", help="write the rows as JSON here")
    a.add_argument("--label", help="series label in the plot (default: the method)")
    a.add_argument("--force", action="store_true", help="analyse artifacts made for other weights")
    add_json(a, "print the rows as JSON")
    a.set_defaults(fn=cmd_analyze)

    s = sub.add_parser("demo", help="the main job: edit facts on the default model, save, reload, revert")
    add_model(s)
    s.add_argument("--out", default="out/demo", help="where to save the demo's artifacts")
    s.set_defaults(fn=cmd_demo)
