"""``loka report`` and ``loka compare``: what evaluation runs (``loka eval --out``) and KnowledgeSmith
runs (``loka kg run --out``) did, as one self-contained HTML page or a side-by-side table.

An evaluation run's page: its settings, the summary before/after, the guard (with a note when it is
the unedited model's: single and batch runs revert every edit), the checkpoints and plot of a
sequential run, and every case's edit prompt with the model's answer before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RequestError
from ..utils.io import atomic_write_bytes, read_json, read_text
from .html import esc, img, page, table
from .metrics import TABLE

#: summary columns ``loka compare`` shows, in order, when at least one run has them (``--all``: every metric)
COMPARE_METRICS = ("S", *TABLE)
COMPARE_CORE = (
    "S",
    "ES",
    "PS",
    "NS",
    "gen_success",
    "wild_success",
    "wild_locality",
    "portability",
    "multihop",
)
#: per-case rows shown on a report page per run (the rest are counted, and stay in results.jsonl)
MAX_CASES = 500
MAX_JSON = 256 * 1024 * 1024

GUARD_NOTE = (
    "measured on the unedited model: {mode} runs revert each edit before the next, so no edited model "
    "remains to measure; run --mode sequential to see an edited model's perplexity and multiple-choice scores"
)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in read_text(path, MAX_JSON).splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
    return out


def is_eval_run(folder: Path) -> bool:
    from .runner import is_eval_run as check

    return check(folder)


def load_eval_run(folder: str | Path) -> dict:
    """An evaluation run folder: ``config``, ``summary`` (recomputed from ``results.jsonl`` when the run
    was interrupted before writing it), ``results``, ``sequential`` rows and the plot, if any."""
    from .runner import summarise

    d = Path(folder)
    if not is_eval_run(d):
        raise RequestError(
            f"{d} is not an evaluation run (no config.json with method and mode): pass a folder "
            "`loka eval --out DIR` wrote"
        )
    cfg = read_json(d / "config.json", 1 << 22)
    results = _jsonl(d / "results.jsonl")
    if (d / "summary.json").is_file():
        summary = read_json(d / "summary.json", MAX_JSON)
    else:
        summary = {"config": cfg, "pre": summarise(results, "pre"), "post": summarise(results, "post")}
        summary["incomplete"] = True
    run = {
        "dir": str(d),
        "name": d.name,
        "config": cfg,
        "summary": summary,
        "results": results,
        "sequential": _jsonl(d / "sequential.jsonl"),
    }
    if (d / "sequential.png").is_file():
        run["plot"] = (d / "sequential.png").read_bytes()
    return run


def guard_note(run: dict) -> str | None:
    """Why a run's guard after equals its guard before, when it does."""
    mode = run["config"].get("mode")
    if mode in ("single", "batch") and run["summary"].get("guard_pre"):
        return GUARD_NOTE.format(mode=mode)
    return None


def compare_rows(
    runs: list[dict], metrics: tuple[str, ...] = COMPARE_METRICS
) -> tuple[list[str], list[list]]:
    """One row per run (the model after its edits) plus one per distinct unedited baseline."""
    cols = [c for c in metrics if any(c in r["summary"].get("post", {}) for r in runs)]
    head = ["run", "model", "method", "mode", "batch", "n", *cols, "ppl before", "ppl after", "edit s"]
    # one unedited row per model and set of cases (runs with and without generation metrics merged)
    bases: dict[tuple, dict] = {}
    for r in runs:
        c, s = r["config"], r["summary"]
        key = (c.get("model_hash", c.get("model")), tuple(sorted(x["case_id"] for x in r["results"])))
        b = bases.setdefault(key, {"model": c.get("model"), "pre": {}, "guard": None})
        b["pre"] = {**s.get("pre", {}), **b["pre"]}
        b["guard"] = b["guard"] or s.get("guard_pre")
    rows = []
    for b in bases.values():
        rows.append(
            ["(unedited)", b["model"], "–", "–", None, b["pre"].get("n")]
            + [b["pre"].get(k) for k in cols]
            + [(b["guard"] or {}).get("ppl"), None, None]
        )
    for r in runs:
        c, s = r["config"], r["summary"]
        after = s.get("guard_post") if c.get("mode") == "sequential" else None
        rows.append(
            [
                r["name"],
                c.get("model"),
                c.get("method"),
                c.get("mode"),
                c.get("batch_size"),
                s.get("post", {}).get("n"),
            ]
            + [s.get("post", {}).get(k) for k in cols]
            + [(s.get("guard_pre") or {}).get("ppl"), (after or {}).get("ppl"), s.get("edit_seconds")]
        )
    return head, rows


