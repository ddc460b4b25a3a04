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

import contextlib
import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LokaError, RequestError
from ..fastlinear import packed_linears
from ..hf_compat import cache_out, crop_cache, select_cache_rows, with_cache
from ..packing import pack_trees
from ..requests import EditRequest, subject_last_token
from ..trace import add_at_positions, block_output, capture, run_until_stopped

log = logging.getLogger(__name__)


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
    handle,
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
            ids = tok(text_t.replace("{}", req.subject))["input_ids"]
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
            rows.append(tok(kp.replace("{}", req.subject))["input_ids"][: li + 1])
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


def _forward(handle, batch: PromptBatch, **kw):
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
    handle,
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
        run_until_stopped(lambda: _forward(handle, batch))
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


class Replay:
    """Re-run the model from block ``start`` upwards with the recorded inputs of a reference forward.

    With an aligned batch (``batch.split``), the columns before the subject's last token are run
    once into a key/value cache and each replay recomputes only the columns from ``split`` on — they
    are the only ones δ can change. Falls back to full rows where a cache cannot be cropped.
    """

    def __init__(
        self, handle, batch: PromptBatch, start: int, probes: Sequence[str] = (), end: int | None = None
    ):
        """``probes``: module paths whose input and output at the subject's last token are recorded
        during the reference forward (``self.probe_in`` / ``self.probe_out``, each (B, d)).
        ``end``: the last block to record (default: all); with it the reference forward stops there
        and only :meth:`run_blocks` can be used (no logits)."""
        self.handle, self.batch, self.start = handle, batch, start
        self.probes = list(probes)
        spec = handle.spec
        last = handle.n_layers - 1 if end is None else end
        self.blocks = [handle.block(i) for i in range(start, last + 1)]
        paths = [spec.block_path(i) for i in range(start, last + 1)]
        stop = spec.final_norm if end is None else spec.block_path(end)
        self.split, self.cache = None, None
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
                run_until_stopped(lambda: _forward(handle, batch))
            self._store(rec, paths)
            self._store_probes(probe, batch.row_index, batch.lookup)
        self.norm = handle.module(spec.final_norm)
        self.unembed = handle.module(spec.unembed)
        self.softcap = getattr(handle.config, "final_logit_softcapping", None)

    def _store(self, rec, paths) -> None:
        self.h0 = rec[paths[0]].input
        self.calls = []
        for p in paths:
            kw = dict(rec[p].kwargs)
            args = kw.pop("__args__", ())
            kw.pop("hidden_states", None)
            self.calls.append((args, kw))

    def _store_probes(self, rec, rows, cols) -> None:
        self.probe_in = {p: rec[p].input[rows, cols] for p in self.probes}
        self.probe_out = {p: rec[p].output[rows, cols] for p in self.probes}

    def _reset_cache(self) -> None:
        crop_cache(self.cache, self.split)

    def _capture_suffix(self, paths) -> None:
        b, s, dev = self.batch, self.batch.split, self.handle.device
        model = self.handle.model
        with torch.no_grad():
            out = model(
                input_ids=b.input_ids[:, :s].to(dev),
                attention_mask=b.attention_mask[:, :s].to(dev),
                position_ids=b.position_ids[:, :s].to(dev),
                use_cache=True,
                logits_to_keep=1,
            )
            cache = cache_out(out)
            with (
                capture(
                    model, paths, outputs=False, kwargs=True, stop_after=self.handle.spec.final_norm
                ) as rec,
                capture(model, self.probes) as probe,
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
        self._store(rec, paths)
        self._store_probes(
            probe, torch.arange(len(b)), torch.zeros(len(b), dtype=torch.long)
        )  # lookup = column 0

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


@dataclass
class ValueResult:
    targets: torch.Tensor  # (n, d) optimised values v* = v_0 + δ
    init: torch.Tensor  # (n, d) original values v_0 at the plain prompt
    keys: torch.Tensor  # (n, d_in) keys of ``key_layer`` averaged over templates (k*)
    plain_keys: torch.Tensor  # (n, d_in) keys at the plain prompt
    nll: list[float]  # final NLL of the target per request
    steps: int
    timings: dict = None  # seconds: "keys" (reference forwards), "values" (optimisation)


def optimize_values(
    handle,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    hp,
    *,
    where: str = "mlp_out",
    key_layer: int | None = None,
    progress=None,
) -> ValueResult:
    """Optimise one vector per request so that the target becomes likely (see module docstring).

    ``where="mlp_out"``: δ is added to the output of ``layer``'s rewritten matrix (ROME);
    ``where="block_out"``: to the residual stream after block ``layer`` (MEMIT's ``z``).
    Requests are processed ``hp.v_batch_size`` at a time; each chunk shares its forward passes.
    """
    key_layer = layer if key_layer is None else key_layer
    grouping = getattr(hp, "v_grouping", "auto")
    if grouping not in GROUPINGS:
        raise LokaError(
            f"hyperparameter v_grouping must be one of {', '.join(map(repr, GROUPINGS))}, got {grouping!r}"
        )
    order = list(range(len(requests)))
    lens = [_suffix_len(handle.tokenizer, r) for r in requests] if grouping != "none" else None
    if lens is not None:  # chunks of requests with similar suffix lengths pad less
        order.sort(key=lambda i: lens[i])
    chunks = [order[i : i + hp.v_batch_size] for i in range(0, len(order), hp.v_batch_size)]
    outs = []
    _search_precision(handle, hp)  # a wrong v_dtype fails before any forward
    with packed_linears(handle).active(handle.model, grad=True):  # prepacked frozen weights for the search
        for idx in chunks:
            chunk = [requests[i] for i in idx]
            mode = (
                grouping
                if grouping != "auto"
                else (
                    "suffix"
                    if len(idx) >= GROUP_MIN_REQUESTS
                    else "kl"
                    if len(idx) >= KL_GROUP_MIN_REQUESTS
                    else "none"
                )
            )
            if mode == "none":
                outs.append(_optimize_chunk(handle, chunk, layer, templates, hp, where, key_layer))
            else:
                outs.append(
                    _optimize_grouped(
                        handle,
                        chunk,
                        layer,
                        templates,
                        hp,
                        where,
                        key_layer,
                        mode=mode,
                        suffix_lens=[lens[i] for i in idx] if lens else None,
                    )
                )
            if progress is not None:
                progress.update(len(idx))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # chunk order -> request order
    cat = lambda name: torch.cat([getattr(o, name) for o in outs])[back]  # noqa: E731
    nll = [x for o in outs for x in o.nll]
    return ValueResult(
        targets=cat("targets"),
        init=cat("init"),
        keys=cat("keys"),
        plain_keys=cat("plain_keys"),
        nll=[nll[int(i)] for i in back],
        steps=max(o.steps for o in outs),
        timings={k: sum(o.timings[k] for o in outs) for k in ("keys", "values")},
    )


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


def _suffix_len(tokenizer, req: EditRequest) -> int:
    """Tokens after the subject's last token in the prompt plus the target's: a row's replayed width."""
    li = subject_last_token(tokenizer, req.prompt, req.subject)
    n = len(tokenizer(req.prompt.replace("{}", req.subject))["input_ids"])
    return n - li - 1 + len(target_ids(tokenizer, req.target_new))


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


def _search_precision(handle, hp):
    """The precision of the value search's forwards: ``hp.v_dtype`` "float32" (default) or
    "bfloat16".

    bfloat16 runs the matmuls on bfloat16 copies of the packed weights (activations cast for the
    product only; norms, attention and the residual stream stay float32: ~1.9× per matmul on CPUs
    with AVX-512 BF16), or under ``torch.autocast`` where packed weights are not in use. The
    reference keys and values and every solve stay float32/float64 either way.
    """
    dt = getattr(hp, "v_dtype", "float32")
    if dt not in ("float32", "bfloat16"):
        raise LokaError(f"hyperparameter v_dtype must be 'float32' or 'bfloat16', got {dt!r}")
    if dt == "float32":
        return contextlib.nullcontext()
    packed = packed_linears(handle)
    if packed.on and packed.supports(torch.bfloat16):
        return packed.compute(torch.bfloat16)
    return torch.autocast(handle.device.type, dtype=torch.bfloat16)


@torch.no_grad()
def _project(delta: torch.Tensor, max_norm: torch.Tensor, active: torch.Tensor, frozen: torch.Tensor) -> None:
    """After an Adam step: clamp ``‖δ_i‖ ≤ clamp · ‖v_0,i‖`` (ROME Eq. 4) and pin finished requests
    (Adam's momentum must not move them)."""
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
    delta.mul_(scale[:, None])
    delta[~active] = frozen[~active]


def _result(delta, v0, k_star, k_plain, nll_final, steps, t0, t1) -> ValueResult:
    if not torch.isfinite(delta).all():
        raise FloatingPointError("value optimisation produced a non-finite vector; lower v_lr")
    return ValueResult(
        v0 + delta.detach(),
        v0,
        k_star,
        k_plain,
        [float(x) for x in nll_final],
        steps,
        {"keys": t1 - t0, "values": time.perf_counter() - t1},
    )


def _optimize_chunk(handle, requests, layer, templates, hp, where, key_layer) -> ValueResult:
    n = len(requests)
    t0 = time.perf_counter()
    batch = build_prompts(handle, requests, templates, align=True)
    hook_mod = handle.mlp_out(layer) if where == "mlp_out" else handle.block(layer)
    # one reference forward: keys and values at the lookup tokens, and what the replay needs
    key_path, val_path = (
        handle.spec.mlp_out_path(key_layer),
        (handle.spec.mlp_out_path(layer) if where == "mlp_out" else handle.spec.block_path(layer)),
    )
    replay = Replay(handle, batch, layer, probes=[key_path, val_path])
    plain = (batch.template == 0).nonzero().squeeze(1)  # rows of the bare "{}" template, one per request
    v0 = replay.probe_out[val_path][plain]
    keys_all = replay.probe_in[key_path]
    k_star = mean_over_templates(keys_all, batch, n)
    k_plain = keys_all[plain]

    kl_rows = batch.is_kl.nonzero().squeeze(1)  # one "{} is a" row per request, in request order
    kl_cols = batch.lookup[kl_rows]
    with torch.no_grad():
        with _search_precision(handle, hp):
            kl_ref = F.log_softmax(replay.logits_at(kl_rows, kl_cols), dim=-1)

    t1 = time.perf_counter()
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    # prompts per request, to average NLL per prompt then per request
    prompts_per_req = torch.zeros(n).index_add_(
        0, batch.owner[~batch.is_kl], torch.ones(int((~batch.is_kl).sum()))
    )
    nll_final = torch.full((n,), float("nan"))
    active = torch.ones(n, dtype=torch.bool)
    frozen = torch.zeros_like(v0)
    steps = 0
    view = None
    for step in range(hp.v_steps):
        if view is None:  # (re)build the forward over the rows of requests still optimising
            view = _ActiveView(batch, replay, active, kl_rows)
        steps = step + 1
        with add_at_positions(hook_mod, delta[view.owner], view.positions), _search_precision(handle, hp):
            logits = view.replay.logits_at(view.read_rows, view.read_cols)
        nt = len(view.tgt_tokens)
        tok_nll = F.cross_entropy(logits[:nt].float(), view.tgt_tokens, reduction="none")
        per_row = torch.zeros(view.n_rows).index_add(0, view.tgt_rows, tok_nll) / view.row_ntok.clamp(min=1)
        nll_req = torch.zeros(n).index_add(0, view.owner, per_row) / prompts_per_req
        kl_new = F.log_softmax(logits[nt:].float(), dim=-1)
        kl = (kl_new.exp() * (kl_new - kl_ref[view.kl_index])).sum(-1)  # KL(p_δ ‖ p_0) at the subject token
        kl_req = torch.zeros(n).index_add(0, view.owner[view.kl_rows], kl)
        wd = hp.v_weight_decay * delta.norm(dim=1) / v0_norm**2
        loss_req = (nll_req + hp.kl_factor * kl_req + wd) * active
        nll_final[active] = nll_req.detach()[active]
        log.debug(
            "value step %d: %d active, %d rows, NLL median %.3f max %.3f",
            step,
            int(active.sum()),
            view.n_rows,
            float(nll_req.detach()[active].median()),
            float(nll_req.detach()[active].max()),
        )
        done = active & (nll_req.detach() < hp.early_stop_loss)
        if done.any():  # these targets are already likely: freeze their δ and drop their rows
            with torch.no_grad():
                frozen[done] = delta[done]
            active = active & ~done
            view = None
            if not active.any():
                break
        opt.zero_grad()
        loss_req.sum().backward()
        opt.step()
        _project(delta, max_norm, active, frozen)
    return _result(delta, v0, k_star, k_plain, nll_final, steps, t0, t1)


@dataclass
class _Group:
    """One row group of the grouped search: its prompts, their replay and the active view."""

    batch: PromptBatch
    replay: Replay
    kl_rows: torch.Tensor
    view: _ActiveView | None = None


def _optimize_grouped(
    handle,
    requests,
    layer,
    templates,
    hp,
    where,
    key_layer,
    mode: str = "suffix",
    suffix_lens: list[int] | None = None,
) -> ValueResult:
    """:func:`_optimize_chunk` with the rows split into groups that pad little, plus one group for
    the KL prompts, cut after the subject. ``mode="suffix"``: requests bucketed by the length of
    what follows the subject (prompt rest + target, the only columns a step replays; buckets from
    :func:`suffix_buckets`), each bucket with all its template rows; ``"template"``: one group per
    context template (the rows of a group differ only in subject and prompt); ``"kl"``: one group for
    all template rows. Each group is aligned and replayed on its own. Same loss, same optimiser,
    same early stopping; only the padding differs (tests/test_methods_tiny.py).
    """
    n = len(requests)
    t0 = time.perf_counter()
    hook_mod = handle.mlp_out(layer) if where == "mlp_out" else handle.block(layer)
    key_path, val_path = (
        handle.spec.mlp_out_path(key_layer),
        (handle.spec.mlp_out_path(layer) if where == "mlp_out" else handle.spec.block_path(layer)),
    )
    everyone, all_t = list(range(n)), list(range(len(templates)))
    if mode == "template":
        parts = [(everyone, [t]) for t in all_t]
    elif mode == "suffix":
        lens = suffix_lens or [_suffix_len(handle.tokenizer, r) for r in requests]
        parts = [(idx, all_t) for idx in suffix_buckets(lens, len(templates))]
    else:
        parts = [(everyone, all_t)]
    groups: list[_Group] = []
    no_kl = torch.zeros(0, dtype=torch.long)
    v0 = k_plain = k_sum = None
    k_cnt = torch.zeros(n)
    for idx, tids in parts:
        b = build_prompts(
            handle, [requests[i] for i in idx], [templates[t] for t in tids], kl_prompts=(), align=True
        )
        b.owner = torch.tensor(idx)[b.owner]  # request indices of the chunk
        b.template = torch.tensor(tids)[b.template]
        g = _Group(b, Replay(handle, b, layer, probes=[key_path, val_path]), no_kl)
        groups.append(g)
        k_in, v_out = g.replay.probe_in[key_path], g.replay.probe_out[val_path]
        if v0 is None:
            v0, k_plain = v_out.new_zeros(n, v_out.shape[1]), k_in.new_zeros(n, k_in.shape[1])
            k_sum = k_in.new_zeros(n, k_in.shape[1])
        plain = b.template == 0  # the bare "{}" template
        v0[b.owner[plain]] = v_out[plain]
        k_plain[b.owner[plain]] = k_in[plain]
        k_sum.index_add_(0, b.owner, k_in)
        k_cnt.index_add_(0, b.owner, torch.ones(len(b)))
    k_star = k_sum / k_cnt[:, None]  # k* averaged over the context templates
    kb = build_prompts(handle, requests, [], with_targets=False, align=True)
    kl_group = _Group(kb, Replay(handle, kb, layer), torch.arange(len(kb)))
    groups.append(kl_group)
    with torch.no_grad(), _search_precision(handle, hp):
        kl_ref = F.log_softmax(kl_group.replay.logits_at(kl_group.kl_rows, kb.lookup), dim=-1)

    t1 = time.perf_counter()
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    n_prompts = len(templates)
    nll_final = torch.full((n,), float("nan"))
    active = torch.ones(n, dtype=torch.bool)
    frozen = torch.zeros_like(v0)
    steps = 0
    for step in range(hp.v_steps):
        steps = step + 1
        opt.zero_grad()
        nll_req = torch.zeros(n)
        weight = active.float()
        for g in groups:  # forward and backward group by group: one group's graph in memory at a time
            if not active[g.batch.owner].any():  # a bucket whose requests have all converged
                continue
            if g.view is None:
                g.view = _ActiveView(g.batch, g.replay, active, g.kl_rows)
            v = g.view
            with add_at_positions(hook_mod, delta[v.owner], v.positions), _search_precision(handle, hp):
                logits = v.replay.logits_at(v.read_rows, v.read_cols)
            nt = len(v.tgt_tokens)
            loss = logits.new_zeros(())
            if nt:
                tok_nll = F.cross_entropy(logits[:nt].float(), v.tgt_tokens, reduction="none")
                per_row = torch.zeros(v.n_rows).index_add(0, v.tgt_rows, tok_nll) / v.row_ntok.clamp(min=1)
                part = torch.zeros(n).index_add(0, v.owner, per_row) / n_prompts
                nll_req += part.detach()
                loss = loss + (part * weight).sum()
            if len(v.kl_rows):
                kl_new = F.log_softmax(logits[nt:].float(), dim=-1)
                kl = (kl_new.exp() * (kl_new - kl_ref[v.kl_index])).sum(
                    -1
                )  # KL(p_δ ‖ p_0) at the subject token
                kl_req = torch.zeros(n).index_add(0, v.owner[v.kl_rows], kl)
                loss = loss + hp.kl_factor * (kl_req * weight).sum()
            loss.backward()
        ((hp.v_weight_decay * delta.norm(dim=1) / v0_norm**2) * weight).sum().backward()
        nll_final[active] = nll_req[active]
        log.debug(
            "value step %d: %d active, NLL median %.3f max %.3f",
            step,
            int(active.sum()),
            float(nll_req[active].median()),
            float(nll_req[active].max()),
        )
        done = active & (nll_req < hp.early_stop_loss)
        if done.any():  # these targets are already likely: freeze their δ and drop their rows
            with torch.no_grad():
                frozen[done] = delta[done]
            active = active & ~done
            for g in groups:
                g.view = None
            if not active.any():
                break
        opt.step()
        _project(delta, max_norm, active, frozen)
    return _result(delta, v0, k_star, k_plain, nll_final, steps, t0, t1)
