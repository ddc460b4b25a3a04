"""The KnowledgeSmith part of ``loka report``: tables and plots comparing ``loka kg run`` folders,
and a per-intervention view (each fact, its probes before and after).

KL and CKA are log-min-max normalised across the runs of the same task (editing or unlearning), as
the seed reports them, in the table; the plots show the raw values, so a task with one run still has
its points.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..errors import RequestError
from ..utils.io import read_json, read_text
from . import kg_metrics as km
from .html import esc, img, page, png, table
from .kg_metrics import log_minmax

LEVEL_ORDER = {"root": 0, "intermediate": 1, "leaf": 2}


#: what every KG run summary has (an evaluation run's summary.json has none of it)
KG_RUN_KEYS = ("task", "method", "level", "scale")


def is_kg_run(folder: Path) -> bool:
    """Whether ``folder`` holds a ``loka kg run`` (its ``summary.json`` has the KG keys)."""
    try:
        s = read_json(Path(folder) / "summary.json", 64 * 1024 * 1024)
    except Exception:
        return False
    return isinstance(s, dict) and all(k in s for k in KG_RUN_KEYS)


def load_runs(dirs: list[str | Path]) -> list[dict]:
    """``summary.json`` of each run folder (a folder holding several runs contributes each of them)."""
    runs = []
    for d in dirs:
        p = Path(d)
        found = [p / "summary.json"] if (p / "summary.json").exists() else sorted(p.glob("*/summary.json"))
        if not found:
            raise RequestError(
                f"{p}: no summary.json (pass folders written by `loka kg run --out DIR` or `loka eval --out DIR`)"
            )
        for f in found:
            s = read_json(f, 64 * 1024 * 1024)
            missing = [k for k in KG_RUN_KEYS if not isinstance(s, dict) or k not in s]
            if missing:
                raise RequestError(
                    f"{f} is not the summary of a `loka kg run` (it lacks {', '.join(missing)}); "
                    "`loka report` reads the folders `loka kg run --out DIR` writes"
                )
            s["_dir"] = str(f.parent)
            runs.append(s)
    return runs


def normalise(runs: list[dict]) -> None:
    """Add ``kl_norm`` and ``cka_norm`` (log-min-max within each task; CKA on 1 − CKA would flip the
    direction, so CKA itself is normalised, higher = more similar)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_task[r["task"]].append(r)
    for group in by_task.values():
        for key in ("kl", "cka"):
            vals = [r.get(key) for r in group]
            if len(group) > 1 and all(v is not None for v in vals):  # one run has no range to normalise in
                for r, z in zip(group, log_minmax(vals)):
                    r[f"{key}_norm"] = z


def _key(r: dict):
    return (r["task"], r["method"], LEVEL_ORDER.get(r["level"], 9), r["scale"])


def main_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    head = [
        "task",
        "method",
        "level",
        "k",
        "direct (target)",
        "direct (orig)",
        "reverse",
        "multi-hop",
        "CCR",
        "CCR near",
        "CCR far",
        "RR",
        "conflict",
        "KL",
        "KL norm",
        "CKA",
        "CKA norm",
        "update s",
    ]
    rows = []
    for r in sorted(runs, key=_key):
        bt = r["by_type"]

        def acc(t, k="target_after", bt=bt):
            return bt.get(t, {}).get(k)

        rev = acc("reverse") if r["task"] == "edit" else acc("reverse", "original_after")
        mh = acc("multihop") if r["task"] == "edit" else acc("multihop", "original_after")
        rows.append(
            [
                r["task"],
                r["method"],
                r["level"],
                r["scale"],
                acc("direct"),
                acc("direct", "original_after"),
                rev,
                mh,
                r["ccr"],
                r["ccr_near"],
                r["ccr_far"],
                r["rr"],
                r["conflict_rate"],
                r["kl"],
                r.get("kl_norm"),
                r["cka"],
                r.get("cka_norm"),
                r["seconds"]["update"],
            ]
        )
    return head, rows


Q_PLUS_TYPES = ("direct", "reverse", "multihop", "comparison", "conflict")


