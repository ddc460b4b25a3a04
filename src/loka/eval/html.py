"""Shared pieces of loka's self-contained HTML pages: tables, embedded PNGs, one stylesheet."""

from __future__ import annotations

import base64
import html
import io

CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1280px}table{border-collapse:collapse;margin:1em 0;"
    "font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right;vertical-align:top}"
    "th{background:#eee}td.l,th.l{text-align:left}img{max-width:100%}.note{color:#555;font-size:13px}"
    "details{margin:.5em 0}summary{cursor:pointer;font-weight:bold}"
)


def esc(x) -> str:
    return html.escape(str(x))


def fmt(x, nd: int = 3) -> str:
    """A cell: floats to ``nd`` decimals (tiny ones in e-notation), None as an en dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:
            return "–"
        return f"{x:.{nd}f}" if abs(x) >= 10**-nd or x == 0 else f"{x:.1e}"
    return esc(x)


def table(head: list[str], rows: list[list], left: int = 3, cls: str = "") -> str:
    """An HTML table; the first ``left`` columns and every text cell are left-aligned."""

    def cell(tag: str, i: int, v, text: bool = False) -> str:
        c = " class='l'" if i < left or text else ""
        return f"<{tag}{c}>{v}</{tag}>"

    th = "".join(cell("th", i, esc(h)) for i, h in enumerate(head))
    body = "".join(  # text cells (answers, generations) read left to right wherever they are
        "<tr>" + "".join(cell("td", i, fmt(c), isinstance(c, str)) for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    c = f" class='{cls}'" if cls else ""
    return f"<table{c}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def img(name: str, png: bytes) -> str:
    return f"<img alt='{esc(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>" + "".join(body) + "</body></html>"
    )
