"""Every table of measured numbers in the docs is what ``make results`` generates from its JSON, and a
missing result file or a broken region fails with a message that names it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    name = "loka_bench_tables"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "tables.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve their module
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_docs_tables_match_their_result_files():
    stale = _tables().generate(ROOT, check=True)
    assert not stale, "tables differ from their result files (run `make results`):\n" + "\n".join(stale)


def _project(tmp_path: Path, doc: str, data: dict | None = None) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(doc)
    if data is not None:
        (tmp_path / "benchmarks" / "results").mkdir(parents=True)
        (tmp_path / "benchmarks" / "results" / "r.json").write_text(json.dumps(data))
    return tmp_path


def _registry(t):
    def render(d: dict) -> str:
        return t.md(["row", "x"], [[k, t.num(v)] for k, v in d["rows"].items()])

    return {"demo": t.Table("demo", "docs/page.md", ("r.json",), render)}


REGION = "# Page\n\n<!-- results:demo -->\n| typed | 1 |\n<!-- /results:demo -->\n\nAfter.\n"


def test_a_region_is_written_from_its_json_and_then_checks_clean(tmp_path):
    t = _tables()
    root = _project(tmp_path, REGION, {"rows": {"a": 0.1235, "b": 2}})
    registry = _registry(t)
    assert t.generate(root, registry, check=True) == ["docs/page.md: demo"]
    assert "| typed | 1 |" in (root / "docs" / "page.md").read_text()  # --check writes nothing
    assert t.generate(root, registry) == ["docs/page.md: demo"]
    text = (root / "docs" / "page.md").read_text()
    assert "| a | 0.124 |\n| b | 2.000 |" in text
    assert "provenance not recorded" in text and "benchmarks/results/r.json" in text
    assert text.startswith("# Page\n") and text.endswith("\nAfter.\n")
    assert t.generate(root, registry, check=True) == []
    assert not list((root / "docs").glob(".*.tmp"))


def test_a_stamped_file_is_cited_with_its_provenance(tmp_path):
    t = _tables()
    prov = {"commit": "abc1234def", "date": "2026-11-30T10:00:00+00:00", "cpu": "Test CPU", "threads": 2}
    root = _project(tmp_path, REGION, {"rows": {"a": 1}, "provenance": prov})
    t.generate(root, _registry(t))
    text = (root / "docs" / "page.md").read_text()
    assert "`benchmarks/results/r.json` (commit abc1234, 2026-11-30, Test CPU, 2 threads)" in text
    assert "provenance not recorded" not in text


def test_a_missing_result_file_names_the_table_and_the_file(tmp_path):
    t = _tables()
    root = _project(tmp_path, REGION)
    with pytest.raises(
        t.TablesError,
        match=r"docs/page\.md: table 'demo' reads benchmarks/results/r\.json, which does not exist",
    ):
        t.generate(root, _registry(t), check=True)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("<!-- results:demo -->\n| x |\n", r"page\.md:1: region 'demo' has no closing marker"),
        ("| x |\n<!-- /results:demo -->\n", r"page\.md:2: closing marker of 'demo' with no opening marker"),
        (
            "<!-- results:demo -->\n<!-- results:other -->\n<!-- /results:other -->\n<!-- /results:demo -->\n",
            r"page\.md:2: region 'other' opens inside region 'demo'",
        ),
        (
            "<!-- results:demo -->\n<!-- /results:other -->\n",
            r"closing marker of 'other' inside region 'demo'",
        ),
        (REGION + REGION, r"region 'demo' appears twice"),
        ("No region here.\n", r"no region for table 'demo'"),
        (REGION + "<!-- results:nobody -->\n<!-- /results:nobody -->\n", r"no table generator .* 'nobody'"),
    ],
)
def test_broken_regions_fail_with_a_clear_message(tmp_path, doc, message):
    t = _tables()
    root = _project(tmp_path, doc, {"rows": {"a": 1}})
    before = (root / "docs" / "page.md").read_text()
    with pytest.raises(t.TablesError, match=message):
        t.generate(root, _registry(t))
    assert (root / "docs" / "page.md").read_text() == before


def test_a_result_file_without_the_expected_fields_names_the_table(tmp_path):
    t = _tables()
    root = _project(tmp_path, REGION, {"other": 1})
    with pytest.raises(t.TablesError, match=r"table 'demo' cannot be built from r\.json: KeyError"):
        t.generate(root, _registry(t), check=True)


def test_numbers_round_as_a_reader_rounds():
    t = _tables()
    assert [t.num(0.7365), t.num(0.2175), t.num(-0.0001), t.num(147.95, 1), t.num(1822.5, 0)] == [
        "0.737",
        "0.218",
        "0.000",
        "148.0",
        "1,823",
    ]
    assert [t.small(6.5768e-05), t.small(0.0286), t.tiny(2e-05), t.tiny(0.04585), t.big(102175.05)] == [
        "6.6e-05",
        "0.029",
        "2e-5",
        "0.046",
        "102,175",
    ]
