"""What every command group shares: option helpers, ``--set``/``--hparams`` parsing, the rollback
grammar, the tables of ``unlearn``/``update``, and how errors become one line."""

from __future__ import annotations

import argparse
import errno
import json
import sys

from ..errors import ConfigError


def add_model(s: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--model`` (a registered name, a tiny test model, a local Hugging Face folder or a cached hub id)
    and ``--device``."""
    from ..models.catalog import DEFAULT_MODEL

    s.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=help
        or f"registered name, tiny-*, a local Hugging Face folder or an org/name id in the local HF cache "
        f"(default {DEFAULT_MODEL})",
    )
    add_device(s)


def add_device(s: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (:func:`loka.env.device`)."""
    s.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N or auto (default: $LOKA_DEVICE, else auto = CUDA when present, else cpu)",
    )


def add_json(s: argparse.ArgumentParser, help: str = "print JSON instead of a table") -> None:
    """``--json``: machine-readable output for other tools."""
    s.add_argument("--json", action="store_true", help=help)


def add_overrides(s: argparse.ArgumentParser, layers: bool = False) -> None:
    """``--hparams FILE`` and ``--set KEY=VALUE`` (and, with ``layers``, ``--layer``/``--layers``): the
    hyperparameter overrides every command that runs a method takes (:func:`hparam_overrides`)."""
    if layers:
        s.add_argument(
            "--layer", type=int, help="edit layer (ROME, GRACE, WISE) / single layer (MEMIT and the others)"
        )
        s.add_argument("--layers", type=int, nargs="+", help="edit layers (MEMIT, AlphaEdit, the trainers)")
    s.add_argument("--hparams", help="JSON file of hyperparameters overriding the model's defaults")
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one hyperparameter (repeatable), e.g. lr=1e-3",
    )


def add_prune(s: argparse.ArgumentParser) -> None:
    """``--prune [ALPHA]``: restrain the accumulated update with PRUNE after each edit."""
    import math

    s.add_argument(
        "--prune",
        nargs="?",
        const=math.e,
        type=float,
        metavar="ALPHA",
        help="restrain the accumulated update's singular values with PRUNE (log base ALPHA, default e)",
    )


def parse_overrides(pairs: list[str] | None, flag: str = "--set") -> dict:
    """``KEY=VALUE`` strings as a dict, each value read as JSON when it parses (``5``, ``[1, 2]``,
    ``true``) and kept as a string otherwise — the one rule of ``--set`` for the CLI and the benchmarks."""
    out: dict = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        if not k:
            raise ConfigError(f"{flag} {kv!r}: the key is empty")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def hparam_overrides(args) -> dict:
    """The hyperparameter overrides of a command: ``--hparams FILE``, then ``--set``, then ``--layer``/``--layers``."""
    out: dict = {}
    if getattr(args, "hparams", None):
        from ..utils.io import read_json

        data = read_json(args.hparams, 16 * 1024 * 1024)
        if not isinstance(data, dict):
            raise ConfigError(
                f"--hparams {args.hparams} must hold a JSON object of name: value, got {type(data).__name__}"
            )
        out.update(data)
    out.update(parse_overrides(getattr(args, "set", None)))
    if getattr(args, "layer", None) is not None and getattr(args, "method", None) != "none":
        import dataclasses

        from ..methods import get_method

        fields = {f.name for f in dataclasses.fields(get_method(args.method or "rome").hparams_cls)}
        single = "layer" in fields  # ROME, GRACE, WISE edit one layer; the others take a list
        out["layer" if single else "layers"] = args.layer if single else [args.layer]
    if getattr(args, "layers", None):
        out["layers"] = args.layers
    return out


def load_artifacts(paths: list[str]) -> list:
    """The artifacts at ``paths``, verified, with every method registered (a memory or context artifact
    installs through its method's hooks, which a fresh process knows only once the methods are imported)."""
    from .. import methods  # noqa: F401
    from ..artifact import load_artifact

    return [load_artifact(p) for p in paths]


def load_with_artifacts(model: str, artifacts: list[str], force: bool = False, device: str | None = None):
    from ..models import load_model

    arts = load_artifacts(artifacts or [])
    handle = load_model(model, device=device)
    for a in arts:
        a.apply(handle, force=force)
    return handle


def check_save(args) -> None:
    """Refuse an unusable ``--save`` path before any work (the method may run for minutes)."""
    if getattr(args, "save", None):
        from ..artifact import check_artifact_output

        check_artifact_output(args.save, force=args.force)


def report_sets(sets: dict, args, art, seconds: float, saved, steps=None) -> None:
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
    from ..result import sets_table

    for line in steps or []:
        print(line)
    print(sets_table(sets))
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


def rollback_options(s, prefix: str) -> None:
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


def rollback_request(args, total: int, where: str) -> int | None:
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


def update_options(s) -> None:
    """Options shared by ``loka unlearn`` and ``loka update``."""
    add_model(s)
    add_overrides(s)
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
    add_json(s, "print one JSON object: per-set P̄ and exact match before and after, artifact, seconds")


class MethodNames:
    """Method names for an option's ``choices``, read from the registry when first needed: building the
    parser (``loka --help``) imports no method and no torch; a subcommand's help or a check does."""

    def __init__(self, which: str = "all", extra: tuple[str, ...] = ()):
        self.which, self.extra = which, extra

    def _names(self) -> list[str]:
        from ..methods import REGISTRY

        if self.which == "forget":
            from ..methods import methods_for

            return [*self.extra, *methods_for("forget")]
        if self.which == "edit":  # methods made for editing (the unlearning ones are under unlearn/update)
            return [*self.extra, *sorted(n for n, m in REGISTRY.items() if m.primary == "edit")]
        return [*self.extra, *sorted(REGISTRY)]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def add_threads(parser: argparse.ArgumentParser) -> None:
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
                add_threads(sp)


ERRNO_FIX = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "permission denied: choose a path you may write",
    errno.EPERM: "operation not permitted: choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "is a folder, not a file: give a file",
    errno.ENOTDIR: "part of the path is a file, not a folder: check the path",
}


def os_message(e: OSError) -> str:
    where = " -> ".join(str(x) for x in (e.filename, e.filename2) if x)
    fix = ERRNO_FIX.get(e.errno or -1, e.strerror or str(e))
    return f"{where}: {fix}" if where else fix
