"""LOKA ablation table and plots from the joint-update results.

    python benchmarks/loka_plots.py
    python benchmarks/loka_plots.py --ablation benchmarks/results/loka_ablation_smollm2-135m_defaults.json --tag defaults

Reads ``benchmarks/results/joint_update_<model>_loka.json`` (the default LOKA rows) and
``benchmarks/results/loka_ablation_<model>.json`` (``joint_update.py --variant ... --set ...`` rows),
prints one markdown table per setting (default row first) and writes two PNGs: the cluster-count
sweep (k = 1, 5, 10, 20, 40) and the conflict-rule comparison. The plots compare rows of one stopping
rule: the first ablation rows were run with the first-match stop, so its row (``BASE``) stands for
k = 20 / ``auto`` there when present (else the default row). ``--ablation`` reads another ablation
file (the ablations at the default settings, where the default row is the base) and ``--tag`` suffixes
the plot names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ["unl-tr", "unl-rl", "edt-rl", "edt-prl", "rem-tr", "rem-rl"]
RES = Path("benchmarks/results")
BASE = "first-match stop (before)"  # the stopping rule the ablation rows were run with


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--ablation",
        default=None,
        help="ablation rows (default benchmarks/results/loka_ablation_<model>.json)",
    )
    ap.add_argument("--tag", default="", help="suffix for the plot file names")
    args = ap.parse_args()
    main_rows = json.loads((RES / f"joint_update_{args.model}_loka.json").read_text())["settings"]
    abl = json.loads(Path(args.ablation or RES / f"loka_ablation_{args.model}.json").read_text())["settings"]
    tag = f"_{args.tag}" if args.tag else ""
    tables = {}
    for setting in ("in", "out"):
        rows = {}
        if setting in main_rows and "loka" in main_rows[setting]["rows"]:
            rows["loka (default: k=20, auto conflict, K-means, MiniLM keys, router, retrieval gate 0.65)"] = (
                main_rows[setting]["rows"]["loka"]
            )
        rows.update(abl.get(setting, {}).get("rows", {}))
        tables[setting] = rows
        if not rows:
            continue
        print(f"\n| {setting}-profile | " + " | ".join(KEYS) + " | memories | s |")
        print("|---" * (len(KEYS) + 3) + "|")
        for name, r in rows.items():
            mem = r.get("info", {}).get("memories", "")
            print(
                f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {mem} | {r['seconds']:.0f} |"
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = RES / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    def base(rows: dict):
        return rows.get(BASE) or next((r for n, r in rows.items() if n.startswith("loka")), None)

    rows = tables["in"]
    ks = [(k, rows.get(f"k={k}") or (base(rows) if k == 20 else None)) for k in (1, 5, 10, 20, 40)]
    ks = [(k, r) for k, r in ks if r]
    if ks:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in KEYS:
            ax.plot([k for k, _ in ks], [r[key] for _, r in ks], "o-", label=key)
        ax.set_xscale("log")
        ax.set_xticks([k for k, _ in ks], [str(k) for k, _ in ks])
        ax.set_xlabel("clusters k (K-means)")
        ax.set_title(f"LOKA cluster sweep, in-profile ({args.model})")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(plots / f"loka_clusters_{args.model}{tag}.png", dpi=120)
        print(f"plot: {plots / f'loka_clusters_{args.model}{tag}.png'}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, setting in zip(axes, ("in", "out")):
        rows = tables[setting]
        bars = [("auto", base(rows)), *((n, r) for n, r in rows.items() if n.startswith("conflict="))]
        bars = [(n, r) for n, r in bars if r]
        width = 0.8 / max(1, len(bars))
        for i, (n, r) in enumerate(bars):
            ax.bar([j + i * width for j in range(len(KEYS))], [r[k] for k in KEYS], width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(KEYS))], KEYS, fontsize=8)
        ax.set_title(f"{setting}-profile")
        ax.legend(fontsize=8)
    fig.suptitle(f"LOKA conflict rule ({args.model})")
    fig.tight_layout()
    fig.savefig(plots / f"loka_conflict_{args.model}{tag}.png", dpi=120)
    print(f"plot: {plots / f'loka_conflict_{args.model}{tag}.png'}")


if __name__ == "__main__":
    main()
