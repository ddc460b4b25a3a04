"""Before/after probes of an edit: what the CLI's ``edit`` and the demo print."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .requests import EditRequest
from .scoring import target_logprobs

if TYPE_CHECKING:
    from .models.loader import ModelHandle


def probe_rows(handle: ModelHandle, req: EditRequest) -> list[dict]:
    """For the edit prompt, each paraphrase and each neighbourhood prompt: top answer and P(target)."""
    kinds = (
        [("edit", req.text)]
        + [("paraphrase", p) for p in req.paraphrases]
        + [("neighbourhood", p) for p in req.neighborhood]
    )
    prompts = [p for _, p in kinds]
    new = target_logprobs(handle, prompts, [req.target_new] * len(prompts))
    true = (
        target_logprobs(handle, prompts, [req.target_true] * len(prompts))
        if req.target_true
        else [None] * len(prompts)
    )
    rows = []
    for (kind, p), a, b in zip(kinds, new, true):
        row = {
            "kind": kind,
            "prompt": p,
            "top": a["top_token"],
            "top_prob": round(a["top_prob"], 4),
            "p_target_new": a["prob"],
        }
        if b is not None:
            row["p_target_true"] = b["prob"]
        rows.append(row)
    return rows


def format_table(req: EditRequest, before: list[dict], after: list[dict]) -> str:
    head = f"{'kind':13s} {'prompt':46s} {'top before':>14s} {'top after':>14s} {'P(new) before':>13s} {'P(new) after':>12s}"
    lines = [
        f"edit: {req.text!r} -> {req.target_new!r}"
        + (f" (was {req.target_true!r})" if req.target_true else ""),
        head,
    ]
    for b, a in zip(before, after):
        p = b["prompt"] if len(b["prompt"]) <= 46 else b["prompt"][:43] + "..."
        lines.append(
            f"{b['kind']:13s} {p:46s} {b['top']!r:>14s} {a['top']!r:>14s} {b['p_target_new']:13.4f} {a['p_target_new']:12.4f}"
        )
    return "\n".join(lines)
