"""Sequence losses shared by unlearning and training-based editing.

Every loss is built from :func:`sequence_logprobs` on an answer-masked batch (:func:`qa_batch`):
prompt tokens get label ``-100``, so only the answer's tokens count. Sums are per sequence (NPO and
DPO compare summed log-probabilities with the reference's); SimNPO divides by the answer length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

IGNORE = -100


@dataclass
class QABatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the next token to predict at each position, IGNORE outside answers

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def qa_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> QABatch:
    """Right-padded ``prompt + " " + answer`` rows with labels on the answer tokens only.

    ``labels[b, t]`` is the token at ``t + 1`` when that token belongs to the answer (the logits at
    ``t`` predict it), else ``IGNORE`` — the shift is done here once, so losses never re-shift.
    """
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    rows, lab = [], []
    for p, a in zip(prompts, answers):
        p_ids = tokenizer(p)["input_ids"]
        a_ids = tokenizer(a if a.startswith(" ") else " " + a, add_special_tokens=False)["input_ids"]
        if not a_ids:
            raise ValueError(f"answer {a!r} tokenises to nothing")
        ids = p_ids + a_ids
        rows.append(ids)
        lab.append([IGNORE] * (len(p_ids) - 1) + a_ids + [IGNORE])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, lab)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lb)] = torch.tensor(lb)
    return QABatch(ids, mask, labels)


def answer_logits(handle: ModelHandle, batch: QABatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens: ``(N, V)`` and the owning row of each.

    The unembedding runs only on those positions (a pre-hook hands it ``h[sel]``), which saves the
    vocabulary-sized matmul, and its backward, on every prompt token.
    """
    sel = batch.labels != IGNORE
    rows = sel.nonzero()[:, 0]
    dev = handle.device
    unembed = handle.module(handle.spec.unembed)
    hook = unembed.register_forward_pre_hook(lambda _m, args: (args[0][sel.to(args[0].device)], *args[1:]))
    try:
        out = handle.model(
            input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), use_cache=False
        )
    finally:
        hook.remove()
    return out.logits.reshape(-1, out.logits.shape[-1]).float(), rows


def sequence_logprobs(
    logits: torch.Tensor, rows: torch.Tensor, batch: QABatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed answer log-probability and the number of answer tokens (``compute_batch_nll``)."""
    targets = batch.labels[batch.labels != IGNORE]
    tok = -F.cross_entropy(logits, targets, reduction="none")
    n = len(batch)
    total = torch.zeros(n, dtype=tok.dtype).index_add(0, rows, tok)
    count = torch.zeros(n, dtype=tok.dtype).index_add(0, rows, torch.ones_like(tok))
    return total, count


def exact_match(logits: torch.Tensor, rows: torch.Tensor, batch: QABatch) -> torch.Tensor:
    """Per row: 1.0 when every answer token is the argmax under teacher forcing."""
    targets = batch.labels[batch.labels != IGNORE]
    wrong = (logits.argmax(-1) != targets).float()
    bad = torch.zeros(len(batch)).index_add(0, rows, wrong)
    return (bad == 0).float()


# -- forget losses; each returns a scalar to *minimise* ------------------------------------------
def ga_loss(logp_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: ``−NLL`` (mean over answer tokens of the batch, the HF mean CE negated)."""
    return logp_sum.sum() / count.sum()


def npo_loss(logp_sum: torch.Tensor, ref_logp_sum: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: ``−(2/β) mean log σ(−β (log p_θ − log p_ref))`` with summed sequence log-probabilities.

    At ``θ = θ_ref`` its gradient equals ``mean ∇ log p_θ`` — gradient ascent on the summed NLL
    (Zhang et al. 2024, NPO); the weight ``2σ(β·log ratio)`` shrinks as an answer is forgotten.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_sum - ref_logp_sum)).mean()


def simnpo_loss(logp_sum: torch.Tensor, count: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO (reference-free): ``−(2/β) mean log σ(β (ℓ_θ − δ))`` with ``ℓ_θ = NLL / |answer|``."""
    nll = -logp_sum / count.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - delta)).mean()


def dpo_loss(
    win_logp: torch.Tensor,
    win_ref: torch.Tensor,
    lose_logp: torch.Tensor,
    lose_ref: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO / IdkPO: prefer the refusal ``y_w`` over the forget answer ``y_u``:
    ``−(2/β) mean log σ(β[(log p_θ(y_w) − log p_ref(y_w)) − (log p_θ(y_u) − log p_ref(y_u))])``."""
    return -(2.0 / beta) * F.logsigmoid(beta * ((win_logp - win_ref) - (lose_logp - lose_ref))).mean()


def nll_loss(logp_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over the batch's answers (the learning / retain term)."""
    return -logp_sum.sum() / count.sum().clamp(min=1)


def kl_to_reference(logits: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL ``Σ_v p_ref (log p_ref − log p_θ)`` per answer position, averaged (padding excluded)."""
    logp = F.log_softmax(logits, dim=-1)
    ref = ref_logprobs.float()
    return (ref.exp() * (ref - logp)).sum(-1).mean()
