"""LOKA router calibration: false positives on retained queries, false negatives on paraphrased
updated queries, across thresholds (SmolLM2 known-facts joint tasks).

    python benchmarks/loka_router.py --settings in out

The router is trained exactly as ``loka`` trains it (positives: the edit and forget prompts;
negatives: the retain prompts, the generic out-of-scope sentences and the update prompts with a
retained subject swapped in), then scored on queries it never saw: the paraphrases of the edit and
forget prompts (should fire) and the held-out remaining facts (should not). The same for the
retrieval gate (``match_threshold``: MiniLM cosine to the nearest updated query), alone and behind the
router at its default threshold. Prints the tables per setting, writes
``benchmarks/results/loka_router_<model>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _stamp import stamp, write_result
from joint_update import requests_of

from loka.bench.tasks import build_tasks
from loka.cli.common import parse_overrides
from loka.methods.codebook import Loka, LokaHParams, encoder_embeddings, train_router
from loka.methods.codebook.method import _Item

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
GATES = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85]


def _nearest_cosine(texts: list[str], items) -> torch.Tensor:
    q = torch.nn.functional.normalize(encoder_embeddings(texts), dim=-1)
    return (q @ items.T).max(-1).values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="only names the output (the router reads text)")
    ap.add_argument("--data", default="data/generated/cf_smollm2.json")
    ap.add_argument("--settings", nargs="+", default=["in", "out"], choices=["in", "out"])
    ap.add_argument("--n-edit", type=int, default=25)
    ap.add_argument("--n-forget", type=int, default=25)
    ap.add_argument("--n-retain", type=int, default=50)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="router hyperparameter override"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = stamp()
    records = json.loads(Path(args.data).read_text())
    hp = LokaHParams().replace(**parse_overrides(args.set))
    res = {
        "model": args.model,
        "thresholds": THRESHOLDS,
        "router_hparams": {
            k: getattr(hp, k) for k in ("router_layers", "router_epochs", "router_lr", "swap_negatives")
        },
        "settings": {},
    }
    for setting in args.settings:
        task = build_tasks(records, setting, args.n_edit, args.n_forget, args.n_retain, seed=0)
        edits, forget, retain = requests_of(task)
        items = [_Item("edit", r.text, r.target_new, r.to_dict(), None) for r in edits]
        items += [_Item("forget", r.text, r.target_true, r.to_dict(), None) for r in forget]
        retain_items = [(r.text, r.target_new, r.to_dict()) for r in retain]
        neg = Loka._negatives(items, retain_items, hp, random.Random(hp.seed))
        router, info = train_router(
            [i.text for i in items],
            neg,
            layers=hp.router_layers,
            epochs=hp.router_epochs,
            lr=hp.router_lr,
            seed=hp.seed,
        )
        para = [p for r in edits + forget for p in r.paraphrases]
        fill = lambda f: f["prompt"].replace("{}", f["subject"])  # noqa: E731
        remaining = [fill(f) for f in task["remaining"]]
        p_para, p_rem, p_ret = (
            router.probs(para),
            router.probs(remaining),
            router.probs([r.text for r in retain]),
        )
        rows = [
            {
                "threshold": t,
                "fnr_paraphrase": float((p_para < t).float().mean()),
                "fpr_remaining": float((p_rem >= t).float().mean()),
                "fpr_retain": float((p_ret >= t).float().mean()),
            }
            for t in THRESHOLDS
        ]
        items_e = torch.nn.functional.normalize(encoder_embeddings([i.text for i in items]), dim=-1)
        c_para, c_rem, c_ret = (
            _nearest_cosine(x, items_e) for x in (para, remaining, [r.text for r in retain])
        )
        on_para, on_rem = p_para >= hp.router_threshold, p_rem >= hp.router_threshold
        gates = [
            {
                "match_threshold": g,
                "fnr_paraphrase": float((c_para < g).float().mean()),
                "fpr_remaining": float((c_rem >= g).float().mean()),
                "fpr_retain": float((c_ret >= g).float().mean()),
                "with_router_fnr_paraphrase": float((~(on_para & (c_para >= g))).float().mean()),
                "with_router_fpr_remaining": float((on_rem & (c_rem >= g)).float().mean()),
            }
            for g in GATES
        ]
        res["settings"][setting] = {
            "router": info,
            "n_paraphrase": len(para),
            "n_remaining": len(remaining),
            "rows": rows,
            "gate": gates,
            "cosine_max": {"remaining": float(c_rem.max()), "retain": float(c_ret.max())},
            "cosine_min": {"paraphrase": float(c_para.min())},
        }
        print(
            f"\n{setting}-profile: {len(para)} paraphrased updated queries, {len(remaining)} remaining, "
            f"{len(retain)} retain (trained on)"
        )
        print("| threshold | FNR paraphrases | FPR remaining | FPR retain (train) |")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['threshold']} | {r['fnr_paraphrase']:.3f} | {r['fpr_remaining']:.3f} | {r['fpr_retain']:.3f} |"
            )
        print(
            f"\nretrieval gate (cosine to the nearest updated query; paraphrases >= {float(c_para.min()):.3f}, "
            f"remaining <= {float(c_rem.max()):.3f}, retain <= {float(c_ret.max()):.3f}); last two columns: behind "
            f"the router at τ = {hp.router_threshold}"
        )
        print(
            "| match_threshold | FNR paraphrases | FPR remaining | FPR retain | FNR with router | FPR remaining with router |"
        )
        print("|---|---|---|---|---|---|")
        for g in gates:
            print(
                f"| {g['match_threshold']} | {g['fnr_paraphrase']:.3f} | {g['fpr_remaining']:.3f} | {g['fpr_retain']:.3f} "
                f"| {g['with_router_fnr_paraphrase']:.3f} | {g['with_router_fpr_remaining']:.3f} |"
            )
    out = Path(args.out or f"benchmarks/results/loka_router_{args.model}.json")
    write_result(out, res, provenance=started)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, block in res["settings"].items():
        ts = [r["threshold"] for r in block["rows"]]
        ax.plot(ts, [r["fnr_paraphrase"] for r in block["rows"]], "o-", label=f"{setting}: FNR paraphrases")
        ax.plot(ts, [r["fpr_remaining"] for r in block["rows"]], "s--", label=f"{setting}: FPR remaining")
        gs = [g["match_threshold"] for g in block["gate"]]
        ax2.plot(
            gs,
            [g["with_router_fnr_paraphrase"] for g in block["gate"]],
            "o-",
            label=f"{setting}: FNR paraphrases",
        )
        ax2.plot(
            gs,
            [g["with_router_fpr_remaining"] for g in block["gate"]],
            "s--",
            label=f"{setting}: FPR remaining",
        )
    ax.set_xlabel("router threshold τ")
    ax.set_ylabel("rate")
    ax.set_title(f"LOKA router ({args.model} known-facts tasks)")
    ax.legend(fontsize=8)
    ax2.set_xlabel(f"retrieval gate match_threshold (router at τ = {hp.router_threshold})")
    ax2.set_title("router + retrieval gate")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    png = Path("benchmarks/results/plots") / f"loka_router_{args.model}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
