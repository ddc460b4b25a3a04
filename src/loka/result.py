"""What an update did, measured before and after it: the rows and tables ``loka edit``, ``loka unlearn``
and ``loka update`` print, and :class:`EditResult`, which ``loka.edit(..., report=True)`` returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .requests import EditRequest, UpdateBatch
from .scoring import target_logprobs

if TYPE_CHECKING:
    from .artifact import Artifact
    from .models.loader import ModelHandle

SetName = Literal["edit", "forget", "retain"]

#: each set of an update and the answer its rows score: the new one, the forgotten one, the kept one
SET_ANSWER: dict[SetName, str] = {"edit": "target_new", "forget": "target_true", "retain": "target_new"}


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
    """One edit's probes before and after: top answer and P(new answer) per prompt."""
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


def answer_rows(handle: ModelHandle, reqs: Sequence[EditRequest], which: str) -> list[dict]:
    """Per request: normalised probability ``p_norm`` and exact match ``em`` of its answer ``which``."""
    from .forgetting.metrics import answer_stats

    return answer_stats(handle, [r.text for r in reqs], [getattr(r, which) for r in reqs])


def set_rows(handle: ModelHandle, batch: UpdateBatch) -> list[dict]:
    """Per request of ``batch``: its set, prompt, the answer that set scores (:data:`SET_ANSWER`),
    ``p_norm`` and ``em``; sets in the order edit, forget, retain."""
    rows = []
    for name, which in SET_ANSWER.items():
        reqs = batch.edits if name == "edit" else getattr(batch, name)
        if reqs:
            stats = answer_rows(handle, reqs, which)
            rows += [
                {"set": name, "prompt": r.text, "answer": getattr(r, which), **s} for r, s in zip(reqs, stats)
            ]
    return rows


def set_summary(before: list[dict], after: list[dict]) -> dict:
    """One set's size and mean ``p_norm`` / ``em`` before and after."""
    mean = lambda rows, k: round(sum(r[k] for r in rows) / len(rows), 4) if rows else None  # noqa: E731
    return {
        "n": len(before),
        "p_norm_before": mean(before, "p_norm"),
        "p_norm_after": mean(after, "p_norm"),
        "em_before": mean(before, "em"),
        "em_after": mean(after, "em"),
    }


def sets_table(sets: dict[str, dict]) -> str:
    """The per-set table (:func:`set_summary` of each set)."""
    lines = [
        f"{'set':8s} {'n':>4s}  {'P̄ before':>9s} {'P̄ after':>9s}  {'exact before':>12s} {'exact after':>11s}"
    ]
    for name, r in sets.items():
        lines.append(
            f"{name:8s} {r['n']:4d}  {r['p_norm_before']:9.3f} {r['p_norm_after']:9.3f}  {r['em_before']:12.3f} {r['em_after']:11.3f}"
        )
    lines.append(
        "P̄: the set's answer's probability (per-token geometric mean); exact: the greedy answer is it "
        "(edit: the new answer, forget: the forgotten one, retain: the kept one)"
    )
    return "\n".join(lines)


@dataclass
class EditResult:
    """An update's artifact and what it changed, measured on the same rows the CLI prints.

    An edit's rows (:func:`probe_rows`) are one per prompt probed: ``request`` (its index in
    ``requests``), ``kind`` (edit, paraphrase, neighbourhood), ``prompt``, ``top``, ``top_prob``,
    ``p_target_new`` (and ``p_target_true``). An update with forget or retain requests, and every
    ``unlearn``/``update``, has one row per request (:func:`set_rows`): ``set`` (edit, forget, retain),
    ``prompt``, ``answer``, ``p_norm`` (normalised probability of that answer) and ``em`` (exact match).
    ``str(result)`` is :meth:`table`."""

    artifact: Artifact
    requests: list[EditRequest]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]
    seconds: float = 0.0

    @property
    def steps(self) -> list[str]:
        """What the run did, one line per step (``loka.update``)."""
        return self.artifact.steps

    @property
    def by_set(self) -> bool:
        """Whether the rows are per set (forget/retain present, or ``unlearn``/``update``)."""
        return any("set" in r for r in self.before)

    def summary(self) -> dict[str, dict]:
        """Per set (rows per set only): size and mean ``p_norm``/``em`` before and after."""
        names = dict.fromkeys(r["set"] for r in self.before if "set" in r)
        pick = lambda rows, n: [r for r in rows if r.get("set") == n]  # noqa: E731
        return {n: set_summary(pick(self.before, n), pick(self.after, n)) for n in names}

    def table(self) -> str:
        """The table the CLI prints: per edit, each prompt's top answer and P(new) before and after;
        per set (after the steps of a two-step update), mean P̄ and exact match before and after."""
        if self.by_set:
            return "\n".join([*self.steps, sets_table(self.summary())])
        tables = []
        for i, req in enumerate(self.requests):
            of = lambda rows: [r for r in rows if r["request"] == i]  # noqa: B023, E731
            tables.append(format_table(req, of(self.before), of(self.after)))
        return "\n\n".join(tables)

    def __str__(self) -> str:
        return self.table()


def measure(handle: ModelHandle, batch: UpdateBatch, by_set: bool) -> list[dict]:
    """The rows of :class:`EditResult` for ``batch`` on the model as it is now."""
    if by_set:
        return set_rows(handle, batch)
    return [{"request": i, **row} for i, r in enumerate(batch) for row in probe_rows(handle, r)]
