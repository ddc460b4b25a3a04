"""Lifelong editing: many CounterFact edits in batches, one method after another, no revert.

    python benchmarks/lifelong.py --model smollm2-135m --n 1000 --batch 100 --every 3
    python benchmarks/lifelong.py --rows memit alphaedit --n 200 --batch 50      # a shorter run
    python benchmarks/lifelong.py --data data/generated/lifelong_10000.json --n 10000 --batch 100 \
        --checkpoints 100 1000 3000 10000 --score-sample 300 --wild --max-hours 2 \
        --rows ultraedit memoir alphaedit memit wise grace                       # the 10,000-edit stream

``--wild`` adds WILD's generation scores at each checkpoint (the same sampled cases, with their
unedited scores); ``--max-hours`` stops a row after that much time with a final checkpoint where it is
(the table says how far it got; rerunning the command resumes it).

Each row is a sequential ``loka eval`` run in its own folder under ``--out``,
``<model>-<row>-b<batch>-n<N>[-s<sample>][-wild]`` (a ``--wild`` row's folder made before the ``-wild``
suffix is resumed where it is): rerunning the same command resumes each row from its folder (it says so);
a folder made with other settings is refused (use another ``--out``, or rerun with that folder's settings).
A checkpoint every ``--every`` batches (the first and the last always), or at ``--checkpoints`` (batch
ends): ES/PS/NS/S over all facts edited so far and the general-ability guard (perplexity, multiple
choice). Rows: MEMIT, MEMIT+PRUNE, AlphaEdit, AlphaEdit+ (all three options) and one row per option
(ablation), LyapLock, SCR. Asserts that no edited weight and no score is NaN/Inf. Prints one table
(metrics at the last checkpoint and after the first batch), writes
``RESULTS/lifelong_<model>_n<N>[_wild][_<tag>].json`` and
``RESULTS/plots/lifelong_<model>_n<N>[_wild][_<tag>].png`` (ES/PS/NS/perplexity against edits), both
after every row; ``RESULTS`` is ``--results``, by default this repository's ``benchmarks/results``
wherever the command runs. Rows of earlier runs of the same setting (records, batch, checkpoints, and
the same data: the file's sha256 is recorded) are kept; each row of ``rows`` carries the provenance of
the run that measured it (its ``series`` entry is from the same run).

The records are ``data/generated/cf_lifelong_1000.json`` (``loka data counterfact --from known+mquake
--min-subjects 1``: the 1,209 known facts alone give at most 920 records; with MQuAKE's true single-hop
facts of the same relations, 1,397), so the default is 1,000 edits in 10 batches of 100. That default file
is built when missing; any other ``--data`` must exist (``loka data lifelong --n N --out PATH`` builds a
stream).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import ROOT, merge_rows, stamp, write_result

import loka
from loka.bench.counterfact import build_counterfact, load_known, mquake_facts
from loka.cli import OneLineParser
from loka.errors import ConfigError, InputError, LokaError
from loka.eval.data import load_cases
from loka.eval.runner import EvalConfig, run_eval
from loka.utils.io import atomic_write_json, sha256_file

DEFAULT_DATA = ROOT / "data" / "generated" / "cf_lifelong_1000.json"  # built when missing
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
_REF_SEARCH = {"v_beta1": 0.9, "v_dtype": "float32"}  # the reference's Adam, float32
_V_LR2 = {**_REF_SEARCH, "v_lr": 2.0}
ROWS = {
    "memit": ("memit", {}, None),
    "memit-b0.9": ("memit", _REF_SEARCH, None),  # the reference's Adam in float32, MEMIT's SmolLM2 step
    "memit+prune": ("memit", {}, math.e),
    "alphaedit": ("alphaedit", {}, None),
    "alphaedit+": (
        "alphaedit",
        {"relax_projection": True, "smooth_values": True, "conflict_weighting": True},
        None,
    ),
    "alphaedit+relax": ("alphaedit", {"relax_projection": True}, None),
    "alphaedit+smooth": ("alphaedit", {"smooth_values": True}, None),
    "alphaedit+conflict": ("alphaedit", {"conflict_weighting": True}, None),
    "lyaplock": ("lyaplock", {}, None),
    "scr": ("scr", {}, None),
    # AlphaEdit's ablations (docs/sequential.md): the threshold (the reference 2e-2 is the SmolLM2 default;
    # benchmarks/alphaedit_nullspace.py), the statistics and the accumulated-keys term at v_lr 2.0, the
    # value-search step at 0.5, and the faster search (v_lr 1.0 with Adam's β₁ 0.5, bfloat16); each row
    # pins its search settings, so a later default does not change what it measures
    "alphaedit-th0.01": ("alphaedit", {"nullspace_threshold": 0.01, **_V_LR2}, None),
    "alphaedit-th0.005": ("alphaedit", {"nullspace_threshold": 0.005, **_V_LR2}, None),
    "alphaedit-th0.05": ("alphaedit", {"nullspace_threshold": 0.05, **_V_LR2}, None),
    "alphaedit-tofu": ("alphaedit", {"mom2_corpus": "tofu", "mom2_n_tokens": 40000, **_V_LR2}, None),
    "alphaedit-self100k": ("alphaedit", {"mom2_n_tokens": 100_000, **_V_LR2}, None),
    "alphaedit-vlr0.5": ("alphaedit", {**_REF_SEARCH, "v_lr": 0.5}, None),
    "alphaedit-vlr2": ("alphaedit", _V_LR2, None),
    "alphaedit-ref": ("alphaedit", {**_REF_SEARCH, "v_lr": 0.5}, None),  # the reference's search
    "alphaedit-nopast": ("alphaedit", {"accumulate_keys": False, **_V_LR2}, None),
    "alphaedit-vlr1-b0.5-bf16": ("alphaedit", {"v_lr": 1.0, "v_beta1": 0.5, "v_dtype": "bfloat16"}, None),
    "ultraedit": ("ultraedit", {}, None),
    # gradient rows clipped at 5x the turn's median (not in the reference): src/loka/methods/ultraedit.py
    "ultraedit-clip5": ("ultraedit", {"grad_clip": 5.0}, None),
    "memoir": ("memoir", {}, None),
    "wise": ("wise", {}, None),
    "grace": ("grace", {}, None),
}


def _finite(out: Path) -> None:
    for p in sorted((out / "artifacts").glob("*.loka")):
        a = loka.load_artifact(p)
        bad = [k for k, v in a.deltas.items() if not torch.isfinite(v).all()]
        assert not bad, f"{p}: non-finite values in {bad}"
    for line in (out / "sequential.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if isinstance(v, float):
                assert math.isfinite(v), f"{out}: {k} = {v} at {row['n_edits']} edits"


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(  # refusals are one line and exit status 2, as loka's own commands
        prog="lifelong.py",
        description=__doc__.splitlines()[0],
        epilog=f"Results: RESULTS/lifelong_<model>_n<N>[_wild][_<tag>].json, plot: "
        f"RESULTS/plots/lifelong_<model>_n<N>[_wild][_<tag>].png, RESULTS being --results (default: "
        f"{DEFAULT_RESULTS}, whatever the current folder). Rerunning the same command resumes each row "
        "from its folder under --out.",
    )
    ap.add_argument(
        "--model", default="smollm2-135m", help="the model to edit (a loka model name) (default: %(default)s)"
    )
    ap.add_argument(
        "--n",
        type=int,
        default=1000,
        help="edits in all: the first N records of --data, which must hold at least N (default: %(default)s)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=100,
        help="edits per batch, applied one batch after another; checkpoints fall at batch ends "
        "(default: %(default)s)",
    )
    ap.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        metavar="ROW",
        help=f"the rows to run, in this order (default: all): {', '.join(ROWS)}",
    )
    ap.add_argument(
        "--data",
        help="the records, CounterFact format (default: data/generated/cf_lifelong_1000.json of this "
        "repository, built when missing; any other path must exist: `loka data lifelong --n N --out PATH` "
        "builds a stream)",
    )
    ap.add_argument(
        "--every",
        type=int,
        default=1,
        help="score a checkpoint every K batches (the first and the last batch always) (default: %(default)s)",
    )
    ap.add_argument(
        "--score-sample",
        type=int,
        metavar="N",
        help="score a seeded random sample of N edited facts at each checkpoint instead of all "
        "(an estimate, for slow-scoring rows such as scr; the row is labelled ROW@N) (default: all)",
    )
    ap.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        help="score at these numbers of edits, multiples of --batch up to --n (instead of --every; "
        "the last edit is always scored)",
    )
    ap.add_argument(
        "--wild", action="store_true", help="also WILD's generation scores at each checkpoint (default: off)"
    )
    ap.add_argument(
        "--max-hours",
        type=float,
        help="stop a row after this long, with a checkpoint there; rerunning the command goes on "
        "(default: no limit)",
    )
    ap.add_argument(
        "--out",
        default="out/lifelong",
        help="folder of the rows' run folders, <model>-<row>-b<batch>-n<N>[-s<sample>][-wild]; a row whose "
        "folder exists resumes from it (default: %(default)s)",
    )
    ap.add_argument(
        "--results",
        help=f"folder of the result JSON and, under plots/, the plot (default: {DEFAULT_RESULTS})",
    )
    ap.add_argument(
        "--tag",
        help="suffix of the result and plot file names (a separate table, e.g. for ablations) (default: none)",
    )
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot run as asked, before any model or data is loaded."""
    for flag, value, what in (
        ("--n", args.n, "edits"),
        ("--batch", args.batch, "edits per batch"),
        ("--every", args.every, "batches"),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be a positive number of {what}, got {value}")
    if args.score_sample is not None and args.score_sample < 1:
        raise ConfigError(
            f"--score-sample must be a positive number of facts, got {args.score_sample} (leave it out to score all)"
        )
    if args.max_hours is not None and not (math.isfinite(args.max_hours) and args.max_hours > 0):
        raise ConfigError(
            f"--max-hours must be a positive number of hours, got {args.max_hours} (leave it out for no limit)"
        )
    if args.batch > args.n:
        raise ConfigError(f"--batch {args.batch} is more than --n {args.n}: pass --batch {args.n} or less")
    for c in args.checkpoints or ():
        if not (0 < c <= args.n and (c % args.batch == 0 or c == args.n)):
            lower = c - c % args.batch
            near = [x for x in (lower, lower + args.batch) if 0 < x <= args.n] or [args.n]
            raise ConfigError(
                f"--checkpoints {c}: a checkpoint must be a multiple of --batch {args.batch} (a batch's end) "
                f"and at most --n {args.n}; pass {' or '.join(map(str, near))} instead"
            )
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag):
        raise ConfigError(
            f"--tag {args.tag!r} must be letters, digits, '.', '_' or '-' (it is part of file names)"
        )
    results = Path(args.results) if args.results else DEFAULT_RESULTS
    if results.exists() and not results.is_dir():
        raise ConfigError(f"--results {results} is a file; it must be a folder: pass another --results")


