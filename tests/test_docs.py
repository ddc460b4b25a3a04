"""Every snippet of the README and the docs marked ``<!-- test -->`` runs: command lines through the
CLI (on a tiny model unless they name one), Python blocks as they are (with ``smollm2-135m`` replaced
by a tiny model), so the documentation cannot drift from the code."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = re.compile(r"<!-- test -->\s*\n```(\w+)\n(.*?)\n```", re.S)
TINY = "tiny-llama"


def snippets() -> list[tuple[str, str, str]]:
    out = []
    for page in PAGES:
        for i, m in enumerate(MARK.finditer(page.read_text(encoding="utf-8"))):
            out.append((f"{page.relative_to(ROOT)}#{i}", m.group(1), m.group(2)))
    return out


def test_every_code_block_is_tested_or_says_why_not():
    """A bash or python block runs in :func:`test_snippet_runs`, or its comment gives the reason it cannot."""
    block = re.compile(r"(<!--[^>]*-->)?\s*\n```(bash|python)\n")
    untested = []
    for page in PAGES:
        for m in block.finditer(page.read_text(encoding="utf-8")):
            mark = m.group(1) or ""
            if mark != "<!-- test -->" and not re.match(r"<!-- no test: \S", mark):
                untested.append(f"{page.relative_to(ROOT)}: {m.group(0).strip()[:60]!r}")
    assert not untested, "blocks neither tested nor explained:\n" + "\n".join(untested)


def test_the_readme_has_tested_snippets():
    langs = {lang for name, lang, _ in snippets() if name.startswith("README")}
    assert {"bash", "python"} <= langs


def _with_tiny_model(argv: list[str]) -> list[str]:
    from loka.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    while (
        sub._subparsers is not None and len(argv) > 1 and argv[1] in sub._subparsers._group_actions[0].choices
    ):
        sub = sub._subparsers._group_actions[0].choices[argv[1]]
    options = {s for a in sub._actions for s in a.option_strings}
    return [*argv, "--model", TINY] if "--model" in options and "--model" not in argv else argv


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    os.symlink(ROOT / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOKA_THREADS", "2")
    return tmp_path


@pytest.mark.parametrize(("name", "lang", "code"), snippets(), ids=[s[0] for s in snippets()])
def test_snippet_runs(name, lang, code, workdir, capsys):
    from loka.cli import main

    if lang == "bash":
        for line in code.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or not line.startswith("loka "):
                continue
            argv = _with_tiny_model(shlex.split(line)[1:])
            assert main(argv) == 0, (line, capsys.readouterr().err)
    elif lang == "python":
        exec(compile(code.replace('"smollm2-135m"', f'"{TINY}"'), name, "exec"), {"__name__": "__snippet__"})
    else:
        pytest.fail(f"{name}: a tested snippet must be bash or python, not {lang}")
