"""The transformers compatibility layer: one module reaches into transformers' internals, the cache
keyword is found under either of its names, and plain ``model.generate`` runs through a LOKA codebook
(prefill routed, decode steps kept) on every tiny family."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import loka
from loka import hf_compat
from loka.methods.codebook import Codebook, query_embeddings
from loka.models.tiny import TINY_NAMES

SRC = Path(loka.__file__).parent

# transformers' private or moving parts: only hf_compat.py may name them
INTERNAL = re.compile(
    r"past_key_values|\bcache_params\b|batch_select_indices|hf_quantizer|disable_progress_bar"
    r"|transformers\.(models|utils|generation|cache_utils|tokenization_utils\w*|integrations|modeling_\w+|masking_utils"
    r"|pytorch_utils|quantizers)\b"
)


def test_only_hf_compat_reaches_into_transformers():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "hf_compat.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if INTERNAL.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "use loka.hf_compat instead:\n" + "\n".join(offenders)


def _cache_with(n_tokens: int):

    h = loka.load_model("tiny-llama")
    ids = torch.arange(1, n_tokens + 1)[None]
    out = h.model(input_ids=ids, use_cache=True)
    return h, hf_compat.cache_out(out)


@pytest.mark.parametrize("name", hf_compat.CACHE_KWARGS)
def test_decode_step_is_recognised_under_either_keyword(name):
    from transformers import DynamicCache

    h, cache = _cache_with(5)
    assert hf_compat.cached_length(cache) == 5
    assert hf_compat.is_decode_step({name: cache})
    assert not hf_compat.is_decode_step({name: DynamicCache()})  # generate's prefill: an empty cache
    assert not hf_compat.is_decode_step({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    assert hf_compat.cache_kwarg(h.model) in hf_compat.CACHE_KWARGS


def test_cache_crop_and_row_selection():
    h, cache = _cache_with(6)
    hf_compat.crop_cache(cache, 4)
    assert hf_compat.cached_length(cache) == 4
    more = h.model(input_ids=torch.tensor([[7, 8]]), use_cache=True, **hf_compat.with_cache(h.model, cache))
    full = h.model(input_ids=torch.tensor([[1, 2, 3, 4, 7, 8]]), use_cache=False)
    assert torch.allclose(more.logits[0, -1], full.logits[0, -1], atol=1e-5)  # the cropped prefix is exact


def test_gathered_cache_continues_like_each_row_on_its_own():
    """A cache built from one row holding two sequences side by side, regathered into two padded rows,
    continues each row exactly as a forward of that sequence alone; a model with sliding-window layers
    gets no such cache."""
    h = loka.load_model("tiny-llama")
    a, b = [1, 2, 3], [4, 5]
    cache = hf_compat.plain_cache(h.model)
    assert cache is not None
    h.model(
        input_ids=torch.tensor([a + b]),
        position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
        attention_mask=hf_compat.additive_mask(
            torch.tensor(
                [[[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]]
            ).bool(),
            torch.float32,
        ),
        use_cache=True,
        **hf_compat.with_cache(h.model, cache),
    )
    rows, cols = torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 2], [0, 3, 4]])  # b left-padded
    hf_compat.gather_cache(cache, rows, cols)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    nxt = h.model(
        input_ids=torch.tensor([[9], [9]]),
        attention_mask=mask,
        position_ids=torch.tensor([[3], [2]]),
        use_cache=True,
        **hf_compat.with_cache(h.model, cache),
    )
    for row, seq in enumerate((a, b)):
        alone = h.model(input_ids=torch.tensor([seq + [9]])).logits[0, -1]
        assert torch.allclose(nxt.logits[row, -1], alone, atol=1e-5)
    assert hf_compat.plain_cache(loka.load_model("tiny-gemma3").model) is None  # sliding-window layers


def test_block_inputs_are_shared_unless_layers_have_types():
    assert hf_compat.same_block_inputs(loka.load_model("tiny-llama").config)
    assert not hf_compat.same_block_inputs(loka.load_model("tiny-gemma3").config)  # sliding and global layers


def test_native_gqa_is_scoped_and_changes_no_result(monkeypatch):
    h = loka.load_model("tiny-llama")
    assert h.config.num_key_value_heads < h.config.num_attention_heads  # grouped-query attention
    ids, mask = torch.tensor([[5, 6, 7, 8], [0, 6, 7, 8]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    ref = h.model(input_ids=ids, attention_mask=mask).logits
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, *a, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with hf_compat.native_gqa(torch.device("cpu")):
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
        got = h.model(input_ids=ids, attention_mask=mask).logits
    assert calls and all(kv < q and gqa for q, kv, gqa in calls)  # the key/value heads went in ungrouped
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # set only inside the block
    assert torch.allclose(got[:, 1:], ref[:, 1:], atol=1e-5)
    with hf_compat.native_gqa(torch.device("cuda")):  # not on other devices
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")  # the user's own setting wins and stays
    with hf_compat.native_gqa(torch.device("cpu")):
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"


def test_additive_mask_convention():
    allowed = torch.tensor([[[True, False], [True, True]]])
    m = hf_compat.additive_mask(allowed, torch.float32)
    assert m.shape == (1, 1, 2, 2) and m[0, 0, 0, 0] == 0 and m[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_greedy_generation_config_drops_shipped_sampling_settings():
    h = loka.load_model("tiny-llama")
    h.model.generation_config.temperature = 0.3
    try:
        cfg = hf_compat.generation_config(h.model, do_sample=False, max_new_tokens=4, pad_token_id=0)
        assert cfg.temperature is None and not cfg.do_sample and cfg.max_new_tokens == 4
        assert h.model.generation_config.temperature == 0.3  # the model's own config is untouched
    finally:
        h.model.generation_config.temperature = None


PROMPTS = ["Zorblax Quint was born in", "The capital of Norway is the city", "Perla works as"]


@pytest.mark.parametrize("family", TINY_NAMES)
def test_plain_generate_through_a_codebook_routes_each_row_on_its_prompt(family):
    """Left-padded batch of 3, 6 new tokens, plain ``model.generate``: each row equals the same prompt
    generated alone with its memory forced — the decode steps kept the prefill's memory."""
    h = loka.load_model(family)
    layer = 1
    w = h.weight(layer)
    emb = query_embeddings(h, layer, PROMPTS)  # prompt i is nearest to key i
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn((len(PROMPTS), *w.shape), generator=g) * 0.6
    tok = h.tokenizer

    def alone(prompt: str, memory: int | None) -> list[int]:
        enc = tok([prompt], return_tensors="pt")
        ctx = book.select(memory) if memory is not None else torch.no_grad()
        with ctx, torch.no_grad():
            seq = hf_compat.generate(
                h.model,
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=6,
                pad_token_id=tok.pad_token_id,
            )
        return seq[0, enc["input_ids"].shape[1] :].tolist()

    base = [alone(p, None) for p in PROMPTS]
    book = Codebook(deltas, emb, layer, h.spec.block_path(layer), h.spec.mlp_out_path(layer)).attach(h.model)
    old = tok.padding_side
    try:
        tok.padding_side = "left"
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        assert (enc["attention_mask"] == 0).any()  # left padding is exercised
        with torch.no_grad():
            seqs = h.model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
        raw = [s[enc["input_ids"].shape[1] :].tolist() for s in seqs]
        tok.padding_side = old
        forced = [alone(p, i) for i, p in enumerate(PROMPTS)]
    finally:
        tok.padding_side = old
        book.remove()
    assert all(len(r) == 6 for r in raw)
    assert raw == forced
    assert raw != base  # the memories change what is generated
