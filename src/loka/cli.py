"""The ``loka`` command line. Every command accepts ``--help``; errors exit with status 2 and a message."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
import time
from pathlib import Path

from . import env
from .errors import ConfigError

log = logging.getLogger("loka")


def _hparam_overrides(args) -> dict:
    out: dict = {}
    if getattr(args, "hparams", None):
        from .utils.io import read_json

        data = read_json(args.hparams, 16 * 1024 * 1024)
        if not isinstance(data, dict):
            raise ConfigError(
                f"--hparams {args.hparams} must hold a JSON object of name: value, got {type(data).__name__}"
            )
        out.update(data)
    for kv in getattr(args, "set", None) or []:
        if "=" not in kv:
            raise ConfigError(f"--set expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    if getattr(args, "layer", None) is not None and getattr(args, "method", None) != "none":
        import dataclasses

        from .methods import get_method

        fields = {f.name for f in dataclasses.fields(get_method(args.method or "rome").hparams_cls)}
        single = "layer" in fields  # ROME, GRACE, WISE edit one layer; the others take a list
        out["layer" if single else "layers"] = args.layer if single else [args.layer]
    if getattr(args, "layers", None):
        out["layers"] = args.layers
    return out


def cmd_models(args) -> int:
    from .models import list_models

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


def _load_with_artifacts(model: str, artifacts: list[str], force: bool = False):
    from .artifact import load_artifact
    from .models import load_model

    handle = load_model(model)
    for a in artifacts or []:
        load_artifact(a).apply(handle, force=force)
    return handle


def cmd_generate(args) -> int:
    from .scoring import generate

    handle = _load_with_artifacts(args.model, args.artifact, args.force)
    outs = generate(handle, args.prompts, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(args.prompts, outs)], indent=2))
    else:
        for p, c in zip(args.prompts, outs):
            print(f"{p}\u2192{c}")
    return 0


def _check_save(args) -> None:
    """Refuse an unusable ``--save`` path before any work (the method may run for minutes)."""
    if getattr(args, "save", None):
        from .artifact import check_artifact_output

        check_artifact_output(args.save, force=args.force)


def cmd_edit(args) -> int:
    _check_save(args)
    from .api import edit
    from .models import load_model
    from .report import format_table, probe_rows
    from .requests import EditRequest, read_requests

    if args.requests:
        reqs = read_requests(args.requests)
    else:
        missing = [f for f in ("prompt", "subject", "target") if not getattr(args, f)]
        if missing:
            raise ConfigError(
                f"give --requests FILE or all of --prompt/--subject/--target (missing: {', '.join('--' + m for m in missing)})"
            )
        reqs = [
            EditRequest(
                args.prompt,
                args.subject,
                args.target,
                target_true=args.target_true,
                paraphrases=args.paraphrase or [],
                neighborhood=args.neighbourhood or [],
            )
        ]
    handle = load_model(args.model)
    session = None
    if args.sequential:
        from .session import Session

        new = not (Path(args.sequential) / "session.json").exists()
        session = Session(
            args.sequential,
            handle,
            method=args.method or ("rome" if new else None),
            hparams=_hparam_overrides(args),
            prune=args.prune,
        )
    before = [probe_rows(handle, r) for r in reqs]
    t0 = time.time()
    if session is not None:
        art = session.append(reqs, progress=not args.json)
    else:
        art = edit(
            handle,
            reqs,
            args.method or "rome",
            _hparam_overrides(args),
            progress=not args.json,
            prune=args.prune,
        )
    seconds = time.time() - t0
    after = [probe_rows(handle, r) for r in reqs]
    saved = str(art.save(args.save, force=args.force)) if args.save else None
    if args.json:
        print(
            json.dumps(
                {
                    "before": before if len(reqs) > 1 else before[0],
                    "after": after if len(reqs) > 1 else after[0],
                    "artifact": {
                        "id": art.id,
                        "path": saved,
                        "method": art.method,
                        "params": list(art.deltas),
                    },
                    "seconds": round(seconds, 3),
                    **(
                        {"session": {"folder": args.sequential, "batches": session.n_batches}}
                        if session
                        else {}
                    ),
                },
                indent=2,
            )
        )
    else:
        for r, b, a in zip(reqs, before, after):
            print(format_table(r, b, a))
            print()
        print(
            f"{art.method}: {len(reqs)} edit(s) in {seconds:.1f}s; artifact {art.id}"
            + (f" saved to {saved}" if saved else "")
        )
        if session:
            print(f"session {args.sequential}: batch {session.n_batches} of {session.n_batches} saved")
    return 0


def _answer_rows(handle, reqs, which: str) -> list[dict]:
    from .forgetting.metrics import answer_stats

    ans = [getattr(r, which) for r in reqs]
    return answer_stats(handle, [r.text for r in reqs], ans)


def _set_summary(before: list[dict], after: list[dict]) -> dict:
    mean = lambda rows, k: round(sum(r[k] for r in rows) / len(rows), 4) if rows else None  # noqa: E731
    return {
        "n": len(before),
        "p_norm_before": mean(before, "p_norm"),
        "p_norm_after": mean(after, "p_norm"),
        "em_before": mean(before, "em"),
        "em_after": mean(after, "em"),
    }


def _report_sets(sets: dict, args, art, seconds: float, saved, steps=None) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "sets": sets,
                    "artifact": {
                        "id": art.id,
                        "path": saved,
                        "method": art.method,
                        "params": list(art.deltas),
                    },
                    "training": {k: art.manifest["extra"].get(k) for k in ("steps", "stopped_early")},
                    **(
                        {
                            "codebook": {
                                k: art.manifest["extra"].get(k) for k in ("memories", "conflict", "router")
                            }
                        }
                        if "memories" in art.manifest["extra"]
                        else {}
                    ),
                    "steps": steps or [],
                    "seconds": round(seconds, 3),
                },
                indent=2,
            )
        )
        return
    for line in steps or []:
        print(line)
    print(f"{'set':8s} {'n':>4s}  {'P̄ before':>9s} {'P̄ after':>9s}  {'EM before':>9s} {'EM after':>9s}")
    for name, r in sets.items():
        print(
            f"{name:8s} {r['n']:4d}  {r['p_norm_before']:9.3f} {r['p_norm_after']:9.3f}  {r['em_before']:9.3f} {r['em_after']:9.3f}"
        )
    ex = art.manifest.get("extra", {})
    if "steps" in ex:
        what = f"{ex['steps']} step(s){' (target met, stopped early)' if ex.get('stopped_early') else ''}"
    elif "memories" in ex:  # a LOKA codebook
        met = sum(m.get("target_met", False) for m in ex["memories"])
        what = f"codebook of {len(ex['memories'])} memories ({met} met their target)"
    elif art.kind == "bundle":
        what = f"{len(art.parts())} artifacts bundled ({', '.join(p.method for p in art.parts())})"
    else:
        what = f"{len(art.manifest.get('parents', [])) or 1} artifact(s) stacked"
    print(
        f"{art.method}: {what} in {seconds:.1f}s; artifact {art.id}" + (f" saved to {saved}" if saved else "")
    )


def _rollback_options(s, prefix: str) -> None:
    """One meaning of rollback for every sequential folder: remove the last N, or keep the first N."""
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--rollback-last", type=int, metavar="N", help=f"{prefix}revert and remove the last N batches"
    )
    g.add_argument(
        "--keep-first", type=int, metavar="N", help=f"{prefix}keep the first N batches, remove the rest"
    )
    g.add_argument("--rollback", type=int, metavar="N", help=argparse.SUPPRESS)
    s.add_argument(
        "--yes", action="store_true", help="confirm a rollback without asking (needed when not interactive)"
    )


def _rollback_request(args, total: int, where: str) -> int | None:
    """How many batches to keep (``None``: no rollback asked), after the user confirmed the removal."""

    if args.rollback is not None:
        raise ConfigError(
            "--rollback is not accepted (it is ambiguous): give --rollback-last N (remove the last N batches) "
            "or --keep-first N (keep the first N)"
        )
    if args.rollback_last is None and args.keep_first is None:
        return None
    if args.rollback_last is not None:
        n, flag = args.rollback_last, "--rollback-last"
        if not 0 < n <= total:
            raise ConfigError(f"{flag} {n}: {where} has {total} batch(es); give 1..{total}")
        keep = total - n
    else:
        keep, flag = args.keep_first, "--keep-first"
        if not 0 <= keep <= total:
            raise ConfigError(f"{flag} {keep}: {where} has {total} batch(es); give 0..{total}")
    gone = total - keep
    if gone and not args.yes:
        what = f"remove batch(es) {keep}..{total - 1} of {where} ({gone} of {total})"
        if not sys.stdin.isatty():
            raise ConfigError(f"{flag} would {what}; pass --yes to confirm")
        if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
            raise ConfigError("rollback cancelled; nothing was removed")
    return keep


def _update_options(s) -> None:
    """Options shared by ``loka unlearn`` and ``loka update``."""
    from .models.catalog import DEFAULT_MODEL

    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    s.add_argument("--hparams", help="JSON file of hyperparameters overriding the method's defaults")
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one hyperparameter (repeatable), e.g. lr=1e-3",
    )
    s.add_argument(
        "--artifact",
        action="append",
        help="apply this artifact first (repeatable), e.g. a fine-tuned fact set",
    )
    s.add_argument("--save", help="save the artifact (stacked, for a two-step update) to this folder")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing loka artifact at --save (a folder loka did not write is never replaced)",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: per-set P̄/EM before and after, artifact, seconds",
    )


def cmd_unlearn(args) -> int:
    _check_save(args)
    from .api import unlearn
    from .requests import ForgetRequest, RetainRequest, read_requests

    forget = read_requests(args.forget, ForgetRequest)
    retain = read_requests(args.retain, RetainRequest) if args.retain else []
    handle = _load_with_artifacts(args.model, args.artifact)
    before = {
        "forget": _answer_rows(handle, forget, "target_true"),
        **({"retain": _answer_rows(handle, retain, "target_new")} if retain else {}),
    }
    t0 = time.time()
    art = unlearn(handle, forget, retain, args.method, _hparam_overrides(args), progress=not args.json)
    seconds = time.time() - t0
    after = {
        "forget": _answer_rows(handle, forget, "target_true"),
        **({"retain": _answer_rows(handle, retain, "target_new")} if retain else {}),
    }
    saved = str(art.save(args.save, force=args.force)) if args.save else None
    _report_sets({k: _set_summary(before[k], after[k]) for k in before}, args, art, seconds, saved)
    return 0


def cmd_update(args) -> int:
    _check_save(args)
    from .api import update
    from .requests import ForgetRequest, RetainRequest, read_requests

    folder = state = None
    wants_rollback = (
        args.rollback is not None or args.rollback_last is not None or args.keep_first is not None
    )
    if args.state or wants_rollback:
        from .methods.codebook import CodebookFolder

        if args.method != "loka" or not args.state:
            raise ConfigError(
                "--state DIR (and --rollback-last/--keep-first) are for --method loka: a sequential codebook folder"
            )
        folder = CodebookFolder(args.state)
        keep = _rollback_request(args, len(folder.batches()), args.state)
        if keep is not None:
            gone = folder.keep_first(keep)
            print(f"{args.state}: {gone} batch(es) deleted, {len(folder.batches())} kept")
            return 0
        state = folder.state()
    edits = read_requests(args.edit) if args.edit else []
    forget = read_requests(args.forget, ForgetRequest) if args.forget else []
    retain = read_requests(args.retain, RetainRequest) if args.retain else []
    if not edits and not forget:
        raise ConfigError("give --edit FILE and/or --forget FILE")
    handle = _load_with_artifacts(args.model, args.artifact)
    sets = {
        "edit": (edits, "target_new"),
        "forget": (forget, "target_true"),
        "retain": (retain, "target_new"),
    }
    before = {k: _answer_rows(handle, r, w) for k, (r, w) in sets.items() if r}
    t0 = time.time()
    art, steps = update(
        handle,
        edits,
        forget,
        retain,
        args.method,
        _hparam_overrides(args),
        forget_method=args.forget_method,
        progress=not args.json,
        state=state,
    )
    seconds = time.time() - t0
    after = {k: _answer_rows(handle, r, w) for k, (r, w) in sets.items() if r}
    if folder is not None:
        path = folder.append(art)
        x = art.manifest["extra"]
        steps = [
            *steps,
            f"codebook {path}: batch {len(folder.batches())}, {len(x['memories'])} memories, "
            f"{len(x['retrained_groups'])} bucket(s) trained, {x['carried_over']} memories carried over",
        ]
    saved = str(art.save(args.save, force=args.force)) if args.save else None
    _report_sets({k: _set_summary(before[k], after[k]) for k in before}, args, art, seconds, saved, steps)
    return 0


def _artifact_sequence(args) -> list:
    from .artifact import load_artifact

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
    from .analysis import format_spectrum, plot_spectrum, spectrum
    from .models import load_model

    arts = _artifact_sequence(args)
    handle = load_model(args.model)
    for a in arts:
        a.check_compatible(handle, force=args.force)
    rows = spectrum(handle, arts, every=args.every)
    if args.png:
        plot_spectrum(
            {args.label or arts[0].method: rows}, args.png, f"{handle.name}: {len(arts)} artifact(s)"
        )
    if args.out:
        from .utils.io import atomic_write_json

        atomic_write_json(args.out, rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_spectrum(rows))
        if args.png:
            print(f"plot: {args.png}")
    return 0


def cmd_session(args) -> int:
    from .errors import ArtifactError
    from .models import load_model
    from .session import Session, read_session_meta

    meta = read_session_meta(args.folder)
    if meta is None:
        raise ArtifactError(
            f"{args.folder} is not a session (no session.json); start one with loka edit --sequential"
        )
    handle = load_model(args.model or meta["model"])
    if args.export:
        from .models.loader import check_export_output

        check_export_output(args.export, force=args.force)
    s = Session(args.folder, handle)
    keep = _rollback_request(args, s.n_batches, args.folder)
    if keep is not None:
        s.keep_first(keep)
    if args.export:
        handle.save_pretrained(
            args.export, force=args.force, info={"session": str(args.folder), "batches": s.batches.ids()}
        )
    info = s.summary()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(
            f"{args.folder}: {info['model']} · {info['method']}"
            + (f" + PRUNE(α={info['prune']:.3g})" if info["prune"] else "")
            + f" · {info['batches']} batch(es), {info['edits']} edit(s)"
        )
        for b in info["batch_list"]:
            print(f"  batch {b['batch']:4d}  {b['id']}  {b['requests']:4d} request(s)  {b['seconds']} s")
        if args.export:
            print(f"wrote the edited model to {args.export}")
    return 0


def cmd_apply(args) -> int:
    from .artifact import load_artifact
    from .models import load_model
    from .models.loader import check_export_output

    check_export_output(args.out, force=args.force)
    arts = [load_artifact(a) for a in args.artifact]
    handle = load_model(args.model)
    for a in arts:
        a.apply(handle, force=args.force)
    applied = [{"id": a.id, "method": a.method, "kind": a.kind} for a in arts]
    out = handle.save_pretrained(args.out, force=args.force, info={"artifacts": applied})
    print(f"wrote {handle.name} with {len(args.artifact)} artifact(s) applied to {out}")
    return 0


def cmd_inspect(args) -> int:
    from .artifact import load_artifact

    s = load_artifact(args.artifact).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"artifact   {s['id']}  ({args.artifact})")
    print(f"method     {s['method']}")
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
    for k, v in s["delta_norms"].items():
        print(f"  {k:40s} shape {s['params'][k]['shape']}  norm {v:.4f}")
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
    from .corpus import corpus_from_spec
    from .models import load_model
    from .stats import second_moments

    handle = load_model(args.model)
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


def cmd_data_counterfact(args) -> int:
    from .bench.counterfact import build_counterfact, facts_known_by, load_known, mquake_facts
    from .utils.io import atomic_write_json

    if args.source not in ("known", "known+mquake"):
        raise ConfigError(f"--from {args.source!r} is not supported; use --from known or --from known+mquake")
    facts = load_known(args.known_file)
    if args.source == "known+mquake":
        facts = facts + mquake_facts(exclude=facts)
    edited = facts
    if args.known_by:
        from .models import load_model

        edited = facts_known_by(load_model(args.known_by), facts)
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


def cmd_data_tasks(args) -> int:
    from .bench.tasks import build_tasks
    from .utils.io import atomic_write_json, read_json

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
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text(lines)
        tmp.replace(out / f"{name}.jsonl")
    counts = {k: len(task[k]) for k in ("edit", "forget", "retain", "remaining")}
    print(
        json.dumps({**counts, "setting": args.setting, "relations": task["relations"], "out": str(out)})
        if args.json
        else f"{args.setting}-profile task in {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    )
    return 0


def cmd_data_tofu(args) -> int:
    from .bench.tofu import build_mini_tofu
    from .utils.io import atomic_write_json

    splits = build_mini_tofu(args.tofu_dir, args.n_perturbed, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        atomic_write_json(out / f"{name}.json", recs)
    if args.relearn:  # ReLearn's targets: the forget splits again, each record with its rewrite
        from .bench.tofu import with_relearn_targets

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
    from .eval.data import load_qa
    from .finetune import finetune
    from .models import load_model
    from .requests import QA_PROMPT

    recs = [r for f in args.data for r in load_qa(f)]
    handle = load_model(args.model)
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


def cmd_eval(args) -> int:
    from .eval.data import load_cases
    from .eval.runner import EvalConfig, format_summary, run_eval
    from .models import load_model

    cases = load_cases(args.data, args.n)
    handle = load_model(args.model)
    cfg = EvalConfig(
        method=args.method,
        mode=args.mode,
        batch_size=args.batch_size,
        hparams=_hparam_overrides(args),
        generation=args.generation,
        guard=not args.no_guard,
        prune=args.prune,
        score_sample=args.score_sample,
    )
    out = args.out or f"out/eval/{handle.name}-{args.method}{'-prune' if args.prune else ''}-{args.mode}"
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


def _graph(spec: str):
    from .bench.kg import resolve_graph

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
    from .bench import kg

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

    from .bench.probes import generate_probes
    from .utils.io import atomic_write_bytes

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
    from .eval.kg_runner import format_summary, run_kg
    from .models import load_model

    g = _graph(args.graph)
    handle = load_model(args.model)
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
        hparams=_hparam_overrides(args) or None,
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


def cmd_report(args) -> int:
    from .eval.html_report import write_report

    p = write_report(args.runs, args.out, args.title)
    print(f"wrote {p} ({p.stat().st_size // 1024} KiB, self-contained)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.model, args.out)


class _MethodNames:
    """Method names for an option's ``choices``, read from the registry when first needed: building the
    parser (``loka --help``) imports no method and no torch; a subcommand's help or a check does."""

    def __init__(self, which: str = "all", extra: tuple[str, ...] = ()):
        self.which, self.extra = which, extra

    def _names(self) -> list[str]:
        from .methods import REGISTRY

        if self.which == "forget":
            from .methods import methods_for

            return [*self.extra, *methods_for("forget")]
        return [*self.extra, *sorted(REGISTRY)]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads`` on every (sub)command that runs a model (one with ``--model`` or ``--known-by``)."""
    dests = {a.dest for a in parser._actions}
    if dests & {"model", "known_by"} and "threads" not in dests:
        parser.add_argument(
            "--threads",
            metavar="N",
            help="torch intra-op threads: a number or 'auto' (default: $LOKA_THREADS, else auto = "
            "the CPUs no other process keeps busy)",
        )
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in dict.fromkeys(a.choices.values()):
                _add_threads(sp)


def build_parser() -> argparse.ArgumentParser:
    from .models.catalog import DEFAULT_MODEL

    methods, forgetters = _MethodNames(), _MethodNames("forget")

    p = argparse.ArgumentParser(
        prog="loka", description="Edit, unlearn and measure what a language model knows."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("models", help="list models and whether each is installed/cached")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("generate", help="greedy generation, optionally with artifacts applied")
    s.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered name, tiny-* or HF folder (default {DEFAULT_MODEL})",
    )
    s.add_argument(
        "--artifact",
        action="append",
        default=[],
        help="artifact folder to apply first (repeatable, applied in order)",
    )
    s.add_argument("--max-new-tokens", type=int, default=20)
    s.add_argument("--force", action="store_true", help="apply artifacts even if made for other weights")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("prompts", nargs="+", help="prompt(s)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("edit", help="edit facts and show the answers before/after")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    s.add_argument(
        "--method",
        choices=methods,
        metavar="METHOD",
        help="editing method, one of %(choices)s (default rome; with --sequential, the session's own method)",
    )
    s.add_argument("--prompt", help="prompt with {} for the subject, e.g. '{} is located in the city of'")
    s.add_argument("--subject", help="the subject, e.g. 'Eiffel Tower'")
    s.add_argument("--target", help="the new answer, e.g. 'Rome'")
    s.add_argument("--target-true", help="the current answer (optional, for reporting)")
    s.add_argument("--paraphrase", action="append", help="a paraphrased full prompt to check (repeatable)")
    s.add_argument(
        "--neighbourhood",
        "--neighborhood",
        action="append",
        help="an unrelated full prompt to check (repeatable)",
    )
    s.add_argument("--requests", help="JSON/JSONL file of requests (loka or CounterFact records)")
    s.add_argument("--layer", type=int, help="edit layer (ROME) / single layer (MEMIT)")
    s.add_argument("--layers", type=int, nargs="+", help="MEMIT edit layers")
    s.add_argument("--hparams", help="JSON file of hyperparameters overriding the model's defaults")
    s.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one hyperparameter (repeatable)"
    )
    s.add_argument("--save", help="save the artifact to this folder (e.g. out.loka)")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing loka artifact at --save (a folder loka did not write is never replaced)",
    )
    s.add_argument(
        "--sequential",
        metavar="DIR",
        help="append this batch to the sequential-editing session in DIR (created on first use): earlier "
        "batches are re-applied first and the method's state (AlphaEdit keys, PRUNE base) carried on",
    )
    s.add_argument(
        "--prune",
        nargs="?",
        const=math.e,
        type=float,
        metavar="ALPHA",
        help="restrain the accumulated update's singular values with PRUNE (log base ALPHA, default e)",
    )
    s.add_argument(
        "--json", action="store_true", help="print one JSON object: before, after, artifact, seconds"
    )
    s.set_defaults(fn=cmd_edit)

    s = sub.add_parser(
        "unlearn", help="make the model forget facts (keeping a retain set) and show P̄/EM before and after"
    )
    s.add_argument(
        "--method",
        default="npo",
        choices=forgetters,
        metavar="METHOD",
        help="unlearning method, one of %(choices)s (default npo)",
    )
    s.add_argument(
        "--forget",
        required=True,
        help="JSON/JSONL of facts to forget: {prompt, subject, target_true|answer} "
        "or CounterFact records (their true object is forgotten)",
    )
    s.add_argument("--retain", help="JSON/JSONL of facts to keep: {prompt, subject, target_new|answer}")
    _update_options(s)
    s.set_defaults(fn=cmd_unlearn)

    s = sub.add_parser("update", help="joint update: edit some facts, forget others, keep the rest")
    s.add_argument(
        "--method",
        default="npo",
        choices=methods,
        metavar="METHOD",
        help="ga/gd/npo/simnpo/idk/dpo/relearn/ft/lora/loka do all in one optimisation; a single-task method (rome, memit, ...) "
        "edits first and --forget-method then forgets (the output says so)",
    )
    s.add_argument(
        "--forget-method",
        default="npo",
        choices=forgetters,
        metavar="METHOD",
        help="forgetting step for single-task methods, one of %(choices)s (default npo)",
    )
    s.add_argument("--edit", help="JSON/JSONL of edit requests (loka or CounterFact records)")
    s.add_argument("--forget", help="JSON/JSONL of facts to forget")
    s.add_argument("--retain", help="JSON/JSONL of facts to keep")
    s.add_argument(
        "--state",
        metavar="DIR",
        help="LOKA only: add this batch to the sequential codebook in DIR (created on "
        "first use; use --set mapping=lsh so old knowledge keeps its buckets)",
    )
    _rollback_options(s, "with --state: ")
    _update_options(s)
    s.set_defaults(fn=cmd_update)

    s = sub.add_parser("analyze", help="analyses of edited models (spectrum)")
    asub = s.add_subparsers(dest="what", required=True)
    a = asub.add_parser(
        "spectrum", help="σ_max, σ_min and condition number of each edited matrix against the number of edits"
    )
    a.add_argument("--model", default=DEFAULT_MODEL)
    a.add_argument(
        "--artifact", action="append", help="artifact folder (repeatable; applied cumulatively in order)"
    )
    a.add_argument(
        "--sequence",
        action="append",
        metavar="DIR",
        help="a session (loka edit --sequential), an eval run or a folder of *.loka, in name order",
    )
    a.add_argument("--every", type=int, default=1, help="measure after every K-th artifact (and the last)")
    a.add_argument("--png", help="write the plot here")
    a.add_argument("--out", help="write the rows as JSON here")
    a.add_argument("--label", help="series label in the plot (default: the method)")
    a.add_argument("--force", action="store_true", help="analyse artifacts made for other weights")
    a.add_argument("--json", action="store_true", help="print the rows as JSON")
    a.set_defaults(fn=cmd_analyze)

    s = sub.add_parser(
        "session", help="show, roll back or export a sequential-editing session (loka edit --sequential)"
    )
    s.add_argument("folder", help="the session folder")
    s.add_argument("--model", help="model (default: the one the session was made with)")
    _rollback_options(s, "")
    s.add_argument(
        "--force", action="store_true", help="replace a model folder loka exported before at --export"
    )
    s.add_argument(
        "--export",
        metavar="DIR",
        help="write the edited model (all remaining batches applied) as a HF folder",
    )
    s.add_argument("--json", action="store_true", help="print the session summary as JSON")
    s.set_defaults(fn=cmd_session)

    s = sub.add_parser("apply", help="write the model with artifacts applied as a Hugging Face folder")
    s.add_argument("--model", default=DEFAULT_MODEL)
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

    s = sub.add_parser("inspect", help="show an artifact's manifest")
    s.add_argument("artifact", help="artifact folder")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("stats", help="compute (or load cached) second-moment statistics for layers")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--layers", type=int, nargs="+", required=True)
    s.add_argument(
        "--corpus",
        default="self",
        help="'self' (text sampled from the model), a .txt, a .jsonl or a datasets folder",
    )
    s.add_argument("--n-tokens", type=int, default=20_000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stats)

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
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--known-by", metavar="MODEL", help="keep only facts this model completes correctly")
    d.add_argument(
        "--min-subjects",
        type=int,
        default=3,
        help="distinct same-object neighbour subjects a fact needs (default 3: 757 records; 1 gives more)",
    )
    d.add_argument("--out", required=True, help="output JSON file")
    d.add_argument("--json", action="store_true", help="print a JSON line of counts")
    d.set_defaults(fn=cmd_data_counterfact)
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
    d.add_argument("--n-edit", type=int, default=50)
    d.add_argument("--n-forget", type=int, default=50)
    d.add_argument("--n-retain", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--out",
        required=True,
        help="output folder: edit.json, forget.jsonl, retain.jsonl, remaining.jsonl, task.json",
    )
    d.add_argument("--json", action="store_true", help="print a JSON line of counts")
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
    d.add_argument("--seed", type=int, default=0)
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
    d.add_argument("--json", action="store_true", help="print a JSON line of counts")
    d.set_defaults(fn=cmd_data_tofu)

    s = sub.add_parser(
        "finetune",
        help="fine-tune every weight on question/answer pairs (TOFU's first stage) and "
        "save the model as a folder",
    )
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument(
        "--data", nargs="+", required=True, help="TOFU-style JSON/JSONL files of {question, answer}"
    )
    s.add_argument(
        "--out", required=True, help="output model folder (a Hugging Face folder; pass it as --model later)"
    )
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--force", action="store_true", help="replace a model folder loka exported before at --out"
    )
    s.add_argument(
        "--json", action="store_true", help="print one JSON object: steps, seconds, loss per epoch"
    )
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("eval", help="edit benchmark cases and measure the edits (resumable)")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument(
        "--method",
        default="rome",
        choices=_MethodNames(extra=("none",)),
        metavar="METHOD",
        help="one of %(choices)s (default rome); 'none' gives the unedited row",
    )
    s.add_argument("--data", required=True, help="CounterFact / zsRE / MQuAKE / loka JSON(L) file")
    s.add_argument("--n", type=int, help="use the first N cases")
    s.add_argument("--mode", default="single", choices=["single", "batch", "sequential"])
    s.add_argument("--batch-size", type=int, default=1, help="cases per edit (batch and sequential modes)")
    s.add_argument("--out", help="output folder (default out/eval/MODEL-METHOD-MODE)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier run in --out (a folder loka did not write is never replaced)",
    )
    s.add_argument("--generation", action="store_true", help="also greedy-generation metrics (slower)")
    s.add_argument("--no-guard", action="store_true", help="skip perplexity / multiple-choice guard")
    s.add_argument(
        "--prune",
        nargs="?",
        const=math.e,
        type=float,
        metavar="ALPHA",
        help="restrain the accumulated update's singular values with PRUNE (log base ALPHA, default e)",
    )
    s.add_argument(
        "--score-sample",
        type=int,
        metavar="N",
        help="sequential mode: score a seeded random sample of N edited cases at each checkpoint "
        "instead of all of them (an estimate, for slow-scoring methods such as scr)",
    )
    s.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one hyperparameter (repeatable)"
    )
    s.add_argument("--json", action="store_true", help="print summary.json")
    s.set_defaults(fn=cmd_eval)

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
    k.add_argument("--json", action="store_true", help="print the statistics as JSON")
    k.set_defaults(fn=cmd_kg_build)
    k = ksub.add_parser("stats", help="triples, nodes per level and chains per domain of a graph")
    k.add_argument("--graph", default="curated", help="graph JSON/CSV, or curated | derived | merged")
    k.add_argument("--json", action="store_true")
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
            k.add_argument("--task", choices=["edit", "forget"], default="edit")
            k.add_argument("--out", required=True, help="output JSONL (interventions, then probes)")
            k.add_argument("--json", action="store_true", help="print counts as JSON")
            k.set_defaults(fn=cmd_kg_probes)
        else:
            k.add_argument(
                "--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})"
            )
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
            k.add_argument(
                "--set", action="append", metavar="KEY=VALUE", help="override one hyperparameter (repeatable)"
            )
            k.add_argument("--json", action="store_true", help="print summary.json")
            k.set_defaults(fn=cmd_kg_run)

    s = sub.add_parser("report", help="a self-contained HTML report (tables + plots) comparing kg runs")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or folders of run folders)")
    s.add_argument("--out", default="report.html", help="output HTML file")
    s.add_argument("--title", default="loka KnowledgeSmith report")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("demo", help="the main job: edit facts on the default model, save, reload, revert")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--out", default="out/demo", help="where to save the demo's artifacts")
    s.set_defaults(fn=cmd_demo)
    _add_threads(p)
    return p


_ERRNO_FIX = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "permission denied: choose a path you may write",
    errno.EPERM: "operation not permitted: choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "is a folder, not a file: give a file",
    errno.ENOTDIR: "part of the path is a file, not a folder: check the path",
}


def _os_message(e: OSError) -> str:
    where = " -> ".join(str(x) for x in (e.filename, e.filename2) if x)
    fix = _ERRNO_FIX.get(e.errno or -1, e.strerror or str(e))
    return f"{where}: {fix}" if where else fix


def main(argv: list[str] | None = None) -> int:
    from .errors import LokaError

    parser = build_parser()
    args = parser.parse_args(argv)
    env.setup_logging(args.verbose)
    try:
        if hasattr(args, "threads"):
            env.set_threads(args.threads)
        return int(args.fn(args) or 0)
    except LokaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as e:  # the machine said no: missing, unreadable or unwritable path, full or read-only disk
        print(f"error: {_os_message(e)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(
            f"error: a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8",
            file=sys.stderr,
        )
        return 2
    except json.JSONDecodeError as e:
        print(f"error: a file is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: an input nests too deeply (JSON nested thousands of levels?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; what was written is complete (writes are atomic)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
