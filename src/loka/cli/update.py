"""Updating what a model knows: ``loka edit``, ``loka unlearn``, ``loka update`` and ``loka session``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import ConfigError
from .common import (
    add_device,
    add_json,
    add_model,
    add_overrides,
    add_prune,
    check_save,
    hparam_overrides,
    load_with_artifacts,
    report_sets,
    rollback_options,
    rollback_request,
    update_options,
)


def cmd_edit(args) -> int:
    check_save(args)
    from ..api import edit
    from ..models import load_model
    from ..requests import EditRequest, read_requests
    from ..result import format_table, probe_rows

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
    handle = load_model(args.model, device=args.device)
    session = None
    if args.state:
        from ..session import Session

        new = not (Path(args.state) / "session.json").exists()
        session = Session(
            args.state,
            handle,
            method=args.method or ("rome" if new else None),
            hparams=hparam_overrides(args),
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
            hparam_overrides(args),
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
                    **({"session": {"folder": args.state, "batches": session.n_batches}} if session else {}),
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
            print(f"session {args.state}: batch {session.n_batches} of {session.n_batches} saved")
    return 0


def cmd_unlearn(args) -> int:
    check_save(args)
    from ..api import unlearn
    from ..requests import ForgetRequest, RetainRequest, read_requests

    inline = [f for f in ("prompt", "subject", "target") if getattr(args, f) is not None]
    if args.forget and inline:
        raise ConfigError("give --forget FILE or --prompt/--subject/--target for one fact, not both")
    if args.forget:
        forget = read_requests(args.forget, ForgetRequest)
    elif len(inline) == 3 and all(getattr(args, f) for f in inline):
        forget = [
            ForgetRequest(
                args.prompt, args.subject, None, target_true=args.target, paraphrases=args.paraphrase or []
            )
        ]
    else:
        missing = [f"--{f}" for f in ("prompt", "subject", "target") if not getattr(args, f)]
        raise ConfigError(
            "give --forget FILE, or --prompt, --subject and --target (the answer to forget) for one fact "
            f"(missing: {', '.join(missing)})"
        )
    retain = read_requests(args.retain, RetainRequest) if args.retain else []
    handle = load_with_artifacts(args.model, args.artifact, device=args.device)
    res = unlearn(
        handle, forget, retain, args.method, hparam_overrides(args), progress=not args.json, report=True
    )
    art = res.artifact
    saved = str(art.save(args.save, force=args.force)) if args.save else None
    report_sets(res.summary(), args, art, res.seconds, saved)
    return 0


def cmd_update(args) -> int:
    check_save(args)
    from ..api import update
    from ..requests import ForgetRequest, RetainRequest, read_requests

    folder = state = None
    wants_rollback = (
        args.rollback is not None or args.rollback_last is not None or args.keep_first is not None
    )
    if args.state or wants_rollback:
        from ..methods.codebook import CodebookFolder

        if args.method != "loka" or not args.state:
            raise ConfigError(
                "--state DIR (and --rollback-last/--keep-first) are for --method loka: a sequential codebook folder"
            )
        folder = CodebookFolder(args.state)
        keep = rollback_request(args, len(folder.batches()), args.state)
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
    handle = load_with_artifacts(args.model, args.artifact, device=args.device)
    res = update(
        handle,
        edits,
        forget,
        retain,
        args.method,
        hparam_overrides(args),
        forget_method=args.forget_method,
        progress=not args.json,
        state=state,
        report=True,
    )
    art, steps = res.artifact, res.steps
    if folder is not None:
        path = folder.append(art)
        x = art.manifest["extra"]
        steps = [
            *steps,
            f"codebook {path}: batch {len(folder.batches())}, {len(x['memories'])} memories, "
            f"{len(x['retrained_groups'])} bucket(s) trained, {x['carried_over']} memories carried over",
        ]
    saved = str(art.save(args.save, force=args.force)) if args.save else None
    report_sets(res.summary(), args, art, res.seconds, saved, steps)
    return 0


def cmd_session(args) -> int:
    from ..errors import ArtifactError
    from ..models import load_model
    from ..session import Session, read_session_meta

    meta = read_session_meta(args.folder)
    if meta is None:
        raise ArtifactError(
            f"{args.folder} is not a session (no session.json); start one with loka edit --state"
        )
    handle = load_model(args.model or meta["model"], device=args.device)
    if args.export:
        from ..models.loader import check_export_output

        check_export_output(args.export, force=args.force)
    s = Session(args.folder, handle)
    keep = rollback_request(args, s.n_batches, args.folder)
    removed = None
    if keep is not None:
        removed = s.summary()["batch_list"][keep:]
        s.keep_first(keep)
    if args.export:
        handle.save_pretrained(
            args.export, force=args.force, info={"session": str(args.folder), "batches": s.batches.ids()}
        )
    info = s.summary()
    if removed is not None:
        info["removed"] = removed
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        if removed is not None:
            print(_removed_line(removed, s.n_batches))
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


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def _removed_line(removed: list[dict], left: int) -> str:
    """``removed 1 batch (3 requests): <id>; the session now holds 2 batches``."""
    now = f"the session now holds {_plural(left, 'batch', 'batches')}"
    if not removed:
        return f"removed nothing; {now}"
    n_req = sum(b["requests"] for b in removed)
    ids = ", ".join(b["id"] for b in removed)
    return f"removed {_plural(len(removed), 'batch', 'batches')} ({_plural(n_req, 'request')}): {ids}; {now}"


def register(sub, methods, forgetters) -> None:
    """Add this group's commands to the ``loka`` parser."""
    from .common import MethodNames

    editors = MethodNames("edit")
    from ..models.catalog import DEFAULT_MODEL

    s = sub.add_parser("edit", help="edit facts and show the answers before/after")
    add_model(s, f"model (default {DEFAULT_MODEL})")
    s.add_argument(
        "--method",
        choices=editors,
        metavar="METHOD",
        help="editing method, one of %(choices)s (default rome; with --state, the session's own method); "
        "unlearning methods are under `loka unlearn` and `loka update`",
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
    add_overrides(s, layers=True)
    s.add_argument("--save", help="save the artifact to this folder (e.g. out.loka)")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing loka artifact at --save (a folder loka did not write is never replaced)",
    )
    s.add_argument(
        "--state",
        metavar="DIR",
        help="append this batch to the sequential state folder DIR (a session, created on first use): earlier "
        "batches are re-applied first and the method's state (AlphaEdit keys, PRUNE base) carried on",
    )
    s.add_argument("--sequential", dest="state", metavar="DIR", help=argparse.SUPPRESS)
    add_prune(s)
    add_json(s, "print one JSON object: before, after, artifact, seconds")
    s.set_defaults(fn=cmd_edit)

    s = sub.add_parser(
        "unlearn",
        help="make the model forget facts (keeping a retain set) and show P̄ and exact match before and after",
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
        help="JSON/JSONL of facts to forget: {prompt, subject, target_true|answer} "
        "or CounterFact records (their true object is forgotten); or give one fact with --prompt/--subject/--target",
    )
    s.add_argument(
        "--prompt", help="one fact to forget: the prompt with {} for the subject, e.g. '{} was born in'"
    )
    s.add_argument("--subject", help="one fact to forget: the subject, e.g. 'Ada Lovelace'")
    s.add_argument(
        "--target", help="one fact to forget: the answer the model should stop giving, e.g. 'London'"
    )
    s.add_argument(
        "--paraphrase", action="append", help="a paraphrased full prompt of that fact (repeatable)"
    )
    s.add_argument("--retain", help="JSON/JSONL of facts to keep: {prompt, subject, target_new|answer}")
    update_options(s)
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
    rollback_options(s, "with --state: ")
    update_options(s)
    s.set_defaults(fn=cmd_update)

    s = sub.add_parser(
        "session", help="show, roll back or export a sequential-editing session (loka edit --state)"
    )
    s.add_argument("folder", help="the session folder")
    s.add_argument("--model", help="model (default: the one the session was made with)")
    add_device(s)
    rollback_options(s, "")
    s.add_argument(
        "--force", action="store_true", help="replace a model folder loka exported before at --export"
    )
    s.add_argument(
        "--export",
        metavar="DIR",
        help="write the edited model (all remaining batches applied) as a HF folder",
    )
    add_json(s, "print the session summary as JSON")
    s.set_defaults(fn=cmd_session)