def result_paths(results: Path, model: str, n: int, wild: bool, tag: str | None) -> tuple[Path, Path]:
    """The result JSON and the plot of a run: ``_wild`` and ``_<tag>`` in both names."""
    name = f"lifelong_{model}_n{n}" + ("_wild" if wild else "") + (f"_{tag}" if tag else "")
    return results / f"{name}.json", results / "plots" / f"{name}.png"


def data_file(arg: str | None, n: int) -> Path:
    """``--data``, which must exist; the default file is built when missing."""
    data = Path(arg) if arg else DEFAULT_DATA
    if data.exists():
        if not data.is_file():
            raise InputError(f"--data {data} is not a file: pass the records file")
        return data
    if data.resolve() != DEFAULT_DATA.resolve():
        raise InputError(
            f"--data {data} does not exist: check the path, or build a stream there with "
            f"`loka data lifelong --n {n} --out {data}`"
        )
    known = load_known()
    atomic_write_json(
        data, build_counterfact(known + mquake_facts(exclude=known), None, seed=0, min_subjects=1)
    )
    return data


def data_record(data: Path) -> dict:
    """What a result records of its data: the path (relative to the repository when inside it), sha256."""
    path = data.resolve()
    return {
        "path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "sha256": sha256_file(data),
    }


def row_folder(out: Path, name: str, wild: bool) -> Path:
    """A row's run folder: ``name``, with ``-wild`` for a ``--wild`` run, so that the two do not share
    one; a ``--wild`` row's folder made before the suffix (``name`` holding a wild run) is kept."""
    if not wild:
        return out / name
    tagged, plain = out / f"{name}-wild", out / name
    if not tagged.exists():
        try:
            if json.loads((plain / "config.json").read_text()).get("wild") is True:
                return plain
        except (OSError, ValueError, AttributeError):
            pass
    return tagged


