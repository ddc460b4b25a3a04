"""Benchmark data built offline (``loka data``) and TOFU's fine-tuning stage (``loka finetune``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError
from .common import add_device, add_json, add_model

log = logging.getLogger("loka")


def cmd_data_counterfact(args) -> int:
    from ..bench.counterfact import build_counterfact, facts_known_by, load_known, mquake_facts
    from ..utils.io import atomic_write_json

    if args.source not in ("known", "known+mquake"):
        raise ConfigError(f"--from {args.source!r} is not supported; use --from known or --from known+mquake")
    facts = load_known(args.known_file)
    if args.source == "known+mquake":
        facts = facts + mquake_facts(exclude=facts)
    edited = facts
    if args.known_by:
        from ..models import load_model

        edited = facts_known_by(load_model(args.known_by, device=args.device), facts)
        log.info("%s gets %d of %d known facts right", args.known_by, len(edited), len(facts))
    recs = build_counterfact(edited, args.n, args.seed, all_facts=facts, min_subjects=args.min_subjects)
    atomic_write_json(args.out, recs)
    info = {
        "records": len(recs),
        "facts": len(facts),
        "known_by": args.known_by,
        "facts_known": len(edited),
        "out": args.out,
    }
    print(
        json.dumps(info)
        if args.json
        else f"wrote {len(recs)} CounterFact-format records to {args.out}"
        + (f" ({args.known_by} knows {len(edited)} of {len(facts)} facts)" if args.known_by else "")
    )
    return 0


def cmd_data_lifelong(args) -> int:
    from ..bench.lifelong import MAX_RECORDS, build_lifelong, check_lifelong_output, meta_path, write_lifelong

    if not 1 <= args.n <= MAX_RECORDS:
        raise ConfigError(
            f"--n must be between 1 and {MAX_RECORDS:,} (got {args.n}): the fictional-name generators are "
            "sized for at most that"
        )
    check_lifelong_output(args.out, force=args.force)
    recs, meta = build_lifelong(args.n, args.seed)
    command = f"loka data lifelong --n {args.n} --seed {args.seed} --out {args.out}"
    meta = write_lifelong(recs, meta, args.out, command)
    comp = ", ".join(f"{k} {v}" for k, v in meta["composition"].items())
    print(
        json.dumps({**meta, "out": args.out})
        if args.json
        else f"wrote {len(recs)} lifelong records to {args.out} ({comp}; {meta['bytes'] / 1e6:.1f} MB); "
        f"composition and command in {meta_path(args.out)}"
    )
    return 0


def cmd_data_lifelong_baseline(args) -> int:
    from ..bench.lifelong import check_baseline_output, unedited_scores
    from ..models import load_model

    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be a positive number of records (got {args.n})")
    if not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data} is not a file (build one with loka data lifelong)")
    check_baseline_output(args.out, args.resume, args.force)  # before loading the model
    handle = load_model(args.model, device=args.device)
    info = unedited_scores(
        handle, args.data, args.out, n=args.n, resume=args.resume, force=args.force, progress=not args.json
    )
    print(
        json.dumps(info)
        if args.json
        else f"unedited scores of {handle.name} for {info['records']} records in {args.out} "
        f"({info['scored_now']} scored now): "
        + ", ".join(
            f"{k} {info['mean'][k]:.3f} (n={info['n'][k]})" for k in ("ES", "PS", "NS") if k in info["mean"]
        )
    )
    return 0


def cmd_data_tasks(args) -> int:
    from ..bench.tasks import build_tasks
    from ..utils.io import atomic_write_bytes, atomic_write_json, read_json

    src = Path(args.source)
    if not src.exists():
        raise ConfigError(
            f"--from {src} does not exist (build it with loka data counterfact --known-by MODEL)"
        )
    task = build_tasks(read_json(src), args.setting, args.n_edit, args.n_forget, args.n_retain, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "task.json", task)
    atomic_write_json(out / "edit.json", task["edit"])
    keep = ("prompt", "subject", "answer", "paraphrases", "case_id", "relation_id")
    for name in ("forget", "retain", "remaining"):
        lines = "".join(json.dumps({k: f[k] for k in keep}) + "\n" for f in task[name])
        atomic_write_bytes(out / f"{name}.jsonl", lines.encode("utf-8"))
    counts = {k: len(task[k]) for k in ("edit", "forget", "retain", "remaining")}
    print(
        json.dumps({**counts, "setting": args.setting, "relations": task["relations"], "out": str(out)})
        if args.json
        else f"{args.setting}-profile task in {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    )
    return 0


def cmd_data_tofu(args) -> int:
    from ..bench.tofu import build_mini_tofu
    from ..utils.io import atomic_write_json

    splits = build_mini_tofu(args.tofu_dir, args.n_perturbed, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        atomic_write_json(out / f"{name}.json", recs)
    if args.relearn:  # ReLearn's targets: the forget splits again, each record with its rewrite
        from ..bench.tofu import with_relearn_targets

        for name in [k for k in splits if k.startswith("forget")]:
            atomic_write_json(out / f"{name}_relearn.json", with_relearn_targets(splits[name]))
    counts = {k: len(v) for k, v in splits.items()}
    print(
        json.dumps({**counts, "out": str(out), "relearn": args.relearn})
        if args.json
        else f"mini-TOFU in {out}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + ("; ReLearn targets in forget*_relearn.json" if args.relearn else "")
    )
    return 0


def cmd_finetune(args) -> int:
    from ..eval.data import load_qa
    from ..finetune import finetune
    from ..models import load_model
    from ..requests import QA_PROMPT

    recs = [r for f in args.data for r in load_qa(f)]
    handle = load_model(args.model, device=args.device)
    rec = finetune(
        handle,
        [QA_PROMPT.format(r["question"]) for r in recs],
        [r["answer"] for r in recs],
        args.out,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.json,
        force=args.force,
    )
    print(
        json.dumps({**rec, "out": args.out})
        if args.json
        else f"fine-tuned {handle.name} on {rec['n']} QA pairs: {rec['epochs']} epochs, {rec['steps']} steps in "
        f"{rec['seconds']:.0f}s (loss per epoch {rec['epoch_loss']}); model in {args.out} (load it with --model {args.out})"
    )
    return 0


def register(sub, methods, forgetters) -> None:
    """Add this group's commands to the ``loka`` parser."""

    s = sub.add_parser("data", help="build benchmark data offline")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="KIND")
    d = dsub.add_parser("counterfact", help="CounterFact-format records from the known facts")
    d.add_argument(
        "--from",
        dest="source",
        default="known",
        choices=["known", "known+mquake"],
        help="source of facts: 'known' (known_1000.json, shipped with loka) or 'known+mquake' (adds MQuAKE's 608 "
        "true single-hop facts of the same relations: 1,397 records with --min-subjects 1)",
    )
    d.add_argument("--known-file", help="another file in known_1000.json format")
    d.add_argument("--n", type=int, default=None, help="number of records (default: all that qualify)")
    d.add_argument("--seed", type=int, default=0, help="picks the records and the new targets (default 0)")
    d.add_argument("--known-by", metavar="MODEL", help="keep only facts this model completes correctly")
    add_device(d)
    d.add_argument(
        "--min-subjects",
        type=int,
        default=3,
        help="distinct same-object neighbour subjects a fact needs (default 3: 757 records; 1 gives more)",
    )
    d.add_argument("--out", required=True, help="output JSON file")
    add_json(d, "print a JSON line of counts")
    d.set_defaults(fn=cmd_data_counterfact)
    d = dsub.add_parser(
        "lifelong",
        help="a lifelong-editing stream: rewrites of the known facts, MQuAKE's and the curated graph's, then "
        "insertions about fictional subjects, to --n records (docs/evaluation.md)",
    )
    d.add_argument("--n", type=int, default=10_000, help="number of records (default 10,000; at most 20,000)")
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="picks the facts' order, new targets and fictional names (default 0)",
    )
    d.add_argument(
        "--out", required=True, help="output .json file (and its sidecar X.meta.json: composition, command)"
    )
    d.add_argument("--force", action="store_true", help="replace a stream loka wrote before at --out")
    add_json(d, "print the sidecar (composition, command, sha256) as one JSON line")
    d.set_defaults(fn=cmd_data_lifelong)

    d = dsub.add_parser(
        "lifelong-baseline",
        help="the unedited model's teacher-forced scores (ES/PS/NS inputs) per record of a stream, as JSON lines",
    )
    add_model(d)
    d.add_argument(
        "--data", required=True, help="a stream from loka data lifelong (any CounterFact-format file)"
    )
    d.add_argument("--n", type=int, default=None, help="score the first N records (default: all)")
    d.add_argument("--out", required=True, help="output .jsonl file: a header line, then one line per record")
    d.add_argument("--resume", action="store_true", help="continue a file of the same model and data")
    d.add_argument("--force", action="store_true", help="replace a baseline file loka wrote before at --out")
    add_json(d, "print the means as one JSON line")
    d.set_defaults(fn=cmd_data_lifelong_baseline)

    d = dsub.add_parser(
        "tasks", help="known-facts unlearning tasks: edit / forget / retain / remaining files"
    )
    d.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FILE",
        help="CounterFact records of facts the model knows (loka data counterfact --known-by MODEL)",
    )
    d.add_argument(
        "--setting",
        choices=["in", "out"],
        default="out",
        help="in-profile (edit and forget share relations: they conflict) or out-profile (disjoint)",
    )
    d.add_argument("--n-edit", type=int, default=50, help="facts to edit (default 50)")
    d.add_argument("--n-forget", type=int, default=50, help="facts to forget (default 50)")
    d.add_argument("--n-retain", type=int, default=50, help="facts to keep, the retain set (default 50)")
    d.add_argument("--seed", type=int, default=0, help="picks and splits the facts (default 0)")
    d.add_argument(
        "--out",
        required=True,
        help="output folder: edit.json, forget.jsonl, retain.jsonl, remaining.jsonl, task.json",
    )
    add_json(d, "print a JSON line of counts")
    d.set_defaults(fn=cmd_data_tasks)

    d = dsub.add_parser(
        "tofu",
        help="mini-TOFU: the TOFU splits with templated paraphrased questions and "
        "entity-swapped perturbed answers, plus the fine-tuning set",
    )
    d.add_argument(
        "--tofu-dir",
        help="folder with the TOFU *_reconstructed.json files (default: the TOFU splits shipped with loka)",
    )
    d.add_argument("--n-perturbed", type=int, default=3, help="perturbed answers per question")
    d.add_argument(
        "--seed", type=int, default=0, help="picks the paraphrase templates and swapped entities (default 0)"
    )
    d.add_argument(
        "--out",
        required=True,
        help="output folder: forget01/05/10.json, retain.json, forget_all.json, all.json",
    )
    d.add_argument(
        "--relearn",
        action="store_true",
        help="also write <forget split>_relearn.json: each record with target_new = its templated ReLearn "
        "rewrite (the answer's first named fact made vague), for `loka unlearn --method relearn`",
    )
    add_json(d, "print a JSON line of counts")
    d.set_defaults(fn=cmd_data_tofu)

    s = sub.add_parser(
        "finetune",
        help="fine-tune every weight on question/answer pairs (TOFU's first stage) and "
        "save the model as a folder",
    )
    add_model(s)
    s.add_argument(
        "--data", nargs="+", required=True, help="TOFU-style JSON/JSONL files of {question, answer}"
    )
    s.add_argument(
        "--out", required=True, help="output model folder (a Hugging Face folder; pass it as --model later)"
    )
    s.add_argument("--epochs", type=int, default=5, help="passes over the data (default 5)")
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    s.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    s.add_argument("--seed", type=int, default=0, help="shuffling and initialisation (default 0)")
    s.add_argument(
        "--force", action="store_true", help="replace a model folder loka exported before at --out"
    )
    add_json(s, "print one JSON object: steps, seconds, loss per epoch")
    s.set_defaults(fn=cmd_finetune)
