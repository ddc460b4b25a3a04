"""The docs' tables of measured numbers, generated from the result files in ``benchmarks/results/``.

    python benchmarks/tables.py            # rewrite every table region (``make results``)
    python benchmarks/tables.py --check    # exit 1, naming the regions that differ from their JSON

A doc holds a generated table between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``.
``NAME`` is a generator registered below with ``@table``: the doc it belongs to, the result files it
reads, and a function from the loaded files to a markdown table. Under each table goes one line naming
those files with their provenance (commit, date, CPU, threads) or saying that a file records none; for
a file that collects rows from several runs, whose rows carry their own stamps, also the commits and
dates of those rows and how many rows carry none.
Numbers are never typed into the docs: re-run the benchmark, then ``make results``.

Only the standard library is used, so the check runs in the test suite in well under a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
#: where regions may appear: every page of the docs and the README
DOC_GLOBS = ("README.md", "docs/**/*.md")
START = re.compile(r"^(?P<indent>[ \t]*)<!-- results:(?P<name>[\w.+-]+) -->[ \t]*$")
END = re.compile(r"^[ \t]*<!-- /results:(?P<name>[\w.+-]+) -->[ \t]*$")
DASH = "–"


class TablesError(Exception):
    """A region or result file that cannot be generated; the message names the doc, region or file."""


@dataclass(frozen=True)
class Table:
    """One generated table: ``render(*loaded sources)`` gives its markdown, ``note`` an optional
    sentence printed after the source line (what the generator derived or selected)."""

    name: str
    doc: str
    sources: tuple[str, ...]
    render: Callable[..., str]
    note: str = ""


TABLES: dict[str, Table] = {}


def table(name: str, doc: str, *sources: str, note: str = "") -> Callable:
    """Register the decorated function as the generator of region ``name`` in ``doc``, reading
    ``sources`` (file names under ``benchmarks/results/``)."""

    def register(fn: Callable[..., str]) -> Callable[..., str]:
        if name in TABLES:
            raise ValueError(f"table {name!r} registered twice")
        TABLES[name] = Table(name, doc, sources, fn, note)
        return fn

    return register


# ---------------------------------------------------------------- formatting


def num(x: float | int | None, nd: int = 3, sep: bool = True) -> str:
    """``x`` to ``nd`` decimals, rounding half up on its shortest decimal form (0.7365 → 0.737, as a
    reader rounds), with thousands separators; ``–`` for a missing value."""
    if x is None:
        return DASH
    d = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-nd), rounding=ROUND_HALF_UP)
    if d == 0:
        d = abs(d)  # no "-0.000"
    return f"{d:,.{nd}f}" if sep else f"{d:.{nd}f}"


def big(x: float | None) -> str:
    """Perplexities and singular values: one decimal below 10,000, none above."""
    return num(x, 0 if x is not None and abs(x) >= 10_000 else 1)


def small(x: float | None, nd: int = 3) -> str:
    """``nd`` decimals, or two significant digits in scientific notation below 10^-nd (p-values)."""
    if x is not None and 0 < abs(x) < 10**-nd:
        return f"{x:.1e}"
    return num(x, nd)


def tiny(x: float) -> str:
    """A log-probability difference: 0, one significant digit below 10^-3 (``2e-5``), else two."""
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        mantissa, exp = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{x:.2g}"


def signed_pct(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{num(abs(x) * 100, 1)} %"


def md(head: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def layers(text: str) -> str:
    """``layers [3, 4, 5, 6, 7]`` → ``layers 3–7``; ``L3-7`` → ``L3–7``."""
    text = re.sub(r"\[(\d+)(?:, \d+)*, (\d+)\]", lambda m: f"{m.group(1)}{DASH}{m.group(2)}", text)
    return re.sub(r"L(\d+)-(\d+)", rf"L\1{DASH}\2", text)


# ---------------------------------------------------------------- provenance


def row_stamps(data: object) -> tuple[list[dict], int]:
    """The ``provenance`` blocks of rows stamped individually (entries of a mapping or list, below the
    file's own block) and the number of their sibling rows that carry none."""
    stamps: list[dict] = []
    missing = 0

    def walk(node: object) -> None:
        nonlocal missing
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        children = [c for c in children if isinstance(c, dict | list)]
        rows = [c for c in children if isinstance(c, dict)]
        if any(isinstance(r.get("provenance"), dict) for r in rows):
            for r in rows:
                if isinstance(r.get("provenance"), dict):
                    stamps.append(r["provenance"])
                else:
                    missing += 1
        for c in children:
            walk({k: v for k, v in c.items() if k != "provenance"} if isinstance(c, dict) else c)

    if isinstance(data, dict):
        walk({k: v for k, v in data.items() if k != "provenance"})
    return stamps, missing


def _commit(p: Mapping) -> str:
    commit = (p.get("commit") or "commit unknown")[:7]
    return commit + " with uncommitted changes" if p.get("uncommitted_changes") else commit


def _rows_note(stamps: list[dict], missing: int) -> str:
    """``5 rows stamped individually: commits abc1234, def5678, 2026-11-30 to 2026-12-02``, plus the
    rows without a stamp."""
    stamps = sorted(stamps, key=lambda p: p.get("date") or "")
    commits = list(dict.fromkeys(_commit(p) for p in stamps))
    dates = sorted({(p.get("date") or "date unknown")[:10] for p in stamps})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    note = (
        f"{len(stamps)} row{'s' if len(stamps) != 1 else ''} stamped individually: "
        f"commit{'s' if len(commits) != 1 else ''} {', '.join(commits)}, {when}"
    )
    if missing:
        note += f"; {missing} row{'s' if missing != 1 else ''} without provenance"
    return note


def source_line(sources: Mapping[str, object], note: str = "") -> str:
    """One line naming the result files: commit, date, CPU and threads for a stamped file; for a file
    without a ``provenance`` block, that it records none. A file whose rows carry their own stamps
    (rows merged from several runs) is described by those too: its own block is only its last
    writer's."""
    stamped, unstamped = [], []
    for name, data in sources.items():
        p = data.get("provenance") if isinstance(data, dict) else None
        path = f"`{RESULTS}/{name}`"
        rows, missing = row_stamps(data)
        if not p and not rows:
            unstamped.append(path)
            continue
        desc = "file provenance not recorded"
        if p:
            threads = p.get("threads")
            desc = (
                f"commit {_commit(p)}, {(p.get('date') or 'date unknown')[:10]}, "
                f"{p.get('cpu') or 'CPU unknown'}, {threads if threads is not None else '?'} thread{'' if threads == 1 else 's'}"
            )
        if rows:
            desc = f"{'last written at ' if p else ''}{desc}; {_rows_note(rows, missing)}"
        stamped.append(f"{path} ({desc})")
    parts = list(stamped)
    if unstamped:
        parts.append(
            f"{', '.join(unstamped)}: provenance not recorded (written before stamping; command, "
            "commit, versions and machine unknown)"
        )
    line = f"Generated by `make results` from {'; '.join(parts)}."
    return f"{line} {note}" if note else line


# ---------------------------------------------------------------- regions


def find_regions(text: str, doc: str) -> list[tuple[str, str, int, int]]:
    """``(name, indent, start line, end line)`` of every region of ``text``; unbalanced, nested,
    mismatched or repeated markers raise :class:`TablesError`."""
    out: list[tuple[str, str, int, int]] = []
    open_: tuple[str, str, int] | None = None
    for i, line in enumerate(text.splitlines()):
        if m := START.match(line):
            if open_:
                raise TablesError(
                    f"{doc}:{i + 1}: region {m['name']!r} opens inside region {open_[0]!r} "
                    f"(opened at line {open_[2] + 1}, never closed)"
                )
            open_ = (m["name"], m["indent"], i)
        elif m := END.match(line):
            if not open_:
                raise TablesError(f"{doc}:{i + 1}: closing marker of {m['name']!r} with no opening marker")
            if m["name"] != open_[0]:
                raise TablesError(
                    f"{doc}:{i + 1}: closing marker of {m['name']!r} inside region {open_[0]!r} "
                    f"(opened at line {open_[2] + 1})"
                )
            out.append((open_[0], open_[1], open_[2], i))
            open_ = None
    if open_:
        raise TablesError(
            f"{doc}:{open_[2] + 1}: region {open_[0]!r} has no closing marker <!-- /results:{open_[0]} -->"
        )
    seen: set[str] = set()
    for name, _, start, _ in out:
        if name in seen:
            raise TablesError(f"{doc}:{start + 1}: region {name!r} appears twice")
        seen.add(name)
    return out


def load(root: Path, t: Table) -> dict[str, object]:
    out = {}
    for name in t.sources:
        path = root / RESULTS / name
        try:
            out[name] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TablesError(
                f"{t.doc}: table {t.name!r} reads {RESULTS}/{name}, which does not exist"
            ) from None
        except (OSError, ValueError) as e:
            raise TablesError(f"{t.doc}: table {t.name!r} cannot read {RESULTS}/{name}: {e}") from None
    return out


def render(root: Path, t: Table, indent: str = "") -> list[str]:
    """The lines between the markers: a blank line, the table, a blank line, the source line, a blank
    line (so that the markers stay HTML comments of their own), indented like the opening marker."""
    data = load(root, t)
    try:
        body = t.render(*data.values()).strip("\n")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise TablesError(
            f"{t.doc}: table {t.name!r} cannot be built from {', '.join(t.sources)}: {type(e).__name__}: {e}"
        ) from None
    lines = ["", *body.splitlines(), "", source_line(data, t.note), ""]
    return [indent + line if line else "" for line in lines]


def docs_of(root: Path) -> list[str]:
    found = {p for g in DOC_GLOBS for p in root.glob(g) if p.is_file()}
    return sorted(p.relative_to(root).as_posix() for p in found)


def generate(root: Path = ROOT, tables: Mapping[str, Table] = TABLES, check: bool = False) -> list[str]:
    """Rewrite every region of every doc from its result files (or, with ``check``, only compare).
    Returns ``DOC: NAME`` for each region whose text changed (or would change). A region no generator
    is registered for, a registered table whose doc has no region for it, a missing result file or
    an unbalanced marker raises :class:`TablesError` before anything is written."""
    by_doc: dict[str, list[Table]] = defaultdict(list)
    for t in tables.values():
        by_doc[t.doc].append(t)
    docs = sorted(set(docs_of(root)) | set(by_doc))
    plans: list[tuple[Path, str]] = []
    stale: list[str] = []
    for doc in docs:
        path = root / doc
        if not path.is_file():
            names = ", ".join(t.name for t in by_doc[doc])
            raise TablesError(f"{doc} does not exist (tables {names} belong to it)")
        text = path.read_text(encoding="utf-8")
        new_text, changed = update_text(text, doc, root, tables)
        stale += [f"{doc}: {name}" for name in changed]
        if new_text != text:
            plans.append((path, new_text))
    if not check:
        for path, new_text in plans:
            write_atomic(path, new_text)
    return sorted(stale)


def update_text(
    text: str, doc: str, root: Path = ROOT, tables: Mapping[str, Table] = TABLES
) -> tuple[str, list[str]]:
    """``text`` (the doc ``doc``) with every region regenerated, and the names of the regions that
    changed. Raises :class:`TablesError` for an unknown, foreign, missing or unbalanced region."""
    lines = text.splitlines()
    regions = find_regions(text, doc)
    names = {name for name, *_ in regions}
    for name, _, start, _ in regions:
        if name not in tables:
            raise TablesError(f"{doc}:{start + 1}: no table generator is registered for region {name!r}")
        if tables[name].doc != doc:
            raise TablesError(f"{doc}:{start + 1}: region {name!r} belongs to {tables[name].doc}")
    for t in tables.values():
        if t.doc == doc and t.name not in names:
            raise TablesError(
                f"{doc}: no region for table {t.name!r} (expected <!-- results:{t.name} --> … "
                f"<!-- /results:{t.name} -->)"
            )
    new = list(lines)
    changed = []
    for name, indent, start, end in reversed(regions):  # from the bottom: line numbers stay valid
        body = render(root, tables[name], indent)
        if lines[start + 1 : end] != body:
            changed.append(name)
        new[start + 1 : end] = body
    return "\n".join(new) + ("\n" if text.endswith("\n") else ""), changed[::-1]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and move it into place in one step, so the
    doc is the old or the new version at every instant."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- docs/benchmarks.md


def _target(spec: str | None, total: float) -> str:
    """``"<= 5 s"`` → ``≤ 5 s ✔`` (met) or ``≤ 5 s ✘``."""
    m = re.fullmatch(r"<=\s*([\d.]+)\s*s", spec or "")
    if not m:
        return spec or ""
    limit = float(m[1])
    return f"≤ {limit:g} s {'✔' if total <= limit else '✘'}"


@table("edit-speed", "docs/benchmarks.md", "edit_speed.json", "edit_speed_run2.json")
def edit_speed(*runs: dict) -> str:
    rows = []
    for i in range(len(runs[0]["rows"])):
        for n, run in enumerate(runs, 1):
            r = run["rows"][i]
            rows.append(
                [
                    layers(r["job"]),
                    n,
                    num(r["total_s"], 2),
                    *(num(r[k], 2) for k in ("stats", "keys", "values", "update")),
                    num(r["peak_rss_mb"], 0),
                    _target(r.get("target"), r["total_s"]),
                ]
            )
    head = ["job (SmolLM2-135M, statistics cached)", "run", "total s", "stats", "keys", "values"]
    return md([*head, "update", "peak RSS MB", "target"], rows)


#: the rows of batch_edit_speed.py the docs show, with what each setting is
BATCH_ROWS = {
    "tree": "`v_lr` 0.5 (the reference value), padded prefixes, KV heads copied per group",
    "v_lr2": "`v_lr` 2.0 (the SmolLM2 step), padded prefixes, KV heads copied per group",
    "trees": "prefixes as token trees, grouped-query attention without copies",
    "beta": "+ Adam's β₁ 0.5 (`v_beta1`)",
    "default": "+ a bfloat16 search: the SmolLM2 defaults",
    "alphaedit-ref": "the reference's search: `v_lr` 0.5, β₁ 0.9, float32",
    "alphaedit": "defaults: `v_lr` 1.0, β₁ 0.5, bfloat16 search",
    "grace": "defaults: the batch's codebook values trained together",
}


@table("batch-edit-speed", "docs/benchmarks.md", "batch_edit_speed_smollm2-135m.json")
def batch_edit_speed(d: dict) -> str:
    rows = []
    for key, label in BATCH_ROWS.items():
        r = d["rows"].get(key)
        if r is None:
            continue
        t = r["timings"]
        rows.append(
            [label, r["method"], num(r["seconds"], 1), num(t.get("keys"), 1), num(t.get("values"), 1)]
            + [num(t.get("update"), 1), *(num(r[k]) for k in ("ES", "PS", "NS"))]
        )
    head = ["setting", "method", "total s", "keys", "value search", "update", "ES", "PS", "NS"]
    return md(head, rows)


# ---------------------------------------------------------------- docs/concepts.md


@table("rome-speed", "docs/benchmarks.md", "rome_speed_smollm2-135m.json")
def rome_speed(d: dict) -> str:
    head = [
        "setting (SmolLM2, layer 8)",
        "median s per edit",
        "value search s",
        "ratio to reference",
        "Adam steps (mean)",
        "‖ΔW‖ (median)",
        "ES",
        "PS",
        "NS",
    ]
    rows = [
        [name, num(r["median_s"], 2), num(r["median_values_s"], 2), num(r["median_ratio_to_reference"], 2)]
        + [num(r.get("mean_steps"), 1), num(r.get("median_update_norm"), 1)]
        + [num(r[k]) for k in ("ES", "PS", "NS")]
        for name, r in d["rows"].items()
    ]
    return md(head, rows)


@table("vs-easyedit", "docs/benchmarks.md", "vs_easyedit_smollm2-135m.json")
def vs_easyedit(d: dict) -> str:
    sm = d["summary"]
    rows = [
        [tool, num(r["median_s"], 2), num(r["peak_rss_mb"], 0), *(num(r[k]) for k in ("ES", "PS", "NS"))]
        for tool, r in (("loka", sm["loka"]), ("EasyEdit", sm["easyedit"]))
    ]
    u = sm["loka"]["unedited"]
    rows.append(["(unedited)", "", "", *(num(u[k]) for k in ("ES", "PS", "NS"))])
    rows.append(
        [
            "EasyEdit / loka",
            f"{sm['median_time_ratio_easyedit_over_loka']:.2f}× (median of per-record ratios)",
            f"{sm['peak_rss_ratio_easyedit_over_loka']:.2f}×",
            "",
            "",
            "",
        ]
    )
    return md(
        [
            f"ROME, {d['model']}, layer {d['layer']}, {d['n']} records",
            "median s per edit",
            "peak RSS MB",
            "ES",
            "PS",
            "NS",
        ],
        rows,
    )


@table("load-time", "docs/concepts.md", "load_time.json")
def load_time(d: dict) -> str:
    rows = []
    for r in d["rows"]:
        m = r["median"]
        backend = "default" if r["backend"] == "auto" else f"`LOKA_TOKENIZER={r['backend']}`"
        rows.append(
            [
                r["model"],
                f"{r['tokenizer']} ({backend})",
                f"{num(m['load_model_s'], 2)} s ({num(r['min_load_model_s'], 2)}{DASH}"
                f"{num(r['max_load_model_s'], 2)})",
                *(f"{num(m[k], 2)} s" for k in ("import_modelling_s", "rest_s", "tokenizer_s")),
            ]
        )
    head = ["model", "tokenizer", "`load_model` median (min–max)", "of which transformers' modelling import"]
    return md([*head, "rest", "tokenizer alone"], rows)


# ---------------------------------------------------------------- docs/evaluation.md

#: eval_throughput.py's rows, described
THROUGHPUT_ROWS = {
    "full rows, float32": "full padded rows, float32",
    "flat packed, float32": "flat packing, one record per call, float32",
    "flat packed x4 records": "flat packing, four records per call, float32",
    "flat x4, prepacked weights": "flat, four per call, oneDNN-prepacked weights",
    "token tree x4, prepacked": "**token tree, four per call, prepacked weights (default; how the runner scores)**",
    "token tree x4, bfloat16": "token tree, model in bfloat16",
}


@table("eval-throughput", "docs/evaluation.md", "eval_throughput.json", "eval_throughput_run2.json")
def eval_throughput(*runs: dict) -> str:
    rows = []
    for i, r in enumerate(runs[0]["rows"]):
        rates = " / ".join(num(run["rows"][i]["records_per_s"], 2) for run in runs)
        rows.append(
            [
                THROUGHPUT_ROWS.get(r["scoring"], r["scoring"]),
                rates,
                num(r["tokens_fed_per_record"], 0),
                tiny(r["max_abs_dlogp"]) if "max_abs_dlogp" in r else DASH,
                tiny(r["mean_abs_dlogp"]) if "mean_abs_dlogp" in r else DASH,
            ]
        )
    head = ["scoring", f"records/s ({' / '.join(f'run {n}' for n in range(1, len(runs) + 1))})"]
    return md([*head, "fed/record", "max \\|Δ log p\\| vs full rows", "mean \\|Δ log p\\|"], rows)


CF_COLS = ["S", "ES", "PS", "NS", "EM", "PM", "NM", "reliability", "generalization", "locality"]


def _cf_label(label: str) -> str:
    return label.replace("LORA", "LoRA")


def _counterfact(d: dict) -> str:
    rows = [[_cf_label(k), *(num(r[c]) for c in CF_COLS)] for k, r in d["rows"].items()]
    return md(["row", *CF_COLS], rows)


@table("counterfact-smollm2", "docs/evaluation.md", "eval_counterfact_smollm2-135m.json")
def counterfact_smollm2(d: dict) -> str:
    return _counterfact(d)


@table("counterfact-gemma3", "docs/evaluation.md", "eval_counterfact_gemma3-270m.json")
def counterfact_gemma3(d: dict) -> str:
    return _counterfact(d)


@table("counterfact-generation", "docs/evaluation.md", "eval_generation_smollm2-135m.json")
def counterfact_generation(d: dict) -> str:
    cols = ["S", "ES", "PS", "NS", "reliability", "generalization", "locality", "gen_success", "GE"]
    rows = [[_cf_label(k), r["n"], *(num(r[c]) for c in cols)] for k, r in d["rows"].items()]
    return md(["row", "records", *cols], rows)


GUARD_COLS = ["perplexity", "MC authors", "MC world"]


def _guard(g: dict) -> list[str]:
    return [big(g["ppl"]), num(g["mc_real_authors"], 2), num(g["mc_world_facts"], 2)]


@table(
    "rome-sequential",
    "docs/evaluation.md",
    "rome_sequential_smollm2_300.json",
    "eval_counterfact_smollm2-135m.json",
    note="The unedited row's guard is the unedited model's in the CounterFact file.",
)
def rome_sequential(d: dict, cf: dict) -> str:
    cols = ["ES", "PS", "NS", "reliability", "generalization", "locality"]
    rows = [["0 (unedited)", *([""] * len(cols)), *_guard(cf["rows"]["unedited"]["guard"])]]
    for c in d["checkpoints"]:
        rows.append([num(c["n_edits"], 0), *(num(c[k]) for k in cols), *_guard(c["guard"])])
    return md(["edits", *cols, *GUARD_COLS], rows)


# ---------------------------------------------------------------- docs/sequential.md

SPECTRUM_CHECKPOINTS = (20, 60, 100, 120, 200)


@table(
    "rome-spectrum",
    "docs/sequential.md",
    "rome_spectrum_smollm2-135m.json",
    note=f"Checkpoints {', '.join(map(str, SPECTRUM_CHECKPOINTS))} of those in the file.",
)
def rome_spectrum(d: dict) -> str:
    rows = []
    for run in d["runs"]:
        checks = {c["n_edits"]: c for c in run["checks"]}
        spectrum = {s["n_edits"]: s for s in run["spectrum"]}
        for n in SPECTRUM_CHECKPOINTS:
            s, c = spectrum[n], checks[n]
            rows.append(
                [run["label"], n, big(s["sigma_max"]), big(s["cond"]), big(s["delta_sigma_max"])]
                + [big(c["ppl"]), num(c["holds"], 2)]
            )
    return md(["run", "edits", "σ_max", "cond", "σ_max(ΣΔ)", "perplexity", "edits holding"], rows)


LIFELONG_ROWS = {
    "memit": "memit",
    "alphaedit": "alphaedit",
    "memit+prune": "memit+prune",
    "alphaedit+": "alphaedit+ (all three options)",
    "alphaedit+relax": "alphaedit + relax_projection only",
    "alphaedit+smooth": "alphaedit + smooth_values only",
    "alphaedit+conflict": "alphaedit + conflict_weighting only",
    "lyaplock": "lyaplock",
    "scr@100": "scr",
}


@table("lifelong-1000", "docs/sequential.md", "lifelong_smollm2-135m_n1000.json")
def lifelong_1000(d: dict) -> str:
    rows = []
    for key, seq in d["series"].items():
        label = LIFELONG_ROWS.get(key, key)
        for i, c in enumerate(seq):
            pre = c.get("pre")  # a sampled row: the same facts before any edit, in brackets
            cells = []
            for k in ("ES", "PS", "NS"):
                paired = "" if not pre else f" ({'unedited ' if i == 0 and k == 'ES' else ''}{num(pre[k])})"
                cells.append(num(c[k]) + paired)
            name = label
            if pre and i == 0:
                name = f"{label} ({c['n']} sampled facts per checkpoint)"
            rows.append(
                [name, num(c["n_edits"], 0), *cells, num(c["S"]), *_guard(c["guard"])]
                + [num(c["last_batch_edit_s"], 0)]
            )
    head = [f"SmolLM2, batches of {d['batch']}", "edits", "ES", "PS", "NS", "S", "held-out ppl"]
    return md([*head, "MC authors", "MC world", "s for that batch"], rows)


@table(
    "lifelong-speed",
    "docs/benchmarks.md",
    "lifelong_smollm2-135m_n10000_wild.json",
    note="Method time only (scoring and checkpoints excluded); threads per row as the text says.",
)
def lifelong_speed(d: dict) -> str:
    """Per method on the 10,000-edit stream: edits reached, method time and time per edit."""
    rows = []
    for key, r in d["rows"].items():
        secs, edits = r.get("edit_seconds"), r["edits"]
        if secs is None:
            continue
        reached = num(edits, 0) + ("" if r.get("reached_all") else " (stopped: time)")
        per = secs / edits
        last = (d.get("series", {}).get(key) or [{}])[-1].get("last_batch_edit_s")
        rows.append(
            [
                LIFELONG_ROWS.get(key, key.split("@")[0]),
                reached,
                num(secs, 0),
                f"{per * 1000:.0f} ms" if per < 1 else f"{per:.2f} s",
                num(secs * 10_000 / edits / 60, 0),
                DASH if last is None else num(last, 1),
            ]
        )
    head = [f"SmolLM2, batches of {d['batch']}", "edits", "method s", "per edit"]
    return md([*head, "minutes for 10,000 at that rate", "last batch s"], rows)


@table("lifelong-10000", "docs/sequential.md", "lifelong_smollm2-135m_n10000_wild.json")
def lifelong_10000(d: dict) -> str:
    """Per method and checkpoint: teacher-forced and generation (WILD) scores of the sampled edited
    records, each with the same records' unedited value in brackets where it is not trivially 0 or 1."""
    rows = []
    for key, seq in d["series"].items():
        info = d["rows"].get(key, {})
        for i, c in enumerate(seq):
            pre = c.get("pre", {})
            last = i == len(seq) - 1
            edits = num(c["n_edits"], 0) + (
                " (stopped: time)" if last and info.get("reached_all") is False else ""
            )
            cells = [edits]
            for k in ("ES", "PS", "NS", "reliability", "wild_success", "wild_para", "wild_locality"):
                v = c.get(k)
                paired = (
                    f" ({num(pre[k])})"
                    if k in ("ES", "NS", "reliability", "wild_success") and k in pre
                    else ""
                )
                cells.append(num(v) + paired if v is not None else "–")
            g = c.get("guard", {})
            ppl0 = info.get("ppl_unedited")
            ratio = f" ({g['ppl'] / ppl0:.2f}×)" if ppl0 and "ppl" in g else ""
            cells += [num(g.get("ppl"), 1) + ratio, num(c.get("last_batch_edit_s"), 1)]
            label = LIFELONG_ROWS.get(key, key.split("@")[0])
            rows.append([label if i == 0 else "", *cells])
    head = [
        f"SmolLM2, batches of {d['batch']}",
        "edits",
        "ES",
        "PS",
        "NS",
        "rel.",
        "WILD",
        "WILD para",
        "WILD loc.",
    ]
    return md([*head, "held-out ppl", "s for that batch"], rows)


@table("lifelong-300", "docs/sequential.md", "lifelong_smollm2-135m_n300.json")
def lifelong_300(d: dict) -> str:
    rows = []
    for key, seq in d["series"].items():
        first = seq[0]["NS"]
        for c in seq:
            rows.append(
                [key, num(c["n_edits"], 0), *(num(c[k]) for k in ("ES", "PS", "NS")), num(first)]
                + [num(c["S"]), *_guard(c["guard"]), num(c["last_batch_edit_s"], 0)]
            )
    head = [f"SmolLM2, batches of {d['batch']}", "edits", "ES", "PS", "NS", "NS after batch 1", "S"]
    return md([*head, "held-out ppl", "MC authors", "MC world", "s for that batch"], rows)


@table(
    "alphaedit-nullspace",
    "docs/sequential.md",
    "alphaedit_nullspace_smollm2-135m.json",
    note="Fractions are means over the edited layers; the rank is per layer, lowest to highest.",
)
def alphaedit_nullspace(d: dict) -> str:
    """Per statistics source and threshold: the null space's size and which share of each kind of key
    lies in it (so an update can still move it)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in d["rows"]:
        groups.setdefault((r["stats"], r["threshold"]), []).append(r)
    rows = []
    for (stats, th), rs in groups.items():
        ranks = sorted(r["rank"] for r in rs)
        if ranks[-1] == 0:
            continue  # no eigenvalue below the threshold at any layer: nothing is projected
        mean = {
            k: sum(r[k] for r in rs) / len(rs) for k in ("in_sample", "leak_nbr", "leak_text", "keep_edit")
        }
        rows.append(
            [stats, f"{th:g}", f"{ranks[0]}–{ranks[-1]} of {rs[0]['dim']}"]
            + [num(mean[k]) for k in ("in_sample", "leak_nbr", "leak_text", "keep_edit")]
        )
    head = ["statistics (corpus:tokens)", "threshold", "null-space rank", "C's own keys", "neighbour keys"]
    return md([*head, "held-out text", "edit keys"], rows)


@table(
    "alphaedit-capacity",
    "docs/sequential.md",
    "alphaedit_capacity_smollm2-135m.json",
    note="Per edited layer, lowest to highest; blocked is the mean over the layers.",
)
def alphaedit_capacity(d: dict) -> str:
    """After each number of edits: the null-space dimensions the earlier edits hold, the null space's
    size, and the share of the next batch's projected keys that meets them."""
    by: dict[int, list[dict]] = {}
    for r in d["rows"]:
        by.setdefault(r["edits"], []).append(r)
    rows = []
    for edits, rs in sorted(by.items()):
        taken, rank = sorted(r["taken"] for r in rs), sorted(r["rank"] for r in rs)
        blocked = sorted(r["blocked"] for r in rs)
        rows.append(
            [
                num(edits, 0),
                f"{taken[0]}–{taken[-1]}",
                f"{rank[0]}–{rank[-1]} of {rs[0]['dim']}",
                num(sum(blocked) / len(blocked)),
                f"{num(blocked[0])}–{num(blocked[-1])}",
            ]
        )
    head = ["edits so far", "null-space dimensions taken", "null-space rank", "next batch blocked"]
    return md([*head, "blocked, per layer"], rows)


ALPHAEDIT_ABLATION_ROWS = {
    "alphaedit-vlr2@300": "v_lr 2.0, threshold 2e-2, statistics from 20k self-sampled tokens (the first 1,000 edits of a 10,000-edit stream run)",
    "alphaedit-th0.05@300": "v_lr 2.0, null-space threshold 5e-2",
    "alphaedit-self100k@300": "v_lr 2.0, statistics from 100k self-sampled tokens",
    "alphaedit-nopast@300": "v_lr 2.0, without the accumulated-keys term (K_pK_pᵀ dropped from Eq. 9)",
    "alphaedit-vlr0.5@300": "v_lr 0.5, β₁ 0.9, float32: the reference's search",
    "alphaedit-vlr1-b0.5-bf16@300": "**v_lr 1.0, Adam's β₁ 0.5, bfloat16 search** (the SmolLM2 default)",
}


@table(
    "alphaedit-ablation",
    "docs/sequential.md",
    "lifelong_smollm2-135m_n1000_ablation.json",
    note="The same 300 sampled facts in every row; the unedited model's values for them in brackets.",
)
def alphaedit_ablation(ablation: dict) -> str:
    """AlphaEdit after the first 1,000 edits of the stream, one row per setting (same records, same
    sample), in the order of :data:`ALPHAEDIT_ABLATION_ROWS`."""
    rows = []
    for key, label in ALPHAEDIT_ABLATION_ROWS.items():
        for c in ablation["series"].get(key, []):
            if c["n_edits"] != 1000:
                continue
            pre = c.get("pre", {})
            cells = [num(c[k]) + (f" ({num(pre[k])})" if k in pre else "") for k in ("ES", "PS", "NS")]
            rows.append([label, *cells, num(c["S"]), *_guard(c.get("guard", {}))])
    head = ["AlphaEdit, 1,000 edits in batches of 100", "ES", "PS", "NS", "S", "held-out ppl"]
    return md([*head, "MC authors", "MC world"], rows)


@table(
    "ultraedit-drift",
    "docs/sequential.md",
    "ultraedit_drift_smollm2-135m.json",
    note="Spectral norms per edited matrix (layers 26, 27, 28); spreads are the statistics' mean per-dimension standard deviations.",
)
def ultraedit_drift(d: dict) -> str:
    """UltraEdit's 10,000-edit stream turn by turn: the turn's shift, the edits so far against the
    unedited matrix, and the normalisation statistics, at the turns around the first oversized one."""
    series, spike = d["series"], d.get("spike")
    show = {1, 10, 30, 50, len(series)}
    if spike:
        show |= {spike - 1, spike, spike + 1, spike + 2, spike + 10}
    rows = []
    for r in series:
        if r["batch"] not in show:
            continue
        shift = " / ".join(num(v, 1) for v in r["shift"].values())
        growth = " / ".join(num(v, 2) for v in r["growth"].values())
        mark = " ← first oversized turn" if r["batch"] == spike else ""
        rows.append(
            [f"{num(r['edits'], 0)}{mark}", shift, growth, f"{r['g_spread']:.2e}", num(r["k_spread"])]
        )
    head = ["edits", "‖Δ of the turn‖₂", "‖ΣΔ‖₂ / ‖W‖₂", "gradient spread", "key spread"]
    out = md(head, rows)
    for b, c in sorted(d.get("culprits", {}).items(), key=lambda kv: int(kv[0])):
        top = c["top"][0]
        out += (
            f"\n\nTurn {b} (edits {num((int(b) - 1) * 100 + 1, 0)}–{num(int(b) * 100, 0)}), each request alone on"
            f" the model as it was before turn {spike}: median gradient row {c['median']:.3f}; largest"
            f" {num(top['x_median'], 1)}× the median (“{top['request']}” → {top['target']}), then "
            + ", ".join(f"{num(t['x_median'], 1)}×" for t in c["top"][1:])
            + "."
        )
    return out


THRESHOLD_ROWS = {
    "alphaedit": 0.02,
    "alphaedit-vlr2": 0.02,
    "alphaedit-th0.01": 0.01,
    "alphaedit-th0.005": 0.005,
}


@table("alphaedit-threshold", "docs/sequential.md", "lifelong_smollm2-135m_n300_threshold.json")
def alphaedit_threshold(d: dict) -> str:
    """AlphaEdit's null-space threshold over the first 300 records of the stream: per checkpoint,
    ES/PS/NS of all facts edited so far (the same facts unedited in brackets) and the guards."""
    rows = []
    for key, seq in d["series"].items():
        th = THRESHOLD_ROWS.get(key)
        for i, c in enumerate(seq):
            pre = c.get("pre", {})
            cells = [
                num(c[k]) + (f" ({num(pre[k])})" if k in pre and k != "PS" else "")
                for k in ("ES", "PS", "NS")
            ]
            rows.append(
                [f"{th:g}" if i == 0 and th is not None else ("" if i else key), num(c["n_edits"], 0), *cells]
                + [num(c["S"]), *_guard(c["guard"]), num(c["last_batch_edit_s"], 0)]
            )
    head = [f"null-space threshold (batches of {d['batch']})", "edits", "ES", "PS", "NS", "S"]
    return md([*head, "held-out ppl", "MC authors", "MC world", "s for that batch"], rows)


# ---------------------------------------------------------------- docs/methods/editing.md

SWEEP_COLS = ["ES", "GS", "NS", "score", "s/edit"]


def _sweep_label(setting: str) -> str:
    """``memit L2-6 λ2000 (batch 8)`` → ``memit L2–6, λ = 2000 (batch 8)``."""
    return re.sub(r" λ(\S+)", r", λ = \1", layers(setting))


def _harmonic(*xs: float) -> float:
    return len(xs) / sum(1 / max(x, 1e-9) for x in xs)  # layer_sweep.py's score


def _sweep_order(item: tuple[str, list]) -> tuple:
    """Unedited first, then ROME by layer, then MEMIT by first layer and falling λ."""
    s = item[0]
    if s == "unedited":
        return (0,)
    m = re.match(r"(\w+) L(\d+)", s)
    lam = re.search(r"λ(\d+)", s)
    return (1 if m[1] == "rome" else 2, int(m[2]), -int(lam[1]) if lam else 0)


def _sweep_cells(r: dict, seconds: str) -> list[str]:
    s = seconds if r["setting"] != "unedited" else DASH
    return [*(num(r[k], 2) for k in ("ES", "GS", "NS", "score")), s]


@table(
    "layer-sweep-smollm2",
    "docs/methods/editing.md",
    "layer_sweep_smollm2_n12.json",
    "layer_sweep_smollm2_n10.json",
    "memit_weight_smollm2.json",
    note="The λ = 2000 and 200 rows' score is the harmonic mean of their ES, GS and NS, as "
    "`layer_sweep.py` scores, and their s/edit the batch's seconds over 10; "
    "†timed while other jobs shared the cores (the file's note).",
)
def layer_sweep_smollm2(n12: dict, n10: dict, weights: dict) -> str:
    rows = []
    for d in (n10, n12):
        mark = "†" if "shared" in d.get("note", "") else ""
        for r in d["rows"]:
            setting = r["setting"]
            if setting.startswith("memit"):  # this sweep's MEMIT rows ran at the GPT-J weight
                setting = setting.replace(" (batch", " λ15000 (batch")
            rows.append(
                (setting, [_sweep_label(setting), *_sweep_cells(r, num(r["sec_per_edit"], 1) + mark)])
            )
    for r in weights["rows"]:
        if "seconds_for_10" not in r:  # the 15000 row repeats the sweep's
            continue
        setting = f"memit L3-7 λ{r['mom2_update_weight']} (batch 10)"
        es, gs, ns = r["ES"], r["GS"], r["NS"]
        rows.append(
            (
                setting,
                [_sweep_label(setting), *(num(x, 2) for x in (es, gs, ns, _harmonic(es, gs, ns)))]
                + [num(r["seconds_for_10"] / 10, 1)],
            )
        )

    return md(["setting (SmolLM2)", *SWEEP_COLS], [cells for _, cells in sorted(rows, key=_sweep_order)])


#: the settings configs/rome|memit/gemma3-270m.json use
GEMMA_CHOSEN = {"rome L5", "memit L2-6 λ200 (batch 8)"}


@table("layer-sweep-gemma3", "docs/methods/editing.md", "layer_sweep_gemma3.json")
def layer_sweep_gemma3(d: dict) -> str:
    rows = []
    for r in d["rows"]:
        label = _sweep_label(r["setting"])
        if r["setting"] in GEMMA_CHOSEN:
            label = f"**{label}** (chosen)"
        rows.append((r["setting"], [label, *_sweep_cells(r, num(r["sec_per_edit"], 2))]))
    return md(["setting (Gemma 3)", *SWEEP_COLS], [cells for _, cells in sorted(rows, key=_sweep_order)])


@table("ultraedit-calibration", "docs/methods/editing.md", "ultraedit_calibration_smollm2-135m.json")
def ultraedit_calibration(d: dict) -> str:
    rows = sorted(d["rows"].values(), key=lambda r: (-r["layers"][0], r["lr"]))
    first = rows[0]["unedited"]
    head = ["layers", "η", "ES", "PS", "NS", "S"]
    out = [["(unedited)", "", *(num(first[k]) for k in ("ES", "PS", "NS", "S"))]]
    out += [
        [f"{r['layers'][0]}–{r['layers'][-1]}", f"{r['lr']:g}", *(num(r[k]) for k in ("ES", "PS", "NS", "S"))]
        for r in rows
    ]
    return md(head, out)


table("ultraedit-calibration-gemma3", "docs/methods/editing.md", "ultraedit_calibration_gemma3-270m.json")(
    ultraedit_calibration
)


def _memoir_best(r: dict) -> tuple[str, dict]:
    """The τ of a calibration row that maximises paraphrases retrieving their own mask minus neighbours
    firing (the higher τ on a tie), and its rates."""
    sweep = r["tau_sweep"]
    gap = {t: v["paraphrase_retrieves_own"] - v["neighbour_fires"] for t, v in sweep.items()}
    t = max(gap, key=lambda t: (round(gap[t], 6), float(t)))
    return t, sweep[t]


@table("memoir-calibration", "docs/methods/editing.md", "memoir_calibration_smollm2-135m.json")
def memoir_calibration(d: dict) -> str:
    s = d["suggested"]
    pick = [
        r
        for r in d["rows"]
        if (r["layer"] == s["layer"] and r["prompt_feature"] == s["prompt_feature"])
        or (
            r["top_k"] == s["top_k"]
            and (r["layer"] == s["layer"]) != (r["prompt_feature"] == s["prompt_feature"])
        )
    ]
    rows = []
    for r in pick:
        t, v = _memoir_best(r)
        rows.append(
            [r["layer"], f"`{r['prompt_feature']}`", f"{r['k']} ({num(r['chance'], 2)})"]
            + [num(r[c][1], 2) for c in ("paraphrase_own", "neighbour_best", "unrelated_best")]
            + [num(float(t), 2)]
            + [num(v[c], 2) for c in ("paraphrase_retrieves_own", "neighbour_fires", "unrelated_fires")]
        )
    head = ["layer", "feature", "k (k/D)", "paraphrase, own", "neighbour, best", "unrelated, best", "best τ"]
    return md([*head, "paraphrase retrieves own", "neighbour fires", "unrelated fires"], rows)


@table("memoir-edits", "docs/methods/editing.md", "memoir_calibration_smollm2-135m.json")
def memoir_edits(d: dict) -> str:
    by = d["sequential_edits"]["by_tau"]
    first = next(iter(by.values()))["unedited"]
    out = [["(unedited)", *(num(first[k]) for k in ("ES", "PS", "NS", "S")), DASH]]
    out += [
        [num(float(t), 2), *(num(r[k]) for k in ("ES", "PS", "NS", "S")), num(r["edit_seconds"], 0)]
        for t, r in sorted(by.items(), key=lambda x: -float(x[0]))
    ]
    return md(
        [f"τ ({d['sequential_edits']['n']} edits, one by one)", "ES", "PS", "NS", "S", "edit s (all)"], out
    )


table("memoir-calibration-gemma3", "docs/methods/editing.md", "memoir_calibration_gemma3-270m.json")(
    memoir_calibration
)
table("memoir-edits-gemma3", "docs/methods/editing.md", "memoir_calibration_gemma3-270m.json")(memoir_edits)


# ---------------------------------------------------------------- docs/methods/unlearning.md


@table("unlearn-known", "docs/methods/unlearning.md", "unlearn_known_smollm2-135m.json")
def unlearn_known(d: dict) -> str:
    cols = ["forget_em", "forget_p", "para_em", "heldout_em", "neigh_em"]
    rows = [
        [k, *(num(r[c]) for c in cols), num(r["ppl"], 1), num(r["mc_real_authors"], 2)]
        + [num(r["mc_world_facts"], 2), r.get("steps", DASH), num(r["seconds"], 0) if "steps" in r else DASH]
        for k, r in d["rows"].items()
    ]
    title = f"SmolLM2: forget {d['n_forget']}, retain {d['n_retain']}, held out {d['n_heldout']}"
    head = [title, "forget EM ↓", "forget P̄ ↓", "paraphrase EM ↓", "held-out EM ↑", "neighbour EM ↑"]
    return md([*head, "ppl", "MC authors", "MC world", "steps", "s"], rows)


TOFU_COLS = ["forget_quality", "model_utility", "forget_p", "forget_rouge", "forget_tr", "retain_p"]
TOFU_HEAD = ["forget quality ↑", "model utility ↑", "forget P̄ ↓", "forget ROUGE-L ↓", "forget TR", "retain P̄"]


def _tofu_cells(r: dict) -> list[str]:
    return [small(r["forget_quality"]), *(num(r[c]) for c in TOFU_COLS[1:])]


def _mini_tofu(d: dict, labels: Mapping[str, str]) -> str:
    rows = [
        [labels.get(k, k), *_tofu_cells(r), num(r["retain_rouge"]), r.get("steps") or DASH]
        + [num(r["seconds"], 0, sep=False)]
        for k, r in d["rows"].items()
    ]
    title = f"SmolLM2 mini-TOFU {d['setup']['split']}"
    return md([title, *TOFU_HEAD, "retain ROUGE-L", "steps", "s"], rows)


@table("mini-tofu-forget01", "docs/methods/unlearning.md", "mini_tofu_smollm2-135m_forget01.json")
def mini_tofu_forget01(d: dict) -> str:
    return _mini_tofu(d, {"relearn": "relearn (per-question rewrites, `relearn_rewrite`)"})


@table("mini-tofu-forget10", "docs/methods/unlearning.md", "mini_tofu_smollm2-135m_forget10.json")
def mini_tofu_forget10(d: dict) -> str:
    return _mini_tofu(d, {"dpo": "dpo (IdkPO)"})


# ---------------------------------------------------------------- docs/methods/loka.md

#: mini_tofu.py --edit-n rows in the order the docs read them, described
TOFU_EDIT_ROWS = {
    "retain-only (reference)": "retain-only (reference)",
    "fine-tuned (before unlearning)": "fine-tuned (before the update)",
    "npo": "npo (edit NLL + NPO + retain NLL, one optimisation)",
    "memit": "memit+npo (MEMIT, then NPO)",
    "grace": "grace+npo (GRACE, then NPO)",
    "ft": "ft (FT-L: edit NLL + GA on one MLP matrix, each weight within ±0.005)",
    "wise": "wise+npo (WISE, then NPO)",
    "alphaedit": "alphaedit+npo (AlphaEdit, then NPO)",
    "lora": "lora (edit NLL + NPO + retain NLL on rank-8 factors)",
    "ga": "ga (edit NLL + GA, no retain term)",
    "gd": "gd (edit NLL + GA + retain NLL)",
    "loka": "loka, layer 24",
    "loka forget_stop_nll=2.0": "loka, layer 24, `forget_stop_nll=2.0`",
    "loka forget_stop_nll=2.0,layer=27": "**loka, layer 27 (the default), `forget_stop_nll=2.0`**",
}


@table("mini-tofu-edits", "docs/methods/loka.md", "mini_tofu_smollm2-135m_forget01_edit20.json")
def mini_tofu_edits(d: dict) -> str:
    rows = []
    for key, label in TOFU_EDIT_ROWS.items():
        r = d["rows"][key]
        rows.append(
            [label, *_tofu_cells(r), num(r.get("edt-rl")), num(r.get("edt-prl"))]
            + [num(r.get("edt-ent"), 2), num(r.get("edt-pent"), 2), num(r["seconds"], 0, sep=False)]
        )
    s = d["setup"]
    title = f"SmolLM2 mini-TOFU {s['split']} + {s['edit_n']} edits"
    return md([title, *TOFU_HEAD, "edt-rl", "edt-prl", "edt-ent ↑", "edt-pent ↑", "s"], rows)


JOINT = ["unl-tr", "unl-rl", "edt-rl", "edt-prl", "rem-tr", "rem-rl"]
JOINT_HEAD = ["unl-tr ↑", "unl-rl ↓", "edt-rl ↑", "edt-prl ↑", "rem-tr ↑", "rem-rl ↑"]
#: the LOKA rows of the joint table: (file index, row key, label); 0 = joint_update_*_loka.json,
#: 1 = loka_ablation_*.json
JOINT_LOKA = [
    (0, "loka", "**loka** (layer 27)"),
    (0, "loka, layer 24 (the 0.8-depth layer)", "loka, layer 24 (0.8 of the depth)"),
    (1, "match_threshold=0 (router only)", "loka, layer 24, router only (no retrieval gate)"),
    (1, "first-match stop (before)", "loka, layer 24, first-match stop"),
]


def _setting_title(block: dict, setting: str) -> str:
    s = block["size"]
    return (
        f"{setting}-profile (edit {s['edit']}, forget {s['forget']}, retain {s['retain']}, "
        f"remaining {s['remaining']})"
    )


def _joint(setting: str, base: dict, lk: dict, abl: dict) -> str:
    block = base["settings"][setting]
    order = list(base["settings"]["in"]["rows"])  # both settings in the in-profile order
    keys = sorted(block["rows"], key=lambda k: order.index(k) if k in order else len(order))
    rows = [
        [k, *(num(block["rows"][k][c]) for c in JOINT), num(block["rows"][k]["seconds"], 0)] for k in keys
    ]
    for src, key, label in JOINT_LOKA:
        r = (lk, abl)[src]["settings"][setting]["rows"][key]
        rows.append([label, *(num(r[c]) for c in JOINT), num(r["seconds"], 0)])
    return md([_setting_title(block, setting), *JOINT_HEAD, "s"], rows)


JOINT_FILES = (
    "joint_update_smollm2-135m.json",
    "joint_update_smollm2-135m_loka.json",
    "loka_ablation_smollm2-135m.json",
)


@table("joint-in", "docs/methods/loka.md", *JOINT_FILES)
def joint_in(base: dict, lk: dict, abl: dict) -> str:
    return _joint("in", base, lk, abl)


@table("joint-out", "docs/methods/loka.md", *JOINT_FILES)
def joint_out(base: dict, lk: dict, abl: dict) -> str:
    return _joint("out", base, lk, abl)


def _fires(info: dict) -> str:
    """The router's rate on the remaining (held-out) facts; with the router off, also how many of
    them the retrieval gate lets through to a memory."""
    fires = info["router"]["remaining"]
    passed = info.get("to_memory", {}).get("remaining")
    if fires == 1.0 and passed is not None:
        return f"{num(fires, 2)} ({num(passed)} pass the gate)"
    return num(fires, 2)


def _ablation_row(label: str, r: dict, fires: bool = True) -> list[str]:
    info = r.get("info", {})
    cells = [label, *(num(r[c]) for c in JOINT), info.get("memories", DASH)]
    if fires:
        cells.append(_fires(info) if info else DASH)
    return [*cells, num(r["seconds"], 0)]


#: (file index, row key, label): 0 = joint_update_*.json, 1 = joint_update_*_loka.json,
#: 2 = loka_ablation_*.json
ABLATION_ROWS = {
    "in": [
        (0, "unedited", "unedited"),
        (2, "first-match stop (before)", "first-match stop (the ablations' base)"),
        (2, "edit_stop_nll=0.05", "edit_stop_nll=0.05"),
        (2, "edit_stop_nll=0.05,gate", "edit_stop_nll=0.05, gate_tasks (no retrieval gate)"),
        (1, "loka, layer 24 (the 0.8-depth layer)", "layer 24 (the above + retrieval gate 0.65)"),
        (1, "loka", "**default** (the above on layer 27)"),
        (2, "gate only (router=false)", "gate only (`router=false`, retrieval gate 0.65)"),
        *((2, k, k) for k in ("conflict=shared", "conflict=separate", "k=1", "k=5", "k=10", "k=40")),
        *((2, k, k) for k in ("lsh", "no-router", "keys=llm", "layer=8", "sparse")),
    ],
    "out": [
        (0, "unedited", "unedited"),
        (2, "first-match stop (before)", "first-match stop (the ablations' base)"),
        (
            2,
            "edit_stop_nll=0.05",
            "edit_stop_nll=0.05 (no retrieval gate; no shared memory, so gate_tasks never acts)",
        ),
        (1, "loka, layer 24 (the 0.8-depth layer)", "layer 24 (the above + retrieval gate 0.65)"),
        (1, "loka", "**default** (the above on layer 27)"),
        (2, "layer=27,router=false", "layer 27, gate only (`router=false`)"),
        (2, "layer=16", "layer=16 (defaults otherwise)"),
        *((2, k, k) for k in ("layer=20", "layer=28", "layer=29")),
        (2, "gate only (router=false)", "gate only (`router=false`, retrieval gate 0.65)"),
        (2, "edit_stop_nll=0.01,gate", "edit_stop_nll=0.01, gate_tasks (no retrieval gate)"),
        (2, "edit_contexts=5", "edit_contexts=5 (no retrieval gate)"),
        (2, "conflict=shared", "conflict=shared"),
        (2, "conflict=separate", "conflict=separate"),
    ],
}


def _ablation(setting: str, *files: dict) -> str:
    rows = [
        _ablation_row(label, files[src]["settings"][setting]["rows"][key])
        for src, key, label in ABLATION_ROWS[setting]
    ]
    head = [f"{setting}-profile", *JOINT, "memories", "router fires on remaining", "s"]
    return md(head, rows)


@table("ablation-in", "docs/methods/loka.md", *JOINT_FILES)
def ablation_in(*files: dict) -> str:
    return _ablation("in", *files)


@table("ablation-out", "docs/methods/loka.md", *JOINT_FILES)
def ablation_out(*files: dict) -> str:
    return _ablation("out", *files)


@table(
    "ablation-defaults",
    "docs/methods/loka.md",
    "joint_update_smollm2-135m.json",
    "joint_update_smollm2-135m_loka.json",
    "loka_ablation_smollm2-135m_defaults.json",
)
def ablation_defaults(base: dict, lk: dict, abl: dict) -> str:
    rows = [
        _ablation_row("unedited", base["settings"]["in"]["rows"]["unedited"], fires=False),
        _ablation_row(
            "**default** (k=20, `auto`, K-means)", lk["settings"]["in"]["rows"]["loka"], fires=False
        ),
    ]
    rows += [_ablation_row(k, r, fires=False) for k, r in abl["settings"]["in"]["rows"].items()]
    head = ["in-profile, default settings", "unl-tr", "unl-rl ↓", *JOINT[2:], "memories", "s"]
    return md(head, rows)


@table("router-calibration", "docs/methods/loka.md", "loka_router_smollm2-135m.json")
def router_calibration(d: dict) -> str:
    s_in, s_out = d["settings"]["in"], d["settings"]["out"]
    rows = []
    for a, b in zip(s_in["rows"], s_out["rows"], strict=True):
        cells = [f"{a['threshold']:g}"]
        for r in (a, b):
            cells += [num(r["fnr_paraphrase"], 2), num(r["fpr_remaining"]), num(r["fpr_retain"], 2)]
        rows.append(cells)
    head = ["τ"]
    for s in ("in", "out"):
        head += [f"{s}: FNR paraphrases", f"{s}: FPR held-out", f"{s}: FPR retain (trained)"]
    return md(head, rows)


#: loka's default match_threshold with MiniLM keys
DEFAULT_MATCH = 0.65


@table("retrieval-gate", "docs/methods/loka.md", "loka_router_smollm2-135m.json")
def retrieval_gate(d: dict) -> str:
    g_in, g_out = d["settings"]["in"]["gate"], d["settings"]["out"]["gate"]
    rows = []
    for a, b in zip(g_in, g_out, strict=True):
        t = f"{a['match_threshold']:g}"
        cells = [f"**{t}**" if a["match_threshold"] == DEFAULT_MATCH else t]
        for r in (a, b):
            cells += [num(r["fnr_paraphrase"], 2), num(r["fpr_remaining"])]
        for r in (a, b):
            cells.append(f"{num(r['with_router_fnr_paraphrase'], 2)} / {num(r['with_router_fpr_remaining'])}")
        rows.append(cells)
    head = ["match_threshold", "in: FNR paraphrases", "in: FPR held-out", "out: FNR paraphrases"]
    head += ["out: FPR held-out", "in, behind the router: FNR / FPR held-out"]
    return md([*head, "out, behind the router: FNR / FPR held-out"], rows)


LATENCY_FILES = (
    "loka_latency_smollm2-135m_one_encoder_pass.json",
    "loka_latency_smollm2-135m_one_encoder_pass_run2.json",
    "loka_latency_smollm2-135m_two_threads.json",
)


@table("loka-latency", "docs/methods/loka.md", *LATENCY_FILES)
def loka_latency(*runs: dict) -> str:
    rows = []
    for name, d in zip(LATENCY_FILES, runs, strict=True):
        by_batch = {r["batch"]: r for r in d["rows"]}
        threads = d["threads"]
        cells = [f"{'one thread' if threads == 1 else f'{threads} threads'} (`{name}`)"]
        for what in ("forward", "generate"):
            for b in sorted(by_batch):
                r = by_batch[b]
                cells.append(
                    f"{num(r[f'{what}_ms'], 1, sep=False)} → {num(r[f'{what}_loka_ms'], 1, sep=False)} "
                    f"({signed_pct(r[f'{what}_overhead'])})"
                )
        rows.append(cells)
    batches = sorted(r["batch"] for r in runs[0]["rows"])
    tokens = runs[0]["new_tokens"]
    head = ["run"]
    head += [f"batch {b} forward (ms, overhead)" for b in batches]
    head += [f"batch {b} generate {tokens} tokens" for b in batches]
    return md(head, rows)


# ---------------------------------------------------------------- docs/knowledgesmith.md

LEVELS = ("root", "intermediate", "leaf")
KG = "knowledgesmith_smollm2-135m.json"


@table("kg-scoring", "docs/knowledgesmith.md", "kg_scoring_smollm2-135m.json")
def kg_scoring(d: dict) -> str:
    rows = [
        [lv, a["n"], num(a["cloze"]), num(a["mc"])]
        for lv, a in ((lv, d["levels"][lv]["all"]) for lv in LEVELS)
    ]
    return md(["level", "probes", "cloze: true option chosen", "MC letter: true option chosen"], rows)


def _kg_runs(d: dict, methods: Iterable[str]) -> list[dict]:
    """The study's runs of ``methods``, sorted by task, level and scale; KL and CKA log-min-max
    normalised within each task over these runs (as ``loka report`` normalises)."""
    runs = [dict(r) for r in d["runs"] if r["method"] in methods]
    runs.sort(key=lambda r: (r["task"], LEVELS.index(r["level"]), r["scale"]))
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_task[r["task"]].append(r)
    for group in by_task.values():
        for key in ("kl", "cka"):
            logs = [math.log(r[key] + 1e-8) for r in group]
            lo, hi = min(logs), max(logs)
            for r, v in zip(group, logs, strict=True):
                r[f"{key}_norm"] = 0.0 if hi == lo else (v - lo) / (hi - lo)
    return runs


def _probe(r: dict, kind: str) -> float | None:
    """Direct, reverse and multi-hop as the table reads them: for an edit the new object chosen, for
    unlearning the forgotten object still chosen."""
    key = "target_after" if r["task"] == "edit" else "original_after"
    return r["by_type"].get(kind, {}).get(key)


def _propagation(runs: list[dict], task_label: Callable[[dict], str], norm: bool) -> str:
    rows = []
    for r in runs:
        cells = [
            task_label(r),
            r["level"],
            r["scale"],
            *(num(_probe(r, k)) for k in ("direct", "reverse", "multihop")),
        ]
        cells += [num(r[k]) for k in ("ccr", "ccr_near", "ccr_far", "rr", "conflict_rate")]
        cells += [num(r["kl"]), num(r["kl_norm"])] if norm else [num(r["kl"])]
        cells += [num(r["cka"]), num(r["cka_norm"])] if norm else [num(r["cka"])]
        rows.append([*cells, num(r["seconds"]["update"], 0)])
    head = [
        "task",
        "level",
        "k",
        "direct",
        "reverse",
        "multi-hop",
        "CCR",
        "CCR near",
        "CCR far",
        "RR",
        "conflict",
    ]
    head += ["KL", "KL norm", "CKA", "CKA norm"] if norm else ["KL", "CKA"]
    return md([*head, "update s"], rows)


@table("kg-propagation", "docs/knowledgesmith.md", KG)
def kg_propagation(d: dict) -> str:
    return _propagation(_kg_runs(d, ("alphaedit", "npo")), lambda r: r["task"], norm=True)


@table("kg-relearn", "docs/knowledgesmith.md", KG)
def kg_relearn(d: dict) -> str:
    return _propagation(_kg_runs(d, ("relearn",)), lambda r: r["method"], norm=False)


@table("kg-npo-transfer", "docs/knowledgesmith.md", KG)
def kg_npo_transfer(d: dict) -> str:
    kinds = ("direct", "reverse", "multihop", "comparison", "conflict", "contextual")
    top = max(r["scale"] for r in d["runs"])
    rows = []
    for r in _kg_runs(d, ("npo",)):
        if r["scale"] != top:
            continue
        bt = r["by_type"]
        rows.append(
            [r["level"]]
            + [f"{num(bt[k]['original_before'])} → {num(bt[k]['original_after'])}" for k in kinds]
        )
    head = ["level", "direct", "reverse", "multi-hop", "comparison", "conflict", "contextual accuracy"]
    return md(head, rows)


@table("kg-domains", "docs/knowledgesmith.md", KG)
def kg_domains(d: dict) -> str:
    pooled: dict[tuple[str, str], dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    for r in _kg_runs(d, ("alphaedit", "npo")):
        for dom, s in r["by_domain"].items():
            a, n = pooled[(r["task"], dom)], s.get("interventions", 1)
            for k in ("ccr", "rr", "conflict_rate"):
                if s.get(k) is not None:
                    a[k].append((s[k], n))
            v = (
                s.get("by_type", {})
                .get("direct", {})
                .get("target_after" if r["task"] == "edit" else "original_after")
            )
            if v is not None:
                a["direct"].append((v, n))

    def wmean(xs: list[tuple[float, int]]) -> float | None:
        w = sum(n for _, n in xs)
        return sum(v * n for v, n in xs) / w if w else None

    rows = [
        [task, dom, *(num(wmean(a[k])) for k in ("direct", "ccr", "rr", "conflict_rate"))]
        + [sum(n for _, n in a["ccr"])]
        for (task, dom), a in sorted(pooled.items())
    ]
    return md(["task", "domain", "direct", "CCR", "RR", "conflict", "interventions"], rows)


@table("kg-geometry", "docs/knowledgesmith.md", KG)
def kg_geometry(d: dict) -> str:
    keys = ("scale_min", "scale_max", "scale_spread", "rot_u", "rot_v", "rel_change")
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in _kg_runs(d, ("alphaedit", "npo")):
        series[(r["task"], r["level"])].append(r)
    rows = []
    for (task, level), rs in series.items():
        scales = " / ".join(str(r["scale"]) for r in rs)
        rows.append(
            [task, level, scales, *(" / ".join(num(r["geometry_mean"][k]) for r in rs) for k in keys)]
        )
    head = ["task", "level", "k", "σ'/σ min", "σ'/σ max", "scaling spread", "rotation U", "rotation V"]
    return md([*head, "‖Δ‖/‖W‖"], rows)


# ---------------------------------------------------------------- docs/serve.md


@table("serve-load", "docs/serve.md", "serve_load_smollm2-135m.json")
def serve_load(d: dict) -> str:
    """Latency per phase and request stack, then the concurrent phase's totals and failures."""

    def ms(x: float) -> str:
        return f"{num(1000 * x, 0)} ms"

    seq, conc = d["sequential"], d["concurrent"]
    rows = []
    for phase, part in (("1 (sequential)", seq), (f"{d['clients']} (concurrent)", conc)):
        for key, what in (("none", "none"), ("per_request", "[a], [b] or [a, b]")):
            lat = part[key]
            rows.append([phase, what, lat["n"], ms(lat["p50_s"]), ms(lat["p95_s"]), ms(lat["max_s"])])
    lat_table = md(["clients", "per-request stack", "requests", "p50", "p95", "max"], rows)
    total = md(
        [
            "requests",
            "clients",
            "tokens each",
            "wall",
            "throughput",
            "global apply/revert of c meanwhile",
            "answers under c",
            "streamed",
            "failures",
            "apply + revert [a] / [b] / [a, b]",
            "load average at the start",
        ],
        [
            [
                d["n"],
                d["clients"],
                d["max_tokens"],
                f"{num(conc['wall_s'], 1)} s",
                f"{num(conc['throughput_rps'], 2)} req/s",
                conc["global_toggles"],
                conc["under_global_c"],
                conc["streamed"],
                d["failures"],
                " / ".join(f"{num(d['apply_and_revert_ms'][k], 2)}" for k in ("a", "b", "a+b")) + " ms",
                f"{num(d['provenance']['loadavg'][0], 1)} on {d['provenance']['cpus']} CPUs",
            ]
        ],
    )
    return f"{lat_table}\n\n{total}"


# ---------------------------------------------------------------- docs/export.md

GGUF_METHOD = {"none": "unedited", "memit": "MEMIT, one batch", "rome": "ROME, one after another"}


@table("gguf-survival", "docs/export.md", "gguf_survival_smollm2-135m.json")
def gguf_survival(d: dict) -> str:
    """Per edited model and GGUF type: the file's size and times, ES/PS/NS in memory → in the file,
    survival (of the edits that succeeded in memory) and flips (rewrite outcomes that differ)."""

    def arrow(r: dict, k: str) -> str:
        return f"{num(r[k + '_before'])} → {num(r[k + '_after'])}"

    rows = []
    for r in d["rows"].values():
        edited = r["method"] != "none"
        rows.append(
            [
                GGUF_METHOD.get(r["method"], r["method"]) + (f" ({d['n']} edits)" if edited else ""),
                r["quant"],
                f"{num(r['bytes'] / 1e6, 1)} MB",
                arrow(r, "es"),
                f"{r['survived']} of {r['succeeded_before']}" if edited else DASH,
                r["flips"],
                arrow(r, "ps"),
                arrow(r, "ns"),
                num(r["top1_agreement"], 2),
                f"{num(r['export_seconds'], 1)} s",
                f"{num(r['verify_seconds'], 1)} s",
            ]
        )
    head = [
        f"{d['model']}, {d['n']} CounterFact records",
        "type",
        "file",
        "ES memory → file",
        "edits survived",
        "flips",
        "PS memory → file",
        "NS memory → file",
        "next-token agreement",
        "export",
        "read back and scored",
    ]
    return md(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a region is stale")
    args = ap.parse_args(argv)
    try:
        stale = generate(ROOT, TABLES, check=args.check)
    except TablesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print("stale tables (the docs differ from their result files; run `make results`):")
            print("\n".join(f"  {s}" for s in stale))
            return 1
        print(f"all {len(TABLES)} tables match their result files")
        return 0
    print("\n".join(f"rewrote {s}" for s in stale) or f"all {len(TABLES)} tables already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