def edits_done(out: Path, batch: int, n: int) -> int:
    """How many edits a row's folder holds: its batch index, else its edit log."""
    try:
        batches = len(json.loads((out / "batches.json").read_text())["batches"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            batches = sum(1 for x in (out / "edits.jsonl").read_text().splitlines() if x.strip())
        except OSError:
            batches = 0
    return min(batches * batch, n)


def _folder_message(msg: str) -> str:
    """The eval runner's refusal of a folder with other settings, with the fix this script offers (it has
    no --resume: a row resumes whenever its folder exists)."""
    fix = "use another --out, or rerun with the settings that folder was made with"
    msg = msg.replace("use another --out or drop --resume", fix)
    if "--resume" in msg:
        msg += f" (lifelong.py resumes a row whenever its folder exists: {fix})"
    return msg


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (LokaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume each row from its folder", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    check_args(args)
    data = data_file(args.data, args.n)
    cases = load_cases(data, args.n)
    if len(cases) < args.n:
        raise ConfigError(
            f"--n {args.n}: {data} holds only {len(cases)} records; pass --n {len(cases)} or less, or build a "
            f"longer stream with `loka data lifelong --n {args.n} --out PATH` and pass it as --data"
        )
    data_info = data_record(data)
    ends = list(range(args.batch, len(cases) + 1, args.batch))
    ckpts = tuple(
        sorted(set(args.checkpoints) if args.checkpoints else {ends[0], ends[-1], *ends[:: args.every]})
    )
    res, plot = result_paths(
        Path(args.results) if args.results else DEFAULT_RESULTS, args.model, len(cases), args.wild, args.tag
    )
    setting = (len(cases), args.batch, ckpts)
    table, series = _rows_of(
        res, setting, data, data_info
    )  # rows finished earlier or by a parallel invocation
    mine, my_series = {}, {}  # the rows this run measures
    handle = loka.load_model(args.model)
    started = stamp()
    for row in args.rows:
        method, hp, prune = ROWS[row]
        name = f"{handle.name}-{row}-b{args.batch}-n{len(cases)}"
        if args.score_sample:
            row = f"{row}@{args.score_sample}"
            name += f"-s{args.score_sample}"
        out = row_folder(Path(args.out), name, args.wild)
        cfg = EvalConfig(
            method=method,
            mode="sequential",
            batch_size=args.batch,
            hparams=hp,
            checkpoints=ckpts,
            prune=prune,
            score_sample=args.score_sample,
            wild=args.wild,
            max_seconds=args.max_hours * 3600 if args.max_hours else None,
        )
        resume = (out / "config.json").exists()
        if resume:
            print(
                f"{row}: resuming at {edits_done(out, args.batch, len(cases))} of {len(cases)} edits from {out}",
                flush=True,
            )
        try:
            run_eval(handle, cases, cfg, out, resume=resume)
        except ConfigError as e:
            raise ConfigError(_folder_message(str(e))) from None
        _finite(out)
        seq = [json.loads(x) for x in (out / "sequential.jsonl").read_text().splitlines()]
        my_series[row] = seq
        first, last = seq[0], seq[-1]
        summary = json.loads((out / "summary.json").read_text())
        mine[row] = {
            "edits": last["n_edits"],
            "reached_all": last["n_edits"] == len(cases),
            "edit_seconds": summary.get("edit_seconds"),
            "scored": last.get("n"),
            **{
                k: last.get(k)
                for k in (
                    "ES",
                    "PS",
                    "NS",
                    "S",
                    "reliability",
                    "generalization",
                    "wild_success",
                    "wild_para",
                    "wild_locality",
                )
                if k in last
            },
            "NS_first_batch": first.get("NS"),
            "unedited_same_cases": last.get("pre"),
            "ppl_unedited": summary.get("guard_pre", {}).get("ppl"),
            "ppl": last["guard"]["ppl"],
            "mc_real_authors": last["guard"]["mc_real_authors"],
            "mc_world_facts": last["guard"]["mc_world_facts"],
        }
        print(row, json.dumps(mine[row]), flush=True)
        # written after every row, so an interrupted run keeps the rows it finished; rows of another
        # invocation written meanwhile are kept
        old_table, old_series = _rows_of(res, setting, data, data_info)
        table = merge_rows(old_table, {k: {**r, "data": data_info} for k, r in mine.items()}, started)
        series = {**old_series, **my_series}
        write_result(
            res,
            {
                "model": args.model,
                "n": len(cases),
                "batch": args.batch,
                "checkpoints": ckpts,
                "rows": table,
                "series": series,
                "data": data_info,
            },
            provenance=started,
        )
        _plot(series, plot, f"{args.model}: sequential editing, batches of {args.batch}")
    cols = ("ES", "PS", "NS", "S", "reliability", "wild_success", "wild_para", "wild_locality")
    print(
        f"\n| {args.model}, batches of {args.batch} | edits | "
        + " | ".join(cols)
        + " | ppl | MC authors | MC world |"
    )
    print("|---" * (len(cols) + 5) + "|")
    for row, r in table.items():
        cells = [f"{r[k]:.3f}" if r.get(k) is not None else "–" for k in cols]
        print(
            f"| {row} | {r['edits']}{'' if r.get('reached_all', True) else ' (stopped)'} | "
            + " | ".join(cells)
            + f" | {r['ppl']:.1f} | {r['mc_real_authors']:.2f} | {r['mc_world_facts']:.2f} |"
        )
    return 0


def _rows_of(res: Path, setting: tuple, data: Path, data_info: dict) -> tuple[dict, dict]:
    """The rows and series already in ``res`` for the same (records, batch, checkpoints) and data. Refuses
    when ``res`` holds rows of another setting (writing this run's row would drop them: a resumed row run
    with another ``--every`` did exactly that) or of other data, and when ``res`` is not a result of this
    script (it is never overwritten)."""
    if not res.exists():
        return {}, {}
    try:
        old = json.loads(res.read_text())
    except (UnicodeDecodeError, ValueError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("rows", {}), dict):
        raise ConfigError(
            f"{res} is not a lifelong result and is never overwritten: pass --results with another folder, "
            "or move that file away first"
        )
    have = (old.get("n"), old.get("batch"), tuple(old.get("checkpoints", ())))
    if old.get("rows") and have != setting:
        raise ConfigError(
            f"{res} holds rows for {have[0]} records, batches of {have[1]}, checkpoints {list(have[2])}; "
            f"this run would score {setting[0]} / {setting[1]} / {list(setting[2])} and overwrite them. "
            "Pass the same --n/--batch/--checkpoints (or --every), or --results with another folder, "
            "or move that file away first."
        )
    if old.get("rows"):
        _same_data(res, old, data, data_info)
    if have == setting:
        return old.get("rows", {}), old.get("series", {})
    return {}, {}


def _same_data(res: Path, old: dict, data: Path, data_info: dict) -> None:
    """Refuse to add rows made from ``data`` to ``res``'s rows made from other data: by the sha256 the file
    records, else (a file written before it did) by the ``--data`` of the commands its provenance records."""
    recorded = [old.get("data"), *(r.get("data") for r in old["rows"].values() if isinstance(r, dict))]
    hashes = {d["sha256"]: d.get("path") for d in recorded if isinstance(d, dict) and d.get("sha256")}
    fix = "pass --results with another folder to keep this run's rows apart, or the --data those rows were made from"
    if hashes:
        other = {h: p for h, p in hashes.items() if h != data_info["sha256"]}
        if other:
            h, p = next(iter(other.items()))
            raise ConfigError(
                f"{res} holds rows made from other data ({p}, sha256 {h[:12]}…) than --data {data} "
                f"(sha256 {data_info['sha256'][:12]}…); {fix}"
            )
        return
    stamps = [
        old.get("provenance"),
        *(r.get("provenance") for r in old["rows"].values() if isinstance(r, dict)),
    ]
    for st in stamps:  # a relative --data of a recorded command is read from the repository root
        given = _data_arg(st.get("command")) if isinstance(st, dict) else None
        if given is not None and (ROOT / given).resolve() != data.resolve():
            raise ConfigError(
                f"{res} holds rows made from other data (--data {given}) than --data {data}; {fix}"
            )


def _data_arg(command: object) -> str | None:
    """The ``--data`` of a recorded command line, if it names one."""
    if not isinstance(command, str):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, w in enumerate(words):
        if w == "--data" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--data="):
            return w.split("=", 1)[1]
    return None


def _plot(series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for row, seq in series.items():
        x = [r["n_edits"] for r in seq]
        for ax, key in zip(axes[:3], ("ES", "PS", "NS")):
            ax.plot(x, [r[key] for r in seq], marker=".", label=row)
        axes[3].plot(x, [r["guard"]["ppl"] for r in seq], marker=".", label=row)
    for ax, name in zip(axes, ("ES", "PS", "NS", "perplexity (held-out)")):
        ax.set_title(name)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
