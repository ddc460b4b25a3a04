"""Batched scoring: probabilities of target continuations and the model's top next token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _batch(tok, prompts: Sequence[str], targets: Sequence[str] | None):
    """Left-padded rows ``prompt + target`` with explicit positions, so every row's target ends at
    the last column and the unembedding can be limited to the last few columns."""
    rows, spans = [], []
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        m = 0
        if targets is not None:
            t = targets[i]
            tids = tok(t if t.startswith(" ") else " " + t, add_special_tokens=False)["input_ids"]
            m = len(tids)
            ids = ids + tids
        rows.append(ids)
        spans.append(m)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, seq in enumerate(rows):
        input_ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, mask, positions, spans


def _tail_logits(handle, ids, mask, positions, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` columns only (the unembedding is most of the cost otherwise)."""
    dev = handle.device
    return handle.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                        use_cache=False, logits_to_keep=keep).logits


@torch.no_grad()
def target_logprobs(handle, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[dict]:
    """Per (prompt, target): summed and mean token log-probability of the target (teacher forcing),
    the model's top next token after the prompt and its probability."""
    tok = handle.tokenizer
    out = []
    for s in range(0, len(prompts), batch_size):
        ps, ts = prompts[s: s + batch_size], targets[s: s + batch_size]
        ids, mask, pos, spans = _batch(tok, ps, ts)
        keep = max(spans) + 1
        logp = F.log_softmax(_tail_logits(handle, ids, mask, pos, keep).float(), dim=-1)
        for r, m in enumerate(spans):
            tgt = ids[r, ids.shape[1] - m:]
            first = logp[r, keep - m - 1]
            lp = logp[r, keep - m - 1: keep - 1].gather(1, tgt[:, None].to(logp.device)).squeeze(1)
            top = int(first.argmax())
            out.append({
                "logprob": float(lp.sum()), "mean_logprob": float(lp.mean()), "prob": float(lp.sum().exp()),
                "top_token": tok.decode([top]), "top_prob": float(first[top].exp()),
            })
    return out


@torch.no_grad()
def score_targets(handle, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> list[dict]:
    """Teacher-forced scoring of ``target`` after each prompt, all rows of a call batched together.

    Per row: ``token_logprobs`` (one per target token), ``argmax_ids`` (the model's top token at each
    of those positions) and ``target_ids``; enough for probability- and token-accuracy metrics.
    """
    tok = handle.tokenizer
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask, pos, spans = _batch(tok, prompts[s: s + batch_size], targets[s: s + batch_size])
        keep = max(spans) + 1
        logits = _tail_logits(handle, ids, mask, pos, keep)
        for r, m in enumerate(spans):
            lg = logits[r, keep - m - 1: keep - 1].float()
            tgt = ids[r, ids.shape[1] - m:]
            lp = F.log_softmax(lg, dim=-1).gather(1, tgt[:, None].to(lg.device)).squeeze(1)
            out.append({"token_logprobs": lp.cpu().tolist(), "argmax_ids": lg.argmax(-1).cpu().tolist(),
                        "target_ids": tgt.tolist()})
    return out


@torch.no_grad()
def generate(handle, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations (without the prompt)."""
    tok = handle.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(handle.device)
        seqs = handle.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = old
    return [tok.decode(s[enc["input_ids"].shape[1]:], skip_special_tokens=True) for s in seqs]
