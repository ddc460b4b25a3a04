"""How the value search splits a chunk of requests into row groups that pad little."""

from __future__ import annotations

from collections.abc import Sequence

from ...requests import EditRequest, fill_subject, subject_last_token
from .prompts import target_ids

GROUPINGS = ("auto", "suffix", "template", "kl", "none")

#: ``v_grouping="auto"`` groups a chunk of at least this many requests by suffix length ("suffix");
#: with fewer, several small replays cost more than the padding they save (a single ROME edit ran
#: 3–4× slower grouped). Chunks of at least ``KL_GROUP_MIN_REQUESTS`` get two groups ("kl"): all
#: template rows, and the KL rows, which are cut after the subject and would otherwise be padded to
#: the longest prompt + target (MEMIT, 10 requests, alternating runs: 36.8 -> 34.0 s; 4 requests:
#: 17.7 -> 19.4 s and a single ROME request 4.3 -> 6.0 s, hence the floor).
GROUP_MIN_REQUESTS = 16
KL_GROUP_MIN_REQUESTS = 8

#: What one more row group costs per optimisation step, in replayed token columns: the group's
#: forward and backward read every weight of the blocks above the edit layer and the unembedding
#: once more however few rows it has. Measured on SmolLM2 (2 cores): a step costs about 0.16 s per
#: group with one active request and 2.7 ms per token column (forward + backward).
GROUP_COST_COLUMNS = 64


def suffix_buckets(
    lengths: Sequence[int], rows_per_request: int, group_cost: int | None = None
) -> list[list[int]]:
    """Split requests into groups by replayed suffix length, minimising the replayed columns.

    A group pads every row to its longest suffix; each group also costs ``group_cost`` columns.
    Exact dynamic programme over the lengths in sorted order (the optimal groups are contiguous
    there): ``best[j] = min_i best[i] + group_cost + rows_per_request · (j − i) · len_(j)``.
    Returns lists of request indices, shortest suffixes first.
    """
    group_cost = GROUP_COST_COLUMNS if group_cost is None else group_cost
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ls = [lengths[i] for i in order]
    best, cut = [0.0] + [float("inf")] * len(ls), [0] * (len(ls) + 1)
    for j in range(1, len(ls) + 1):
        for i in range(j):
            c = best[i] + group_cost + rows_per_request * (j - i) * ls[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(ls)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def suffix_len(tokenizer, req: EditRequest) -> int:
    """Tokens after the subject's last token in the prompt plus the target's: a row's replayed width."""
    li = subject_last_token(tokenizer, req.prompt, req.subject)
    n = len(tokenizer(fill_subject(req.prompt, req.subject))["input_ids"])
    return n - li - 1 + len(target_ids(tokenizer, req.target_new))
