"""Lifelong editing: many CounterFact edits in batches, one method after another, no revert.

    python benchmarks/lifelong.py --model smollm2-135m --n 1000 --batch 100 --every 3
    python benchmarks/lifelong.py --rows memit alphaedit --n 200 --batch 50      # a shorter run
    python benchmarks/lifelong.py --data data/generated/lifelong_10000.json --n 10000 --batch 100 \
        --checkpoints 100 1000 3000 10000 --score-sample 300 --wild --max-hours 2 \
        --rows ultraedit memoir alphaedit memit wise grace                       # the 10,000-edit stream

``--wild`` adds WILD's generation scores at each checkpoint (the same sampled cases, with their
unedited scores); ``--max-hours`` stops a row after that much time with a final checkpoint where it is
(the table says how far it got; rerunning the command resumes it).

Each row is a sequential ``loka eval`` run (resumable: rerun the same command after an interruption)
with a checkpoint every ``--every`` batches (the first and the last always): ES/PS/NS/S over all facts
edited so far and the general-ability guard (perplexity, multiple choice). Rows: MEMIT, MEMIT+PRUNE, AlphaEdit, AlphaEdit+ (all three
options) and one row per option (ablation), LyapLock, SCR. Asserts that no edited weight and no
score is NaN/Inf. Prints one table (metrics at the last checkpoint and after the first batch), writes
``benchmarks/results/lifelong_<model>_n<N>.json`` and ``benchmarks/results/plots/lifelong_<model>_n<N>.png``
(ES/PS/NS/perplexity against edits), both after every row. Rows of earlier runs of the same setting
are kept; each row of ``rows`` carries the provenance of the run that measured it (its ``series``
entry is from the same run).

The records are ``data/generated/cf_lifelong_1000.json`` (``loka data counterfact --from known+mquake
--min-subjects 1``: the 1,209 known facts alone give at most 920 records; with MQuAKE's true single-hop
facts of the same relations, 1,397), so the default is 1,000 edits in 10 batches of 100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import merge_rows, stamp, write_result

import loka
from loka.bench.counterfact import build_counterfact, load_known, mquake_facts
from loka.eval.data import load_cases
from loka.eval.runner import EvalConfig, run_eval
from loka.utils.io import atomic_write_json

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--data", default="data/generated/cf_lifelong_1000.json")
    ap.add_argument(
        "--every",
        type=int,
        default=1,
        help="score a checkpoint every K batches (the first and the last batch always)",
    )
    ap.add_argument(
        "--score-sample",
        type=int,
        metavar="N",
        help="score a seeded random sample of N edited facts at each checkpoint instead of all "
        "(an estimate, for slow-scoring rows such as scr; the row is labelled ROW@N)",
    )
    ap.add_argument(
        "--checkpoints", type=int, nargs="+", help="score at these numbers of edits (instead of --every)"
    )
    ap.add_argument("--wild", action="store_true", help="also WILD's generation scores at each checkpoint")
    ap.add_argument("--max-hours", type=float, help="stop a row after this long, with a checkpoint there")
    ap.add_argument("--out", default="out/lifelong")
    ap.add_argument(
        "--tag", help="suffix of the result and plot file names (a separate table, e.g. for ablations)"
    )
    args = ap.parse_args()
    data = Path(args.data)
    if not data.exists():
        known = load_known()
        atomic_write_json(
            data, build_counterfact(known + mquake_facts(exclude=known), None, seed=0, min_subjects=1)
        )
    cases = load_cases(data, args.n)
    ends = list(range(args.batch, len(cases) + 1, args.batch))
    ckpts = tuple(
        sorted(set(args.checkpoints) if args.checkpoints else {ends[0], ends[-1], *ends[:: args.every]})
    )
    tag = ("_wild" if args.wild else "") + (f"_{args.tag}" if args.tag else "")
    res = Path("benchmarks/results") / f"lifelong_{args.model}_n{len(cases)}{tag}.json"
    setting = (len(cases), args.batch, ckpts)
    table, series = _rows_of(res, setting)  # rows finished earlier or by a parallel invocation
    mine, my_series = {}, {}  # the rows this run measures
    handle = loka.load_model(args.model)
    started = stamp()
    for row in args.rows:
        method, hp, prune = ROWS[row]
        out = Path(args.out) / f"{handle.name}-{row}-b{args.batch}-n{len(cases)}"
        if args.score_sample:
            row = f"{row}@{args.score_sample}"
            out = out.with_name(out.name + f"-s{args.score_sample}")
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
        run_eval(handle, cases, cfg, out, resume=(out / "config.json").exists())
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
        old_table, old_series = _rows_of(res, setting)
        table, series = merge_rows(old_table, mine, started), {**old_series, **my_series}
        write_result(
            res,
            {
                "model": args.model,
                "n": len(cases),
                "batch": args.batch,
                "checkpoints": ckpts,
                "rows": table,
                "series": series,
            },
            provenance=started,
        )
        _plot(
            series,
            Path("benchmarks/results/plots")
            / f"lifelong_{args.model}_n{len(cases)}{f'_{args.tag}' if args.tag else ''}.png",
            f"{args.model}: sequential editing, batches of {args.batch}",
        )
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


def _rows_of(res: Path, setting: tuple) -> tuple[dict, dict]:
    """The rows and series already in ``res`` for the same (records, batch, checkpoints). Refuses (exits)
    when ``res`` holds rows of another setting: writing this run's row would drop them (a resumed row
    run with another ``--every`` did exactly that)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no file or not ours: nothing to keep
        old = json.loads(res.read_text())
        have = (old.get("n"), old.get("batch"), tuple(old.get("checkpoints", ())))
        if old.get("rows") and have != setting:
            raise SystemExit(
                f"{res} holds rows for {have[0]} records, batches of {have[1]}, checkpoints {list(have[2])}; "
                f"this run would score {setting[0]} / {setting[1]} / {list(setting[2])} and overwrite them. "
                "Pass the same --n/--batch/--every, or move that file away first."
            )
        if have == setting:
            return old.get("rows", {}), old.get("series", {})
    return {}, {}


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
    main()
