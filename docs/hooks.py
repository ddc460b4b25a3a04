"""mkdocs hook: the command-line reference is generated from loka's own parser at build time, so it
lists every command and flag exactly as ``loka COMMAND --help`` prints them."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _walk(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, str]]:
    out = [(name, parser.format_help())]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                out += _walk(sub, f"{name} {sub_name}")
    return out


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    import os

    os.environ.setdefault("COLUMNS", "100")
    from loka.cli import build_parser

    parts = []
    for name, text in _walk(build_parser(), "loka"):
        depth = name.count(" ")
        parts.append(f"{'#' * min(depth + 1, 4)} `{name}`\n\n```text\n{text.rstrip()}\n```\n")
    return markdown.replace(MARKER, "\n".join(parts))
