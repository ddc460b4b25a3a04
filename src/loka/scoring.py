"""Batched scoring: probabilities of target continuations and the model's top next token.

Every prompt is run once, whatever the number of targets scored after it. The default (``packed``)
lays a chunk of prompts out as a token tree in one sequence: each prompt and each
``prompt + target[:-1]`` branch is a path in a trie of token prefixes, every node sits at position
``depth`` and attends to its ancestors only (tree attention). The first target token is read at a
prompt's last node, the remaining ones along its branch. A CounterFact record scores every prompt
with the new and the true object, and its prompts share relation templates, so each shared prefix
runs once; packing wastes nothing on padding (left-padding a record's 13 prompts of 5-18 tokens
doubled the work). On CPU in float32 the linear layers run on oneDNN-prepacked weights
(:mod:`loka.fastlinear`, re-packed whenever a weight changes). ``mode="flat"`` packs one tree per
prompt (no sharing across prompts); ``mode="cache"`` runs padded prompts into a key/value cache and
the branches on top of it; ``mode="full"`` runs full padded ``prompt + target`` rows. All agree
(tests/test_scoring.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import ConfigError, RequestError
from .fastlinear import packed_linears
from .hf_compat import cache_out, select_cache_rows, with_cache
from .hf_compat import generate as hf_generate
from .packing import pack_trees, within_window
from .runtime import rewrite_prompts, route_groups

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)


def _target_ids(tok, target: str) -> list[int]:
    return tok(target if target.startswith(" ") else " " + target, add_special_tokens=False)["input_ids"]


def _left_pad(rows: list[list[int]], pad: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(rows):
        ids[r, width - len(seq) :] = torch.tensor(seq)
        mask[r, width - len(seq) :] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def _rows_shared(
    handle: ModelHandle, p_ids: list[list[int]], t_ids: list[list[int]], owner: list[int]
) -> list[torch.Tensor]:
    """Logits (m_r, V) predicting each target token of row r; prompts run once into a KV cache."""
    dev, model = handle.device, handle.model
    ids, mask, pos = _left_pad(p_ids, _pad_id(handle.tokenizer))
    multi = [r for r, t in enumerate(t_ids) if len(t) > 1]
    out = model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=pos.to(dev),
        use_cache=bool(multi),
        logits_to_keep=1,
    )
    first = out.logits[:, -1].float()
    logits = [first[owner[r]][None] for r in range(len(t_ids))]
    if multi:
        cache = cache_out(out)
        sel = torch.tensor([owner[r] for r in multi], device=dev)
        select_cache_rows(cache, sel)
        w = max(len(t_ids[r]) for r in multi) - 1
        cont = torch.full((len(multi), w), _pad_id(handle.tokenizer), dtype=torch.long)
        cmask = torch.zeros_like(cont)
        for i, r in enumerate(multi):
            cont[i, : len(t_ids[r]) - 1] = torch.tensor(t_ids[r][:-1])
            cmask[i, : len(t_ids[r]) - 1] = 1
        start = mask.sum(1)[sel.cpu()]
        cpos = start[:, None] + torch.arange(w)[None]
        more = model(
            input_ids=cont.to(dev),
            attention_mask=torch.cat([mask[sel.cpu()], cmask], 1).to(dev),
            position_ids=cpos.to(dev),
            use_cache=True,
            **with_cache(model, cache),
        ).logits.float()
        for i, r in enumerate(multi):
            logits[r] = torch.cat([logits[r], more[i, : len(t_ids[r]) - 1]], 0)
    return logits


def _rows_packed(
    handle: ModelHandle,
    p_ids: list[list[int]],
    t_ids: list[list[int]],
    owner: list[int],
    max_len: int = 1024,
    share: bool = True,
) -> list[torch.Tensor]:
    """The same logits from packed token trees (tree attention, :mod:`loka.packing`).

    Every prompt and every ``prompt + target[:-1]`` branch is a path in a trie of token prefixes,
    one trie per pack of at most ``max_len`` nodes; a prompt and its branches stay in one pack. A
    prefix shared by several prompts (a relation template such as ``"The nationality of"``, or a
    prompt's own target branches) runs once and every row reads exactly the logits a separate
    forward would give. On CounterFact records this removes a fifth of the tokens that plain packing
    pushes through the model. ``share=False`` keeps one tree per prompt (plain packing, the
    benchmark's reference)."""
    seqs: list[list[list[int]]] = [[p] for p in p_ids]  # per prompt: itself, then its branches
    for r, t in enumerate(t_ids):
        if len(t) > 1:
            seqs[owner[r]].append(p_ids[owner[r]] + t[:-1])
    longest = max(len(s) for ss in seqs for s in ss) + 1
    if not within_window(handle.config, longest):
        raise RequestError(
            f"a prompt of {longest} tokens exceeds the sliding window ({handle.config.sliding_window}); shorten the prompt or target"
        )
    tree = pack_trees(seqs, max_len, _pad_id(handle.tokenizer), share)
    reads = [[tree.at(owner[r], p_ids[owner[r]] + t[:i]) for i in range(len(t))] for r, t in enumerate(t_ids)]
    cols = sorted({c for rd in reads for _, c in rd})
    colix = {c: i for i, c in enumerate(cols)}
    dtype = next(handle.model.parameters()).dtype
    dev = handle.device
    lg = handle.model(
        input_ids=tree.input_ids.to(dev),
        attention_mask=tree.attention_mask(dtype).to(dev),
        position_ids=tree.position_ids.to(dev),
        use_cache=False,
        logits_to_keep=torch.tensor(cols, device=dev),
    ).logits.float()
    return [torch.stack([lg[b, colix[c]] for b, c in rd]) for rd in reads]


def _rows_full(
    handle: ModelHandle, p_ids: list[list[int]], t_ids: list[list[int]], owner: list[int]
) -> list[torch.Tensor]:
    """The same logits from full ``prompt + target`` rows (for models whose cache cannot be shared)."""
    dev = handle.device
    rows = [p_ids[owner[r]] + t for r, t in enumerate(t_ids)]
    ids, mask, pos = _left_pad(rows, _pad_id(handle.tokenizer))
    keep = max(len(t) for t in t_ids) + 1
    lg = handle.model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=pos.to(dev),
        use_cache=False,
        logits_to_keep=keep,
    ).logits.float()
    return [lg[r, keep - len(t) - 1 : keep - 1] for r, t in enumerate(t_ids)]


SCORING_MODES = {
    "packed": _rows_packed,
    "flat": partial(_rows_packed, share=False),
    "cache": _rows_shared,
    "full": _rows_full,
}


@torch.no_grad()
def _score(
    handle: ModelHandle,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int,
    mode: str = "packed",
    context: bool = True,
):
    """Yield (row index, logits (m, V), target ids (m,)) for every (prompt, target) row.

    With a context artifact applied (an editing-free method such as SCR) and ``context`` true, the
    prompts are first rewritten with the retrieved facts in front."""
    if context:
        prompts = rewrite_prompts(handle, prompts)
    if mode not in SCORING_MODES:
        raise ConfigError(f"scoring mode {mode!r} is not one of {sorted(SCORING_MODES)}")
    tok = handle.tokenizer
    uniq = list(dict.fromkeys(prompts))
    p_cache = {p: tok(p)["input_ids"] for p in uniq}
    by_prompt: dict[str, list[int]] = {}
    for r, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(r)
    for select, idx in route_groups(handle, uniq):  # one group unless a codebook is applied
        with select():
            yield from _score_chunks(
                handle, [uniq[i] for i in idx], p_cache, by_prompt, prompts, targets, batch_size, mode
            )


def _score_chunks(handle: ModelHandle, uniq, p_cache, by_prompt, prompts, targets, batch_size, mode):
    tok = handle.tokenizer
    for s in range(0, len(uniq), batch_size):
        chunk = uniq[s : s + batch_size]
        rows = [r for p in chunk for r in by_prompt[p]]
        index = {p: i for i, p in enumerate(chunk)}
        p_ids = [p_cache[p] for p in chunk]
        t_ids = [_target_ids(tok, targets[r]) for r in rows]
        owner = [index[prompts[r]] for r in rows]
        logits = None
        with packed_linears(handle).active(handle.model):
            if mode != "full":
                try:
                    logits = SCORING_MODES[mode](handle, p_ids, t_ids, owner)
                except (
                    Exception
                ) as e:  # an attention or cache this model does not support: full rows are exact too
                    log.debug("%s scoring unavailable (%s); scoring full rows", mode, e)
                    mode = "full"
            if logits is None:
                logits = _rows_full(handle, p_ids, t_ids, owner)
        for r, lg, t in zip(rows, logits, t_ids):
            yield r, lg, torch.tensor(t)


def target_logprobs(
    handle: ModelHandle,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    context: bool = True,
) -> list[dict]:
    """Per (prompt, target): summed and mean token log-probability of the target (teacher forcing),
    the model's top next token after the prompt and its probability."""
    out: list[dict] = [{}] * len(prompts)
    for r, lg, tgt in _score(handle, prompts, targets, batch_size, context=context):
        logp = F.log_softmax(lg, dim=-1)
        lp = logp.gather(1, tgt[:, None].to(logp.device)).squeeze(1)
        top = int(logp[0].argmax())
        out[r] = {
            "logprob": float(lp.sum()),
            "mean_logprob": float(lp.mean()),
            "prob": float(lp.sum().exp()),
            "top_token": handle.tokenizer.decode([top]),
            "top_prob": float(logp[0, top].exp()),
        }
    return out


def score_targets(
    handle: ModelHandle,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    mode: str = "packed",
) -> list[dict]:
    """Teacher-forced scoring of ``target`` after each prompt, all rows of a call batched together.

    Per row: ``token_logprobs`` (one per target token), ``argmax_ids`` (the model's top token at each
    of those positions) and ``target_ids``; enough for probability- and token-accuracy metrics.
    ``mode``: "packed" (default), "cache" or "full" (see the module docstring); same numbers.
    """
    out: list[dict] = [{}] * len(prompts)
    for r, lg, tgt in _score(handle, prompts, targets, batch_size, mode):
        lp = F.log_softmax(lg, dim=-1).gather(1, tgt[:, None].to(lg.device)).squeeze(1)
        out[r] = {
            "token_logprobs": lp.cpu().tolist(),
            "argmax_ids": lg.argmax(-1).cpu().tolist(),
            "target_ids": tgt.tolist(),
        }
    return out


@torch.no_grad()
def generate(handle: ModelHandle, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations (without the prompt)."""
    tok = handle.tokenizer
    prompts = rewrite_prompts(handle, prompts)
    out: list[str] = [""] * len(prompts)
    for select, idx in route_groups(handle, prompts):  # a codebook: one memory per group
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(handle.device)
            with select():
                seqs = hf_generate(
                    handle.model,
                    enc["input_ids"],
                    enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
        finally:
            tok.padding_side = old
        for i, s in zip(idx, seqs):
            out[i] = tok.decode(s[enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out
