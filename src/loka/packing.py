"""Token trees: many token sequences packed into one row with tree attention.

Every sequence is inserted into a trie of token prefixes; a node is one column of the packed row,
sits at position ``depth`` and attends to its ancestors only. A node's hidden states depend on its
prefix alone, so a prefix that several sequences share (a context template, a relation template,
the first tokens of two targets) runs once, and each sequence still gets exactly the states a
forward of its own would give. Used by scoring (:mod:`loka.scoring`) and by the key forwards of
MEMIT's update phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TreePack:
    """Packed rows (B, W) of token trees; ``node[(g, prefix)]`` is the (row, column) of a node."""

    input_ids: torch.Tensor  # (B, W)
    position_ids: torch.Tensor  # (B, W): the depth of each node
    allowed: torch.Tensor  # (B, W, W) bool: column j is an ancestor of (or is) column i
    node: dict[tuple, tuple[int, int]]
    share: bool = True

    def at(self, group: int, prefix: Sequence[int]) -> tuple[int, int]:
        """(row, column) of the node that ends ``prefix`` of a sequence of ``group``."""
        return self.node[self.key(group, tuple(prefix))]

    def path(self, group: int, seq: Sequence[int]) -> list[tuple[int, int]]:
        """(row, column) of every node of ``seq`` in order: where each of its tokens' states are."""
        return [self.at(group, seq[: i + 1]) for i in range(len(seq))]

    def key(self, group: int, prefix: tuple[int, ...]) -> tuple:
        return prefix if self.share else (group, prefix)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive (B, 1, W, W) mask a Hugging Face model takes in place of a padding mask."""
        from .hf_compat import additive_mask

        return additive_mask(self.allowed, dtype)

    @property
    def n_nodes(self) -> int:
        return len(self.node)


def within_window(config, depth: int) -> bool:
    """A tree mask replaces the model's own masks, sliding-window ones included: usable only while
    no sequence is deeper than the window (``depth`` tokens)."""
    window = getattr(config, "sliding_window", None)
    return not window or depth <= window


def pack_trees(
    groups: Sequence[Sequence[Sequence[int]]], max_len: int = 1024, pad_id: int = 0, share: bool = True
) -> TreePack:
    """Pack groups of token sequences (a group stays in one row) into rows of at most ``max_len``
    nodes, opening a new row when the next group's new nodes would not fit. ``share=False`` keeps
    one tree per group (no sharing across groups)."""
    rows: list[dict[tuple, int]] = [{}]  # node key -> column, parents inserted before children
    keys: list[list[tuple[int, tuple[int, ...]]]] = [[]]  # per row: (group, prefix) in column order

    def key(g: int, pre: tuple[int, ...]) -> tuple:
        return pre if share else (g, pre)

    for g, seqs in enumerate(groups):
        new = {tuple(s[:i]) for s in seqs for i in range(1, len(s) + 1)}
        fresh = [p for p in new if key(g, p) not in rows[-1]]
        if rows[-1] and len(rows[-1]) + len(fresh) > max_len:
            rows.append({})
            keys.append([])
            fresh = list(new)
        for pre in sorted(fresh, key=len):
            rows[-1][key(g, pre)] = len(rows[-1])
            keys[-1].append((g, pre))
    width, B = max(1, max(len(r) for r in rows)), len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(B, 1, 1)  # padding columns see themselves only
    node: dict[tuple, tuple[int, int]] = {}
    for b, (cols, order) in enumerate(zip(rows, keys)):
        for g, pre in order:
            c = cols[key(g, pre)]
            ids[b, c], pos[b, c] = pre[-1], len(pre) - 1
            if len(pre) > 1:  # the parent's ancestors, and the parent
                allowed[b, c] |= allowed[b, cols[key(g, pre[:-1])]]
            node[key(g, pre)] = (b, c)
    return TreePack(ids, pos, allowed, node, share)
