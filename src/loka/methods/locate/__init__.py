"""Shared machinery of locate-and-edit methods (ROME, MEMIT and their descendants).

* :func:`build_prompts` — every request × context template, right-padded into one batch, with the
  subject's last token (ROME's ``subject_last``) and the target positions of each row.
* :class:`Replay` — one no-grad forward records the input of block ``l`` and the keyword arguments
  (masks, rotary embeddings) of every block above; later forwards re-run only blocks ``l..L-1`` and
  unembed only the positions the loss reads. Exact: the lower layers do not depend on ``δ``.
* :func:`optimize_values` — ROME's ``compute_v`` / MEMIT's ``compute_z`` for many requests at
  once: ``δ_i`` added at the subject's last token, Adam on
  ``NLL(o* | ctx ⊕ p(s)) + kl_factor·KL(p_δ ‖ p_0) + wd·‖δ‖/‖v_0‖²`` with the norm clamp
  ``‖δ‖ ≤ clamp·‖v_0‖`` (ROME Eq. 4). Stops early once every request's target NLL is below
  ``early_stop_loss`` (ROME tests the total loss, whose decay term alone can stay above it).
"""

from __future__ import annotations

from .grouping import (
    GROUP_COST_COLUMNS,
    GROUP_MIN_REQUESTS,
    GROUPINGS,
    KL_GROUP_MIN_REQUESTS,
    suffix_buckets,
    suffix_len,
)
from .prompts import (
    PromptBatch,
    build_prompts,
    mean_over_templates,
    module_io_at_lookup,
    prompt_forward,
    target_ids,
    tree_batch,
)
from .replay import Replay
from .values import ValueResult, optimize_values

__all__ = [
    "prompt_forward",
    "suffix_len",
    "GROUP_COST_COLUMNS",
    "GROUP_MIN_REQUESTS",
    "GROUPINGS",
    "KL_GROUP_MIN_REQUESTS",
    "PromptBatch",
    "Replay",
    "ValueResult",
    "build_prompts",
    "mean_over_templates",
    "module_io_at_lookup",
    "optimize_values",
    "suffix_buckets",
    "target_ids",
    "tree_batch",
]
