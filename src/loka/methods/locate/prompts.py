"""The prompts of locate-and-edit methods: every request × context template, right-padded into one
batch, with the subject's last token (ROME's ``subject_last``) and the target positions of each row;
the forwards that read keys and values at those tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import RequestError
from ...packing import pack_trees
from ...requests import EditRequest, fill_subject, subject_last_token
from ...trace import capture, run_until_stopped

if TYPE_CHECKING:
    from ...models.loader import ModelHandle


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target answer, with the leading space ROME adds when missing."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestError(f"target {target!r} tokenises to nothing")
    return ids


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T)
    lookup: torch.Tensor  # (B,) index of the subject's last token
    owner: torch.Tensor  # (B,) request index of each row
    is_kl: torch.Tensor  # (B,) bool: row is a KL ("{} is a") prompt
    template: torch.Tensor  # (B,) context-template index (-1 for KL rows)
    tgt_rows: torch.Tensor  # (N,) rows of every target token
    tgt_cols: torch.Tensor  # (N,) positions whose logits predict it
    tgt_tokens: torch.Tensor  # (N,) the token ids
    position_ids: torch.Tensor | None = None  # (B, T) positions of real tokens (left padding aware)
    split: int | None = None  # with aligned rows: every row's subject ends at column ``split``
    rows: torch.Tensor | None = None  # token-tree batches: the packed input row holding each prompt

    def __len__(self) -> int:
        return len(self.lookup)

    @property
    def row_index(self) -> torch.Tensor:
        """The input row of each prompt: itself, or its packed row in a token-tree batch."""
        return torch.arange(len(self)) if self.rows is None else self.rows


def answer_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, ignore: int
) -> PromptBatch:
    """A :class:`PromptBatch` whose targets are the answer tokens of right-padded question–answer rows
    (``labels`` as :func:`loka.forgetting.losses.qa_batch` makes them): no subject lookup, no KL rows,
    for methods that train at the answer positions through a :class:`~.replay.Replay`."""
    pos = (labels != ignore).nonzero()
    zeros = torch.zeros(len(input_ids), dtype=torch.long)
    return PromptBatch(
        input_ids,
        attention_mask,
        zeros,
        zeros,
        zeros.bool(),
        zeros,
        pos[:, 0],
        pos[:, 1],
        labels[pos[:, 0], pos[:, 1]],
    )


def tree_batch(batch: PromptBatch, pad_id: int, dtype: torch.dtype, max_len: int = 512) -> PromptBatch:
    """A keys-only batch (rows ending at the subject, no targets) packed as token trees
    (:mod:`loka.packing`): the prefixes rows share — a context template, a relation's words before
    the subject — run once. The states at each ``lookup`` equal those of the padded batch. Packs of
    at most ``max_len`` nodes keep the dense attention mask small against the matmuls."""
    seqs = [batch.input_ids[r, batch.attention_mask[r].bool()].tolist() for r in range(len(batch))]
    if any(int(batch.lookup[r]) != len(s) - 1 for r, s in enumerate(seqs)):
        raise ValueError(
            "tree_batch needs rows that end at the subject's last token, without padding on the left"
        )
    order = sorted(range(len(seqs)), key=lambda r: seqs[r])  # neighbours share the longest prefixes
    tree = pack_trees([[seqs[r]] for r in order], max_len, pad_id)
    where = torch.tensor([tree.at(0, seqs[r]) for r in range(len(seqs))], dtype=torch.long).reshape(-1, 2)
    return PromptBatch(
        tree.input_ids,
        tree.attention_mask(dtype),
        where[:, 1],
        batch.owner,
        batch.is_kl,
        batch.template,
        batch.tgt_rows,
        batch.tgt_cols,
        batch.tgt_tokens,
        tree.position_ids,
        None,
        where[:, 0],
    )


def build_prompts(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    *,
    with_targets: bool = True,
    kl_prompts: Sequence[str] = ("{} is a",),
    align: bool = False,
) -> PromptBatch:
    """Right-padded rows; with ``align=True`` rows are also left-padded so that every subject's last
    token sits in the same column (``split``): all columns before it are then independent of δ.
    ``with_targets=False`` (keys only) ends every row at the subject's last token."""
    tok = handle.tokenizer
    rows: list[list[int]] = []
    lookup, owner, is_kl, tmpl, tr, tc, tt = [], [], [], [], [], [], []
    for i, req in enumerate(requests):
        tids = target_ids(tok, req.target_new)
        for j, ctx in enumerate(templates):
            text_t = ctx.replace("{}", req.prompt)
            li = subject_last_token(tok, text_t, req.subject)
            ids = tok(fill_subject(text_t, req.subject))["input_ids"]
            if with_targets:
                n = len(ids)
                for k, t in enumerate(tids):
                    tr.append(len(rows))
                    tc.append(n - 1 + k)
                    tt.append(t)
                ids = ids + tids[:-1]
            else:  # keys only: nothing after the subject's last token is read, and causal rows do not need it
                ids = ids[: li + 1]
            rows.append(ids)
            lookup.append(li)
            owner.append(i)
            is_kl.append(False)
            tmpl.append(j)
        for kp in kl_prompts:  # only the subject's last token is ever read: later tokens are cut
            li = subject_last_token(tok, kp, req.subject)
            rows.append(tok(fill_subject(kp, req.subject))["input_ids"][: li + 1])
            lookup.append(li)
            owner.append(i)
            is_kl.append(True)
            tmpl.append(-1)
    split = max(lookup) if align else None
    offset = [split - li for li in lookup] if align else [0] * len(rows)
    width = max(o + len(r) for o, r in zip(offset, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (o, seq) in enumerate(zip(offset, rows)):
        ids[r, o : o + len(seq)] = torch.tensor(seq)
        mask[r, o : o + len(seq)] = 1
    as_t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)  # noqa: E731
    off = as_t(offset)
    lookup_t = as_t(lookup) + off
    tr_t = as_t(tr)
    tc_t = as_t(tc) + (off[tr_t] if len(tr) else 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return PromptBatch(
        ids,
        mask,
        lookup_t,
        as_t(owner),
        as_t(is_kl, torch.bool),
        as_t(tmpl),
        tr_t,
        tc_t,
        as_t(tt),
        pos,
        split,
    )


def prompt_forward(handle: ModelHandle, batch: PromptBatch, **kw):
    dev = handle.device
    extra = {"position_ids": batch.position_ids.to(dev)} if batch.position_ids is not None else {}
    return handle.model(
        input_ids=batch.input_ids.to(dev),
        attention_mask=batch.attention_mask.to(dev),
        use_cache=False,
        **extra,
        **kw,
    )


@torch.no_grad()
def module_io_at_lookup(
    handle: ModelHandle,
    batch: PromptBatch,
    layers: Sequence[int],
    stop_layer: int | None = None,
    block_out_layer: int | None = None,
) -> dict:
    """Keys (inputs of each layer's rewritten matrix) and outputs at the lookup tokens, one forward.

    Returns ``{"keys": {layer: (B, d_in)}, "values": {layer: (B, d_out)}, "block_out": (B, d) | None}``.
    """
    paths = [handle.spec.mlp_out_path(layer) for layer in layers]
    top = max([*layers, *([block_out_layer] if block_out_layer is not None else [])])
    extra = [handle.spec.block_path(block_out_layer)] if block_out_layer is not None else []
    stop = handle.spec.block_path(stop_layer if stop_layer is not None else top)
    rows = batch.row_index
    with capture(handle.model, paths + extra, stop_after=stop) as rec:
        run_until_stopped(lambda: prompt_forward(handle, batch))
    keys = {layer: rec[p].input[rows, batch.lookup] for layer, p in zip(layers, paths)}
    vals = {layer: rec[p].output[rows, batch.lookup] for layer, p in zip(layers, paths)}
    bo = rec[extra[0]].output[rows, batch.lookup] if extra else None
    return {"keys": keys, "values": vals, "block_out": bo}


def mean_over_templates(x: torch.Tensor, batch: PromptBatch, n_requests: int) -> torch.Tensor:
    """Average rows of ``x`` (B, d) over the non-KL rows of each request -> (n_requests, d)."""
    sel = ~batch.is_kl
    out = torch.zeros(n_requests, x.shape[1], dtype=x.dtype)
    cnt = torch.zeros(n_requests, dtype=x.dtype)
    out.index_add_(0, batch.owner[sel], x[sel])
    cnt.index_add_(0, batch.owner[sel], torch.ones(int(sel.sum()), dtype=x.dtype))
    return out / cnt[:, None]
