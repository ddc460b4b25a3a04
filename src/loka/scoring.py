"""Batched scoring: probabilities of target continuations and the model's top next token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _batch(tok, prompts: Sequence[str], targets: Sequence[str] | None):
    rows, spans = [], []
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        if targets is not None:
            t = targets[i]
            tids = tok(t if t.startswith(" ") else " " + t, add_special_tokens=False)["input_ids"]
            spans.append((len(ids), len(tids)))
            ids = ids + tids
        else:
            spans.append((len(ids), 0))
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, seq in enumerate(rows):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
    return input_ids, mask, spans


@torch.no_grad()
def target_logprobs(handle, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[dict]:
    """Per (prompt, target): summed and mean token log-probability of the target (teacher forcing),
    the model's top next token after the prompt and its probability."""
    tok, model = handle.tokenizer, handle.model
    out = []
    for s in range(0, len(prompts), batch_size):
        ps, ts = prompts[s: s + batch_size], targets[s: s + batch_size]
        ids, mask, spans = _batch(tok, ps, ts)
        logits = model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device), use_cache=False).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for r, (n, m) in enumerate(spans):
            tgt = ids[r, n: n + m]
            lp = logp[r, n - 1: n - 1 + m].gather(1, tgt[:, None]).squeeze(1)
            first = logp[r, n - 1]
            top = int(first.argmax())
            out.append({
                "logprob": float(lp.sum()), "mean_logprob": float(lp.mean()), "prob": float(lp.sum().exp()),
                "top_token": tok.decode([top]), "top_prob": float(first[top].exp()),
            })
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
