"""SCR: editing-free knowledge updating by selective contextual reasoning (arXiv 2503.05212).

No weight changes. An "edit" stores the new fact as text (``"{prompt with subject} {target}."``)
with the sentence-encoder embedding of its prompt; the artifact (kind ``context``) is that store.
While a store is applied, every prompt that loka scores or generates from is answered in context:

1. **retrieve** the ``k`` stored facts whose prompt embedding is closest to the query (MiniLM,
   cosine ≥ ``min_similarity``);
2. **filter** them with the model itself (``filter="model"``): each candidate is kept if the model
   prefers " Yes" to " No" after a relevance question (seed: "the LLM selects the relevant facts");
   ``filter="none"`` keeps all retrieved ones;
3. **answer in context**: the kept facts are prepended to the prompt; with none kept the prompt is
   left alone and the unmodified model answers.

Applying several SCR artifacts pools their facts; a later fact about the same prompt overrides an
earlier one (only the newest is retrieved). Reverting removes the store; the weights never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError
from ..runtime import applied_context, register_rewriter
from .base import Cosine, HParams, Method, PosInt, register

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

RELEVANCE = "Fact: {fact}\nQuestion: {query}...\nIs the fact about the subject of the question? Answer:"


@dataclass
class ScrHParams(HParams):
    k: PosInt = 3
    min_similarity: Cosine = 0.5
    filter: Literal["model", "none"] = "model"  # model | none
    separator: str = "\n"


def fact_text(req) -> str:
    return f"{req.text} {req.target_new.strip()}."


@register
class Scr(Method):
    name = "scr"
    hparams_cls = ScrHParams
    kind = "context"
    export_refusal = (
        "it rewrites each prompt's text (facts retrieved with the MiniLM sentence encoder, filtered by "
        "the model) before the model sees it, and a model's forward sees token ids, not prompts"
    )

    def run(self, handle: ModelHandle, requests, hp: ScrHParams, progress=None, state=None):
        from ..encoder import load_encoder

        if hp.filter not in ("model", "none"):
            raise ConfigError(f"scr: hyperparameter filter must be 'model' or 'none', got {hp.filter!r}")
        keys = load_encoder().encode([r.text for r in requests])
        if progress is not None:
            progress.update(len(requests))
        return {"memory.keys": keys}, {
            "facts": [fact_text(r) for r in requests],
            "queries": [r.text for r in requests],
        }


def _pool(stores) -> tuple[list[str], list[str], torch.Tensor, ScrHParams]:
    facts, queries, keys = [], [], []
    for a in stores:
        facts += a.manifest["extra"]["facts"]
        queries += a.manifest["extra"]["queries"]
        keys.append(a.deltas["memory.keys"])
    latest: dict[str, int] = {}
    for i, q in enumerate(queries):  # a newer fact for the same prompt supersedes the older one
        latest[q] = i
    keep = sorted(latest.values())
    hp = ScrHParams.from_dict(stores[-1].manifest["hparams"])
    return [facts[i] for i in keep], [queries[i] for i in keep], torch.cat(keys)[keep], hp


@register_rewriter("scr")
@torch.no_grad()
def contextualise(handle: ModelHandle, prompts: list[str], stores: list | None = None) -> list[str]:
    """``prompts`` with the relevant facts of the applied SCR stores prepended (unchanged when none is
    applied); scoring calls it through :func:`loka.runtime.rewrite_prompts`."""
    stores = [a for a in applied_context(handle.model) if a.method == "scr"] if stores is None else stores
    if not stores:
        return list(prompts)
    from ..encoder import load_encoder
    from ..scoring import target_logprobs

    facts, _, keys, hp = _pool(stores)
    uniq = list(dict.fromkeys(prompts))
    sims = load_encoder().encode(uniq) @ keys.T
    cands: dict[str, list[int]] = {}
    for i, p in enumerate(uniq):
        top = torch.topk(sims[i], min(hp.k, len(facts)))
        cands[p] = [int(j) for s, j in zip(top.values, top.indices) if float(s) >= hp.min_similarity]
    if hp.filter == "model":
        pairs = [(p, j) for p in uniq for j in cands[p]]
        if pairs:
            qs = [RELEVANCE.format(fact=facts[j], query=p) for p, j in pairs]
            # one call: both answers of a question share its prompt's forward (packed scoring)
            both = target_logprobs(handle, qs + qs, ["Yes"] * len(qs) + ["No"] * len(qs), context=False)
            yes, no = both[: len(qs)], both[len(qs) :]
            ok = {pair for pair, y, n in zip(pairs, yes, no) if y["logprob"] > n["logprob"]}
            cands = {p: [j for j in js if (p, j) in ok] for p, js in cands.items()}
    out = {
        p: (hp.separator.join(facts[j] for j in js) + hp.separator + p if js else p)
        for p, js in cands.items()
    }
    return [out[p] for p in prompts]
