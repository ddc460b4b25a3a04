"""Spectral analysis of sequential edits (the diagnosis behind PRUNE, Ma et al. 2024).

For each edited matrix, after each artifact of a sequence: σ_max, σ_min and the condition number
σ_max/σ_min of the edited matrix ``W + Σ ΔW`` and σ_max of the accumulated update ``Σ ΔW``,
against the number of edits so far. Without restraint, σ_max and the condition number grow with
the number of edits and the model's general abilities fall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .artifact import Artifact

if TYPE_CHECKING:
    from .models.loader import ModelHandle


def spectrum(handle: ModelHandle, artifacts: Sequence[Artifact], every: int = 1) -> list[dict]:
    """Rows ``{n_edits, batch, matrix, sigma_max, sigma_min, cond, delta_sigma_max}``, the unedited
    matrices first (``n_edits`` 0); every ``every``-th artifact and the last one are measured."""
    names = sorted({n for a in artifacts for n in a.weight_deltas()})
    base = {n: handle.param(n).detach().double() for n in names}
    acc = {n: torch.zeros_like(base[n]) for n in names}
    rows, n_edits = [], 0

    def measure(k: int) -> None:
        for n in names:
            s = torch.linalg.svdvals(base[n] + acc[n])
            rows.append(
                {
                    "n_edits": n_edits,
                    "batch": k,
                    "matrix": n,
                    "sigma_max": float(s[0]),
                    "sigma_min": float(s[-1]),
                    "cond": float(s[0] / s[-1].clamp_min(1e-30)),
                    "delta_sigma_max": float(torch.linalg.matrix_norm(acc[n], ord=2)),
                }
            )

    measure(0)
    for k, a in enumerate(artifacts, 1):
        for n, d in a.weight_deltas().items():
            acc[n] += d.double()
        n_edits += len(a.manifest.get("requests", [])) or 1
        if k % every == 0 or k == len(artifacts):
            measure(k)
    return rows


def format_spectrum(rows: list[dict], max_rows: int = 12) -> str:
    """A plain-text table: per matrix, a few rows spread over the sequence."""
    out = [f"{'edits':>6s}  {'matrix':40s} {'σ_max':>9s} {'σ_min':>10s} {'cond':>10s} {'σ_max(ΣΔ)':>10s}"]
    for m in sorted({r["matrix"] for r in rows}):
        mine = [r for r in rows if r["matrix"] == m]
        step = max(1, len(mine) // max_rows)
        pick = mine[::step] + ([mine[-1]] if (len(mine) - 1) % step else [])
        for r in pick:
            out.append(
                f"{r['n_edits']:6d}  {m:40s} {r['sigma_max']:9.3f} {r['sigma_min']:10.3g} {r['cond']:10.1f} "
                f"{r['delta_sigma_max']:10.3f}"
            )
    return "\n".join(out)


def plot_spectrum(series: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """σ_max and condition number against edits, one line per (series, matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, rows in series.items():
        for m in sorted({r["matrix"] for r in rows}):
            mine = [r for r in rows if r["matrix"] == m]
            x = [r["n_edits"] for r in mine]
            short = m.replace(".weight", "").split(".", 2)[-1]
            for ax, key in zip(axes, ("sigma_max", "cond", "delta_sigma_max")):
                ax.plot(x, [r[key] for r in mine], marker=".", label=f"{label} {short}")
    for ax, name in zip(axes, ("σ_max(W + ΣΔ)", "condition number", "σ_max(ΣΔ)")):
        ax.set_xlabel("edits")
        ax.set_title(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