def format_compare(runs: list[dict], metrics: tuple[str, ...] = COMPARE_CORE) -> str:
    """``loka compare``'s terminal table."""
    head, rows = compare_rows(runs, metrics)
    cells = [[_plain(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    line = lambda xs: "  ".join(  # noqa: E731
        (x.ljust(w) if i < 4 else x.rjust(w)) for i, (x, w) in enumerate(zip(xs, widths))
    )
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in cells]
    if any(guard_note(r) for r in runs):
        out.append(
            "ppl after: only sequential runs keep an edited model; single and batch runs revert each edit"
        )
    return "\n".join(out)


def _plain(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _case_rows(run: dict) -> tuple[list[str], list[list]]:
    head = [
        "case",
        "prompt",
        "target new (true)",
        "top before",
        "top after",
        "P(new) before",
        "P(new) after",
        "P(true) before",
        "P(true) after",
        "ES after",
        "PS after",
        "NS after",
    ]
    gen = any("generation" in (c.get("after") or {}) for c in run["results"])
    if gen:
        head += ["generation before", "generation after"]
    rows = []
    for c in run["results"][:MAX_CASES]:
        if "error" in c:
            rows.append([c["case_id"], f"skipped: {c['error']}"] + [None] * (len(head) - 2))
            continue
        b, a, post = c.get("before") or {}, c.get("after") or {}, c.get("post") or {}
        tgt = f"{c.get('target_new')!r}" + (f" ({c['target_true']!r})" if c.get("target_true") else "")
        row = [
            c["case_id"],
            c.get("prompt"),
            tgt,
            repr(b["top"]) if "top" in b else None,
            repr(a["top"]) if "top" in a else None,
            b.get("p_new"),
            a.get("p_new"),
            b.get("p_true"),
            a.get("p_true"),
            post.get("ES"),
            post.get("PS"),
            post.get("NS"),
        ]
        if gen:
            row += [b.get("generation"), a.get("generation")]
        rows.append(row)
    return head, rows


def eval_sections(runs: list[dict]) -> list[str]:
    """The evaluation-run part of a report page (HTML fragments)."""
    parts = ["<h2>Evaluation runs</h2>", table(*compare_rows(runs), left=4)]
    parts.append(f"<p class='note'>{esc(LEGEND)}</p>")
    for r in runs:
        c, s = r["config"], r["summary"]
        parts.append(f"<h3 id='{esc(r['name'])}'>{esc(r['name'])}</h3>")
        settings = ", ".join(
            f"{k} {esc(json.dumps(c[k]) if isinstance(c[k], dict) else ('yes' if c[k] else 'no') if isinstance(c[k], bool) else c[k])}"
            for k in (
                "model",
                "method",
                "mode",
                "batch_size",
                "n_cases",
                "generation",
                "prune",
                "score_sample",
            )
            if k in c
        )
        parts.append(
            f"<p>{esc(r['dir'])}: {settings}{' · incomplete run' if s.get('incomplete') else ''}</p>"
        )
        cols = [k for k in COMPARE_METRICS if k in s.get("post", {})]
        parts.append(
            table(
                ["", *cols, "n"],
                [[k, *[s.get(k, {}).get(m) for m in cols], s.get(k, {}).get("n")] for k in ("pre", "post")],
                left=1,
            )
        )
        if s.get("guard_pre"):
            g0, g1 = s["guard_pre"], s.get("guard_post") if c.get("mode") == "sequential" else None
            keys = sorted(set(g0) | set(g1 or {}))
            parts.append(
                "<h4>guard</h4>"
                + table(
                    ["", *keys],
                    [["before", *[g0.get(k) for k in keys]]]
                    + ([["after", *[g1.get(k) for k in keys]]] if g1 else []),
                    left=1,
                )
            )
            if guard_note(r):
                parts.append(f"<p class='note'>guard {esc(guard_note(r))}.</p>")
        else:
            parts.append("<p class='note'>no guard: the run was made with --no-guard.</p>")
        if r["sequential"]:
            cols = [
                k
                for k in ("ES", "PS", "NS", "S", "reliability", "generalization", "locality", "gen_success")
                if any(k in x for x in r["sequential"])
            ]
            parts.append(
                "<h4>checkpoints</h4>"
                + table(
                    ["edits", *cols, "unedited S", "ppl", "last batch s"],
                    [
                        [
                            x["n_edits"],
                            *[x.get(k) for k in cols],
                            x.get("pre", {}).get("S"),
                            (x.get("guard") or {}).get("ppl"),
                            x.get("last_batch_edit_s"),
                        ]
                        for x in r["sequential"]
                    ],
                    left=0,
                )
            )
        if "plot" in r:
            parts.append(img("sequential", r["plot"]))
        head, rows = _case_rows(r)
        more = len(r["results"]) - len(rows)
        parts.append(
            f"<details open><summary>cases ({len(r['results'])})</summary>"
            + table(head, rows)
            + (f"<p class='note'>{more} more case(s) in results.jsonl</p>" if more > 0 else "")
            + "</details>"
        )
    return parts


def load_any(dirs: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """(evaluation runs, KG runs) among ``dirs``; a folder of run folders contributes each of them."""
    from .kg_report import is_kg_run, load_runs

    evals, kgs = [], []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise RequestError(
                f"{p} is not a folder: pass run folders written by `loka eval --out` or `loka kg run --out`"
            )
        children = [p] if (is_eval_run(p) or is_kg_run(p)) else sorted(x for x in p.iterdir() if x.is_dir())
        found = False
        for c in children:
            if is_eval_run(c):
                evals.append(load_eval_run(c))
                found = True
            elif is_kg_run(c):
                kgs.extend(load_runs([c]))
                found = True
        if not found:
            raise RequestError(
                f"{p} holds no run: pass folders written by `loka eval --out DIR` or `loka kg run --out DIR`"
            )
    return evals, kgs


def render_report(dirs: list[str | Path], title: str | None = None) -> str:
    from .kg_report import sections

    evals, kgs = load_any(dirs)
    title = title or ("loka report" if evals else "loka KnowledgeSmith report")
    body = []
    if evals:
        body += eval_sections(evals)
    if kgs:
        body += (["<h2>KnowledgeSmith runs</h2>"] if evals else []) + sections(kgs)
    return page(title, body)


def write_report(dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Write one self-contained HTML page (plots embedded) for the runs in ``dirs``."""
    atomic_write_bytes(out, render_report(dirs, title).encode("utf-8"))
    return Path(out)


def compare(dirs: list[str | Path]) -> list[dict]:
    """The evaluation runs in ``dirs``, loaded (for :func:`format_compare` / :func:`compare_rows`)."""
    evals, kgs = load_any(dirs)
    if not evals:
        raise RequestError(
            "loka compare reads evaluation runs (`loka eval --out DIR`); for kg runs use loka report"
        )
    return evals


LEGEND = (
    "ES / PS / NS: edit, paraphrase and neighbourhood success (CounterFact); S: their harmonic mean; EM / PM "
    "/ NM: the probability margins; (unedited): the same cases before any edit. ppl: held-out perplexity (the "
    "guard; – where the run had none)."
)


def compare_html(runs: list[dict], title: str = "loka compare") -> str:
    body = [table(*compare_rows(runs), left=4), f"<p class='note'>{esc(LEGEND)}</p>"]
    notes = [f"{r['name']}: guard {guard_note(r)}" for r in runs if guard_note(r)]
    body += [f"<p class='note'>{esc(n)}</p>" for n in notes]
    return page(title, body)
