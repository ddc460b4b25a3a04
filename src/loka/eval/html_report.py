"""``loka report RUN_DIR...``: one self-contained HTML page comparing KnowledgeSmith runs
(tables plus PNG plots embedded as data URIs, so the file can be mailed or attached as it is).

KL and CKA are log-min-max normalised across the runs of the same task (editing or unlearning), as
the seed reports them; the raw values are in the tables too.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path

from ..errors import RequestError
from ..utils.io import atomic_write_bytes, read_json
from .kg_metrics import log_minmax

LEVEL_ORDER = {"root": 0, "intermediate": 1, "leaf": 2}


#: what every KG run summary has (an evaluation run's summary.json has none of it)
KG_RUN_KEYS = ("task", "method", "level", "scale")


def load_runs(dirs: list[str | Path]) -> list[dict]:
    """``summary.json`` of each run folder (a folder holding several runs contributes each of them)."""
    runs = []
    for d in dirs:
        p = Path(d)
        found = [p / "summary.json"] if (p / "summary.json").exists() else sorted(p.glob("*/summary.json"))
        if not found:
            raise RequestError(f"{p}: no summary.json (pass folders written by `loka kg run --out DIR`)")
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
            if all(v is not None for v in vals):
                for r, z in zip(group, log_minmax(vals)):
                    r[f"{key}_norm"] = z


def _fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10**-nd or x == 0 else f"{x:.1e}"
    return html.escape(str(x))


def _table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


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

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    panels = [
        ("ccr", "CCR (contextual probes changed)"),
        ("rr", "RR (pre-update answer kept)"),
        ("conflict_rate", "conflict rate"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for (task, method, level), rs in series.items():
            ax.plot(
                [r["scale"] for r in rs],
                [r[key] for r in rs],
                marker="o",
                ls="-" if task == "edit" else "--",
                label=f"{method} {level}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("interventions k")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=7)
    save(fig, "propagation")

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for ax, key in zip(axes, ("kl_norm", "cka_norm")):
        for (task, method, level), rs in series.items():
            if all(key in r for r in rs):
                ax.plot(
                    [r["scale"] for r in rs],
                    [r[key] for r in rs],
                    marker="o",
                    ls="-" if task == "edit" else "--",
                    label=f"{method} {level}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("interventions k")
        ax.set_title(key.replace("_norm", "").upper() + " (log-min-max within task)")
    axes[-1].legend(fontsize=7)
    save(fig, "representation")

    geo = [r for r in runs if r.get("geometry_mean")]
    if geo:
        fig, ax = plt.subplots(figsize=(4.8, 3.8))
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
        ax.set_xlabel("rotation of top-32 left singular subspace")
        ax.set_ylabel("scaling spread (std of log σ'/σ)")
        ax.set_title("SVD geometry (colour: level, size: k)")
        ax.legend(fontsize=8)
        fig.colorbar(sc, ax=ax, ticks=[0, 1, 2]).ax.set_yticklabels(["root", "interm.", "leaf"])
        save(fig, "geometry")
    return out


CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0;"
    "font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
    "td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}"
)


def render(runs: list[dict], title: str = "loka KnowledgeSmith report") -> str:
    normalise(runs)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    models = sorted({r["model"] for r in runs})
    parts.append(
        f"<p>{len(runs)} run(s) on {html.escape(', '.join(models))}; graph(s) "
        f"{html.escape(', '.join(sorted({r['graph'] for r in runs})))}; scoring "
        f"{html.escape(', '.join(sorted({r['scoring'] for r in runs})))}.</p>"
    )
    parts.append(
        "<p>Edit rows: probe accuracy = the new object chosen. Forget rows: the columns show how often the "
        "forgotten object is still chosen. CCR = contextual (should-not-change) probes whose answer "
        "changed; RR = Q+ probes still answered with the pre-update object; conflict = interventions whose "
        "probes assert both the pre-update object and another.</p>"
    )
    parts.append("<h2>Propagation</h2>" + _table(*main_rows(runs)))
    imgs = plots(runs)
    for name in ("propagation", "representation", "geometry"):
        if name in imgs:
            parts.append(
                f"<h3>{name}</h3><img alt='{name}' src='data:image/png;base64,"
                f"{base64.b64encode(imgs[name]).decode()}'>"
            )
    parts.append("<h2>Q+ probes: the pre-update answer before → after</h2>" + _table(*transfer_rows(runs)))
    parts.append("<h2>By domain</h2>" + _table(*domain_rows(runs)))
    parts.append("<h2>SVD geometry of the changed matrices</h2>" + _table(*geometry_rows(runs)))
    parts.append(
        "<h2>Runs</h2><ul>"
        + "".join(
            f"<li>{html.escape(r['_dir'])}: artifact {html.escape(r['artifact'])}, {r['probes']} probes</li>"
            for r in sorted(runs, key=_key)
        )
        + "</ul>"
    )
    parts.append("</body></html>")
    return "".join(parts)


def write_report(dirs: list[str | Path], out: str | Path, title: str = "loka KnowledgeSmith report") -> Path:
    runs = load_runs(dirs)
    atomic_write_bytes(out, render(runs, title).encode("utf-8"))
    return Path(out)
