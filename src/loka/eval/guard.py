"""General-ability guard: perplexity on a fixed held-out text sample and 4-way multiple-choice accuracy
on TOFU's real-authors / world-facts questions, measured before and after an update."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..resources import data_dir

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

DATA = data_dir()  # the package data (loka/data)


def heldout_texts(n: int = 100) -> list[str]:
    """Fixed sentences: true single-hop facts of MQuAKE-hard written out, in file order."""
    out = []
    for case in json.loads((DATA / "mquake" / "MQuAKE-hard.json").read_text()):
        for h in case.get("single_hops", []):
            s = f"{h['cloze']} {h['answer']}."
            if s not in out:
                out.append(s)
            if len(out) >= n:
                return out
    return out


@torch.no_grad()
def perplexity(handle: ModelHandle, texts: list[str], batch_size: int = 32) -> float:
    tok, model = handle.tokenizer, handle.model
    nll, count = 0.0, 0
    old = tok.padding_side
    tok.padding_side = "right"
    try:
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s : s + batch_size], return_tensors="pt", padding=True).to(handle.device)
            logits = model(**enc, use_cache=False).logits[:, :-1].float()
            tgt = enc["input_ids"][:, 1:]
            m = enc["attention_mask"][:, 1:].bool()
            lp = F.log_softmax(logits, -1).gather(2, tgt[..., None]).squeeze(-1)
            nll -= float(lp[m].sum())
            count += int(m.sum())
    finally:
        tok.padding_side = old
    return math.exp(nll / max(count, 1))


def mc_accuracy(handle: ModelHandle, records: list[dict]) -> float:
    """Pick the option (answer + 3 perturbed) with the highest mean per-token log-probability."""
    from ..scoring import score_targets

    prompts, targets, sizes = [], [], []
    for r in records:
        opts = [r["answer"], *r["perturbed_answer"][:3]]
        q = f"Question: {r['question']}\nAnswer:"
        prompts += [q] * len(opts)
        targets += opts
        sizes.append(len(opts))
    scores = score_targets(handle, prompts, targets)
    correct, i = [], 0
    for n in sizes:
        means = [float(np.mean(s["token_logprobs"])) for s in scores[i : i + n]]
        correct.append(int(np.argmax(means)) == 0)
        i += n
    return float(np.mean(correct))


def general_guard(handle: ModelHandle, n_texts: int = 100, n_mc: int = 50) -> dict:
    def read(name):
        return [json.loads(line) for line in (DATA / "tofu" / name).read_text().splitlines() if line.strip()][
            :n_mc
        ]

    return {
        "ppl": perplexity(handle, heldout_texts(n_texts)),
        "mc_real_authors": mc_accuracy(handle, read("real_authors_perturbed.json")),
        "mc_world_facts": mc_accuracy(handle, read("world_facts_perturbed.json")),
    }
