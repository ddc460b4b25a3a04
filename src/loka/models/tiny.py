"""Tiny, seeded, randomly initialised models of each supported family, for tests.

They share a byte-level tokenizer (256 byte tokens + ``<|endoftext|>``) built in memory, so
nothing is read from disk or a hub.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from .catalog import TINY_NAMES

VOCAB = 257
EOS_ID = 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None
    )
    return fast


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, eos_token_id=EOS_ID, pad_token_id=EOS_ID, bos_token_id=EOS_ID)
    return {
        "tiny-llama": LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **common,
        ),
        "tiny-gpt2": GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=512, n_inner=128, **common),
        "tiny-gptj": GPTJConfig(
            n_embd=64, n_layer=4, n_head=4, n_positions=512, rotary_dim=8, n_inner=128, **common
        ),
        "tiny-neox": GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
            rotary_pct=0.25,
            **common,
        ),
        # Gemma 3: norms around the MLP output (post_feedforward_layernorm) and sliding-window layers
        "tiny-gemma3": Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=128,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            **common,
        ),
    }


assert tuple(_configs()) == TINY_NAMES, "catalog.TINY_NAMES and tiny._configs() must list the same families"


def build_tiny(name: str, seed: int = 0):
    """A seeded random model of family ``name`` (one of :data:`TINY_NAMES`) and its tokenizer."""
    cfg = _configs()[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # larger random weights than the default 0.02 init, so that predictions are far from uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.eval()
    return model, byte_tokenizer()
