"""Replay: re-run the model from block ``l`` upwards with the recorded inputs of a reference forward.

One no-grad forward records the input of block ``l`` and the keyword arguments (masks, rotary
embeddings) of every block above; later forwards re-run only blocks ``l..L-1`` and unembed only the
positions the loss reads. Exact: the lower layers do not depend on ``δ``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ...hf_compat import (
    cache_out,
    crop_cache,
    gather_cache,
    plain_cache,
    same_block_inputs,
    select_cache_rows,
    with_cache,
)
from ...packing import pack_trees, within_window
from ...trace import block_output, capture, run_until_stopped
from .prompts import PromptBatch, prompt_forward

if TYPE_CHECKING:
    from ...models.loader import ModelHandle

log = logging.getLogger(__name__)


class Replay:
    """Re-run the model from block ``start`` upwards with the recorded inputs of a reference forward.

    With an aligned batch (``batch.split``), the columns before the subject's last token are run
    once into a key/value cache and each replay recomputes only the columns from ``split`` on — they
    are the only ones δ can change. Falls back to full rows where a cache cannot be cropped.
    """

    def __init__(
        self,
        handle: ModelHandle,
        batch: PromptBatch,
        start: int,
        probes: Sequence[str] = (),
        end: int | None = None,
        prefix_tree: bool = True,
    ):
        """``probes``: module paths whose input and output at the subject's last token are recorded
        during the reference forward (``self.probe_in`` / ``self.probe_out``, each (B, d)).
        ``end``: the last block to record (default: all); with it the reference forward stops there
        and only :meth:`run_blocks` can be used (no logits). ``prefix_tree``: run the columns before
        ``split`` as token trees (:meth:`_prefix_cache`); ``False``: as the padded rows."""
        self.handle, self.batch, self.start = handle, batch, start
        self.prefix_tree = prefix_tree
        self.probes = list(probes)
        spec = handle.spec
        last = handle.n_layers - 1 if end is None else end
        self.blocks = [handle.block(i) for i in range(start, last + 1)]
        paths = [spec.block_path(i) for i in range(start, last + 1)]
        stop = spec.final_norm if end is None else spec.block_path(end)
        self.split, self.cache = None, None
        self.prefix_packed = False  # the prefix ran as token trees (:meth:`_prefix_cache`)
        if batch.split and end is None:
            try:
                self._capture_suffix(paths)
            except Exception as e:  # an architecture whose cache cannot be reused this way
                log.debug("suffix replay unavailable (%s); replaying full rows", e)
                self.split, self.cache = None, None
        if self.split is None:
            with (
                torch.no_grad(),
                capture(handle.model, paths, outputs=False, kwargs=True, stop_after=stop) as rec,
                capture(handle.model, self.probes) as probe,
            ):
                run_until_stopped(lambda: prompt_forward(handle, batch))
            self._store(rec, paths)
            self._store_probes(probe, batch.row_index, batch.lookup)
        self.norm = handle.module(spec.final_norm)
        self.unembed = handle.module(spec.unembed)
        self.softcap = getattr(handle.config, "final_logit_softcapping", None)

    def _store(self, rec, paths, same: bool = False) -> None:
        """The input of the first block and every block's other arguments (``same``: the first
        block's, for all)."""
        self.h0 = rec[paths[0]].input
        self.calls = []
        for p in paths:
            kw = dict(rec[paths[0] if same else p].kwargs)
            args = kw.pop("__args__", ())
            kw.pop("hidden_states", None)
            self.calls.append((args, kw))

    def _store_probes(self, rec, rows, cols) -> None:
        self.probe_in = {p: rec[p].input[rows, cols] for p in self.probes}
        self.probe_out = {p: rec[p].output[rows, cols] for p in self.probes}

    def _reset_cache(self) -> None:
        crop_cache(self.cache, self.split)

    def _capture_suffix(self, paths) -> None:
        """The prefix into a cache (:meth:`_prefix_cache`), then the suffix columns up to the blocks
        whose inputs a replay needs. Where every block takes the same keyword arguments
        (:func:`~loka.hf_compat.same_block_inputs`) the suffix forward stops after block ``start``:
        the blocks above would be recomputed by every replay anyway."""
        b, s, dev = self.batch, self.batch.split, self.handle.device
        model = self.handle.model
        same = same_block_inputs(self.handle.config)
        stop = paths[0] if same else self.handle.spec.final_norm
        with torch.no_grad():
            cache = self._prefix_cache()
            with (
                capture(model, self.probes) as probe,  # first: its hooks run before the stop
                capture(
                    model, paths[:1] if same else paths, outputs=False, kwargs=True, stop_after=stop
                ) as rec,
            ):
                run_until_stopped(
                    lambda: model(
                        input_ids=b.input_ids[:, s:].to(dev),
                        attention_mask=b.attention_mask.to(dev),
                        position_ids=b.position_ids[:, s:].to(dev),
                        use_cache=True,
                        **with_cache(model, cache),
                    )
                )
        self.split, self.cache = s, cache
        self._reset_cache()
        self._store(rec, paths, same)
        self._store_probes(
            probe, torch.arange(len(b)), torch.zeros(len(b), dtype=torch.long)
        )  # lookup = column 0

    def _prefix_cache(self):
        """The keys and values of every row's columns before ``split``, as one KV cache.

        The prefixes run as token trees (:mod:`loka.packing`): a context template that a hundred
        requests share, or a relation's words before the subject, runs once instead of once per
        row, and no column is spent on padding (packs of 256 nodes: wider ones spend more on the dense
        tree mask than they share); the tree's cache is then laid out as the padded
        rows (:func:`~loka.hf_compat.gather_cache`). Where that cannot be done (a model whose cache is
        not a plain one, such as Gemma's sliding-window layers; a tree deeper than the window) the
        padded prefix runs as it is."""
        b, s, handle = self.batch, self.batch.split, self.handle
        model, dev = handle.model, handle.device
        real = b.attention_mask[:, :s].bool()
        seqs = [b.input_ids[r, :s][real[r]].tolist() for r in range(len(b))]
        cache = (
            plain_cache(model) if self.prefix_tree and within_window(handle.config, s) and any(seqs) else None
        )
        if cache is not None:
            tree = pack_trees([[q] for q in sorted(seqs)], 256, handle.tokenizer.pad_token_id or 0)
            model(
                input_ids=tree.input_ids.to(dev),
                attention_mask=tree.attention_mask(next(model.parameters()).dtype).to(dev),
                position_ids=tree.position_ids.to(dev),
                use_cache=True,
                logits_to_keep=1,
                **with_cache(model, cache),
            )
            rows = torch.zeros((len(b), s), dtype=torch.long)
            cols = torch.zeros((len(b), s), dtype=torch.long)
            for r, q in enumerate(seqs):  # row r's prefix sits right-aligned before ``split``
                if q:
                    rows[r, s - len(q) :], cols[r, s - len(q) :] = torch.tensor(tree.path(0, q)).T
            gather_cache(cache, rows.to(dev), cols.to(dev))
            self.prefix_packed = True
            return cache
        out = model(
            input_ids=b.input_ids[:, :s].to(dev),
            attention_mask=b.attention_mask[:, :s].to(dev),
            position_ids=b.position_ids[:, :s].to(dev),
            use_cache=True,
            logits_to_keep=1,
        )
        return cache_out(out)

    def subset(self, keep: torch.Tensor) -> Replay:
        """The same replay restricted to batch rows ``keep`` (tensors of batch size are sliced)."""
        B = self.h0.shape[0]

        def cut(x):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == B and B > 1:
                return x[keep]
            if isinstance(x, tuple):
                return tuple(cut(y) for y in x)
            return x

        new = object.__new__(Replay)
        new.__dict__.update(self.__dict__)
        new.h0 = self.h0[keep]
        if self.cache is not None:
            self._reset_cache()  # back to the (detached) prefix before copying
            cache = copy.deepcopy(self.cache)
            select_cache_rows(cache, keep)
            new.cache = cache
            swap = lambda x: cache if x is self.cache else cut(x)  # noqa: E731
        else:
            swap = cut
        new.calls = [
            (tuple(swap(a) for a in args), {k: swap(v) for k, v in kw.items()}) for args, kw in self.calls
        ]
        return new

    def run_blocks(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The residual stream after block ``last``, from ``h`` = the input of block ``first``;
        hooks on modules inside the blocks fire as in a normal forward. Called directly only on
        full-row replays (a suffix replay's cache is reset by :meth:`logits_at`)."""
        for i in range(first, last + 1):
            args, kw = self.calls[i - self.start]
            h = block_output(self.blocks[i - self.start](h, *args, **kw))
        return h

    def logits_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits at (row, column) positions of the batch (columns as in the full rows)."""
        if self.cache is not None:
            self._reset_cache()  # drop the suffix keys/values of the previous replay
            cols = cols - self.split
        h = self.run_blocks(self.h0, self.start, self.start + len(self.blocks) - 1)
        logits = self.unembed(self.norm(h[rows, cols]))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


class _ActiveView:
    """The rows of a :class:`PromptBatch` that belong to requests still being optimised, re-indexed."""

    def __init__(self, batch: PromptBatch, replay: Replay, active: torch.Tensor, all_kl_rows: torch.Tensor):
        keep = active[batch.owner].nonzero().squeeze(1)
        new_index = torch.full((len(batch),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        self.n_rows = len(keep)
        self.replay = replay if len(keep) == len(batch) else replay.subset(keep)
        self.owner = batch.owner[keep]
        # δ goes in at the subject's last token; a suffix replay's columns start at ``split``
        self.positions = torch.stack([torch.arange(len(keep)), batch.lookup[keep] - (replay.split or 0)], 1)
        t_keep = new_index[batch.tgt_rows] >= 0
        self.tgt_rows = new_index[batch.tgt_rows[t_keep]]
        self.tgt_tokens = batch.tgt_tokens[t_keep]
        tgt_cols = batch.tgt_cols[t_keep]
        kl_keep = new_index[all_kl_rows] >= 0
        self.kl_index = kl_keep.nonzero().squeeze(1)  # which of the reference KL rows remain
        self.kl_rows = new_index[all_kl_rows[kl_keep]]
        kl_cols = batch.lookup[all_kl_rows[kl_keep]]
        self.row_ntok = torch.zeros(len(keep)).index_add_(0, self.tgt_rows, torch.ones(len(self.tgt_rows)))
        self.read_rows = torch.cat([self.tgt_rows, self.kl_rows])
        self.read_cols = torch.cat([tgt_cols, kl_cols])
