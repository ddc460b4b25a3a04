"""Context templates: short texts sampled from the model, prepended to edit prompts.

ROME/MEMIT optimise the new value over several contexts so that it holds whatever precedes the
prompt. MEMIT's recipe: one sample per prefix in ("The", "Therefore", "Because", "I", "You"),
``"<sample>. {}"``, plus the bare ``"{}"``. Cached per model hash and settings.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from .. import env
from ..hf_compat import generate as hf_generate
from ..utils.io import atomic_write_json, hash_json

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

PREFIXES = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def context_templates(
    handle: ModelHandle, n_per_prefix: int = 1, length: int = 10, seed: int = 0
) -> list[str]:
    key = hash_json([handle.model_hash, n_per_prefix, length, seed, PREFIXES])[:20]
    path = env.cache_dir("templates") / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    tok = handle.tokenizer
    torch.manual_seed(seed)
    out = ["{}"]
    for prefix in PREFIXES:
        enc = tok([prefix] * n_per_prefix, return_tensors="pt")
        seqs = hf_generate(
            handle.model,
            enc["input_ids"],
            enc["attention_mask"],
            do_sample=True,
            top_k=5,
            max_new_tokens=length,
            pad_token_id=tok.pad_token_id,
        )
        for row in seqs:
            text = tok.decode(row, skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
            text = " ".join(text.split())
            out.append(f"{text}. {{}}")
    atomic_write_json(path, out)
    return out