def transfer_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Per Q+ probe type: the pre-update answer chosen before → after, and (edits) the new one after.
    Under-spreading shows as a type whose "before → after" barely moves while direct drops."""
    head = ["task", "method", "level", "k"]
    for t in Q_PLUS_TYPES:
        head += [f"{t}: orig before", f"{t}: orig after", f"{t}: new after"]
    rows = []
    for r in sorted(runs, key=_key):
        row = [r["task"], r["method"], r["level"], r["scale"]]
        for t in Q_PLUS_TYPES:
            a = r["by_type"].get(t, {})
            row += [a.get("original_before"), a.get("original_after"), a.get("target_after")]
        rows.append(row)
    return head, rows


def domain_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """CCR, RR and direct-probe success per domain, pooled over the runs of each task."""
    acc: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for d, s in r.get("by_domain", {}).items():
            a = acc[(r["task"], d)]
            n = s.get("interventions", 1)
            for k in ("ccr", "rr", "conflict_rate"):
                if s.get(k) is not None:
                    a[k].append((s[k], n))
            key = "target_after" if r["task"] == "edit" else "original_after"
            v = s.get("by_type", {}).get("direct", {}).get(key)
            if v is not None:
                a["direct"].append((v, n))

    def wmean(xs):
        w = sum(n for _, n in xs)
        return sum(v * n for v, n in xs) / w if w else None

    head = [
        "task",
        "domain",
        "direct (edit: new, forget: still old)",
        "CCR",
        "RR",
        "conflict",
        "interventions",
    ]
    rows = [
        [
            t,
            d,
            wmean(a["direct"]),
            wmean(a["ccr"]),
            wmean(a["rr"]),
            wmean(a["conflict_rate"]),
            sum(n for _, n in a["ccr"]),
        ]
        for (t, d), a in sorted(acc.items())
    ]
    return head, rows


def geometry_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    head = [
        "task",
        "method",
        "level",
        "k",
        "matrices",
        "σ'/σ min",
        "σ'/σ max",
        "scaling spread",
        "rotation U",
        "rotation V",
        "‖Δ‖/‖W‖",
    ]
    rows = []
    for r in sorted(runs, key=_key):
        g = r.get("geometry_mean") or {}
        if g:
            rows.append(
                [
                    r["task"],
                    r["method"],
                    r["level"],
                    r["scale"],
                    len(r["geometry"]),
                    g["scale_min"],
                    g["scale_max"],
                    g["scale_spread"],
                    g["rot_u"],
                    g["rot_v"],
                    g["rel_change"],
                ]
            )
    return head, rows


def plots(runs: list[dict]) -> dict[str, bytes]:
    """PNG bytes per plot name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(runs, key=_key):
        series[(r["task"], r["method"], r["level"])].append(r)

    def draw(ax, key):
        drawn = False
        for (task, method, level), rs in series.items():
            pts = [(r["scale"], r[key]) for r in rs if r.get(key) is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    ms=6,
                    ls="-" if task == "edit" else "--",
                    label=f"{task} {method} {level}",
                )
                drawn = True
        ax.set_xscale("log")
        ax.set_xlabel("interventions k")
        return drawn

    panels = [
        ("ccr", "CCR (contextual probes changed)"),
        ("rr", "RR (pre-update answer kept)"),
        ("conflict_rate", "conflict rate"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        draw(ax, key)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7)
    out["propagation"] = png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for ax, key, title in zip(
        axes, ("kl", "cka"), ("KL(before ‖ after) on the probe sample", "CKA before/after (mean over layers)")
    ):
        draw(ax, key)
        ax.set_title(title, fontsize=10)
    if any(r.get("kl") for r in runs) and all((r.get("kl") or 0) > 0 for r in runs):
        axes[0].set_yscale("log")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7)
    out["representation"] = png(fig)

    geo = [r for r in runs if r.get("geometry_mean")]
    if geo:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        sc = None
        for task, mk in (("edit", "o"), ("forget", "s")):
            rs = [r for r in geo if r["task"] == task]
            if rs:
                sc = ax.scatter(
                    [r["geometry_mean"]["rot_u"] for r in rs],
                    [r["geometry_mean"]["scale_spread"] for r in rs],
                    c=[LEVEL_ORDER.get(r["level"], 0) for r in rs],
                    cmap="viridis",
                    marker=mk,
                    s=[20 + 12 * len(str(r["scale"])) ** 2 for r in rs],
                    label=task,
                    vmin=0,
                    vmax=2,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        # few, unrotated major ticks only: log axes over a narrow range otherwise print overlapping minor labels
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_major_locator(matplotlib.ticker.LogLocator(numticks=5))
        ax.set_xlabel("rotation of the top-32 left singular subspace")
        ax.set_ylabel("scaling spread (std of log σ'/σ)")
        ax.set_title("SVD geometry (colour: level, size: k)", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        if sc is not None:
            cb = fig.colorbar(sc, ax=ax, ticks=[0, 1, 2])
            cb.ax.set_yticklabels(["root", "interm.", "leaf"])
        out["geometry"] = png(fig)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in read_text(path, 256 * 1024 * 1024).splitlines() if line.strip()]


def intervention_rows(run: dict, limit: int = 200) -> tuple[list[str], list[list]]:
    """One row per intervention of a run: the fact, its Q+ probes' answers before → after (the
    pre-update answer, and for edits the new one), its contextual probes changed (CCR) and RR."""
    d = Path(run["_dir"])
    ivs = _read_jsonl(d / "interventions.jsonl")
    probes = _read_jsonl(d / "probes.jsonl")
    by_iv: dict[int, list[dict]] = defaultdict(list)
    for p in probes:
        by_iv[p["intervention"]].append(p)
    head = ["subject", "relation", "old → new", "probes", "old before", "old after", "new after", "CCR", "RR"]
    rows = []
    for iv in ivs[:limit]:
        ps = by_iv.get(iv["index"], [])
        facts = {iv["index"]: (iv["old"], iv.get("new"))}
        s = km.summarise(ps, facts) if ps else {}
        plus = [p for p in ps if p["type"] != "contextual"]
        rows.append(
            [
                iv["head"],
                iv["relation"],
                f"{iv['old']} → {iv['new'] or '(forgotten)'}",
                len(ps),
                km.accuracy(plus, "original", "before") if plus else None,
                km.accuracy(plus, "original", "after") if plus else None,
                km.accuracy(plus) if plus and iv.get("new") else None,
                s.get("ccr"),
                s.get("rr"),
            ]
        )
    return head, rows


def sections(runs: list[dict]) -> list[str]:
    """The KG part of a report page (HTML fragments)."""
    normalise(runs)
    parts = []
    models = sorted({r["model"] for r in runs})
    parts.append(
        f"<p>{len(runs)} KnowledgeSmith run(s) on {esc(', '.join(models))}; graph(s) "
        f"{esc(', '.join(sorted({r['graph'] for r in runs})))}; scoring "
        f"{esc(', '.join(sorted({r['scoring'] for r in runs})))}.</p>"
    )
    parts.append(
        "<p class='note'>Edit rows: probe accuracy = the new object chosen. Forget rows: the columns show how "
        "often the forgotten object is still chosen. CCR = contextual (should-not-change) probes whose "
        "answer changed; RR = Q+ probes still answered with the pre-update object; conflict = interventions "
        "whose probes assert both the pre-update object and another. KL norm / CKA norm are log-min-max "
        "normalised within a task (– with a single run).</p>"
    )
    parts.append("<h2>Propagation</h2>" + table(*main_rows(runs)))
    imgs = plots(runs)
    for name in ("propagation", "representation", "geometry"):
        if name in imgs:
            parts.append(f"<h3>{name}</h3>" + img(name, imgs[name]))
    parts.append("<h2>Q+ probes: the pre-update answer before → after</h2>" + table(*transfer_rows(runs)))
    parts.append("<h2>By domain</h2>" + table(*domain_rows(runs)))
    parts.append("<h2>SVD geometry of the changed matrices</h2>" + table(*geometry_rows(runs)))
    parts.append("<h2>Per intervention</h2>")
    for r in sorted(runs, key=_key):
        head, rows = intervention_rows(r)
        parts.append(
            f"<details><summary>{esc(r['task'])} · {esc(r['method'])} · {esc(r['level'])} · k={r['scale']} "
            f"({len(rows)} intervention(s))</summary>"
            + (table(head, rows) if rows else "<p class='note'>no interventions.jsonl in the run folder</p>")
            + "</details>"
        )
    parts.append(
        "<h2>Runs</h2><ul>"
        + "".join(
            f"<li>{esc(r['_dir'])}: artifact {esc(r['artifact'])}, {r['probes']} probes</li>"
            for r in sorted(runs, key=_key)
        )
        + "</ul>"
    )
    return parts


def render(runs: list[dict], title: str = "loka KnowledgeSmith report") -> str:
    return page(title, sections(runs))
