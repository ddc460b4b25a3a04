"""Every benchmark result JSON records its provenance: the scripts in ``benchmarks/`` write results
through ``_stamp.write_result``, a script that merges rows of several runs stamps each row, and the
docs' source notes say when rows carry their own stamps."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: scripts that add their rows to the rows an earlier run left in the same result file
MERGING = ("batch_edit_speed", "eval_counterfact", "joint_update", "lifelong", "mini_tofu", "unlearn_known")
OLD = {"commit": "1111111aaaa", "date": "2026-01-02T10:00:00+00:00", "cpu": "Old CPU", "threads": 2}
NEW = {"commit": "2222222bbbb", "date": "2026-03-04T10:00:00+00:00", "cpu": "New CPU", "threads": 4}


def _module(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve their module
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _json_writes(tree: ast.AST) -> tuple[list[str], list[str]]:
    """The targets (as source text) of the JSON writes in a script: through ``write_result``, and
    otherwise (``atomic_write_json``, ``json.dump``, ``X.write_text(json.dumps(...))``)."""
    stamped, raw = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name == "write_result" and node.args:
            stamped.append(ast.unparse(node.args[0]))
        elif name == "atomic_write_json" and node.args:
            raw.append(ast.unparse(node.args[0]))
        elif name == "dump" and ast.unparse(f) == "json.dump" and len(node.args) > 1:
            raw.append(ast.unparse(node.args[1]))
        elif name == "write_text" and isinstance(f, ast.Attribute) and "json.dumps" in ast.unparse(node):
            raw.append(ast.unparse(f.value))
    return stamped, raw


def _imports_stamp(tree: ast.AST) -> bool:
    return any(
        isinstance(n, ast.ImportFrom)
        and n.module == "_stamp"
        and {a.name for a in n.names} & {"write_result", "stamp"}
        for n in ast.walk(tree)
    )


SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "_stamp.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_writes_its_results_json_stamped(path):
    """A script that names ``benchmarks/results`` and writes JSON imports ``_stamp`` and writes its
    result through ``write_result``; its other JSON writes (input data, scratch files) go elsewhere
    than the result path."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    stamped, raw = _json_writes(tree)
    if "benchmarks/results" not in text or not (stamped or raw):
        return  # reads results (plots, tables) or writes none
    assert _imports_stamp(tree), f"{path.name} writes JSON under benchmarks/results without _stamp"
    assert stamped, f"{path.name} writes its result JSON without write_result"
    unstamped = [t for t in raw if t in stamped or "results" in t]
    assert not unstamped, f"{path.name} writes {unstamped} without provenance"


@pytest.mark.parametrize("name", MERGING)
def test_a_merging_benchmark_stamps_each_row(name):
    tree = ast.parse((BENCH / f"{name}.py").read_text(encoding="utf-8"))
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "merge_rows" in calls, f"{name}.py merges rows without stamping each (merge_rows)"


def test_merge_rows_keeps_the_older_rows_stamp():
    st = _module("loka_bench_stamp", BENCH / "_stamp.py")
    old = {"a": {"x": 1, "provenance": OLD}, "b": {"x": 2}}
    merged = st.merge_rows(old, {"c": {"x": 3}, "a": {"x": 4}}, NEW)
    assert list(merged) == ["a", "b", "c"]  # a row measured again keeps its place
    assert merged["a"] == {"x": 4, "provenance": NEW}
    assert merged["b"] == {"x": 2}  # a row written before stamping stays unstamped
    assert merged["c"] == {"x": 3, "provenance": NEW}
    assert old["a"]["provenance"] is OLD  # the caller's rows are not changed


def test_eval_counterfact_keeps_an_earlier_runs_row_and_stamp(tmp_path):
    """A run on the same records adds its row beside the earlier run's, each with its own stamp and
    the file's own stamp the new run's; a run on other records starts the rows afresh."""
    ec = _module("loka_bench_eval_counterfact", BENCH / "eval_counterfact.py")
    st = _module("loka_bench_stamp", BENCH / "_stamp.py")
    path = tmp_path / "eval_counterfact_m.json"
    head = {"model": "m", "n": 10, "data": "cf.json"}
    st.write_result(path, ec.result(path, head, {"unedited": {"ES": 0.1}}, OLD), provenance=OLD)
    st.write_result(path, ec.result(path, head, {"ROME (single)": {"ES": 0.9}}, NEW), provenance=NEW)
    d = json.loads(path.read_text())
    assert d["provenance"] == NEW
    assert d["rows"]["unedited"] == {"ES": 0.1, "provenance": OLD}
    assert d["rows"]["ROME (single)"] == {"ES": 0.9, "provenance": NEW}
    other = ec.result(path, {**head, "n": 20}, {"unedited": {"ES": 0.2}}, NEW)
    assert other["rows"] == {"unedited": {"ES": 0.2, "provenance": NEW}}


def test_the_source_note_says_when_rows_are_stamped_individually():
    t = _module("loka_bench_tables", BENCH / "tables.py")
    data = {
        "rows": {"a": {"x": 1, "provenance": OLD}, "b": {"x": 2, "provenance": NEW}, "c": {"x": 3}},
        "provenance": NEW,
    }
    line = t.source_line({"r.json": data})
    assert (
        "`benchmarks/results/r.json` (last written at commit 2222222, 2026-03-04, New CPU, 4 threads; "
        "2 rows stamped individually: commits 1111111, 2222222, 2026-01-02 to 2026-03-04; "
        "1 row without provenance)"
    ) in line
    nested = {"settings": {"in": {"size": {"edit": 1}, "rows": {"a": {"x": 1, "provenance": OLD}}}}}
    assert "(file provenance not recorded; 1 row stamped individually: commit 1111111, 2026-01-02)" in (
        t.source_line({"r.json": nested})
    )
    plain = t.source_line({"r.json": {"rows": {"a": {"x": 1}}, "provenance": OLD}})
    assert "(commit 1111111, 2026-01-02, Old CPU, 2 threads)" in plain and "individually" not in plain


def test_uncommitted_code_ignores_result_files_and_docs(tmp_path):
    """A run's stamp says "uncommitted changes" when the code differs from the commit, not when a
    parallel run has written its result file or the prose changed."""
    import subprocess

    stamp = _module("_stamp", BENCH / "_stamp.py")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for rel in ("benchmarks/results/r.json", "docs/a.md", "src/m.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert stamp.uncommitted_code(tmp_path) is False
    (tmp_path / "benchmarks/results/r.json").write_text("1\n")
    (tmp_path / "docs/a.md").write_text("1\n")
    assert stamp.uncommitted_code(tmp_path) is False
    (tmp_path / "src/m.py").write_text("1\n")
    assert stamp.uncommitted_code(tmp_path) is True
    assert stamp.uncommitted_code(tmp_path / "nowhere") is None
