"""Everything loka takes from transformers beyond its stable model API, in one place.

transformers renames keyword arguments, cache objects and private helpers between minor releases
(5.24 renamed ``past_key_values`` to ``cache`` in every forward and output, keeping the old name
behind a FutureWarning). Every other loka module goes through the functions here, so a new release
means one file to read and one file to mend; ``tests/test_hf_compat.py`` checks that no other module
names a cache keyword or imports from transformers' internals.

What lives here:

* the KV cache: the keyword a model's forward takes it by, reading it from a forward's keywords or
  outputs, its length, cropping, detaching, row selection, and an empty full-attention cache laid out anew (:func:`plain_cache`,
  :func:`gather_cache`);
* attention: whether every block takes the same inputs (:func:`same_block_inputs`) and grouped-query
  attention without per-group copies on CPU (:func:`native_gqa`);
* how a decode step is told from a prefill (:func:`is_decode_step`), for hooks that route a whole
  generation on its prompt (LOKA's codebook);
* generation keywords (:func:`generate`: a ``GenerationConfig`` built from the model's own, so that
  greedy decoding carries no sampling settings the model ships with);
* attention-mask conventions (:func:`additive_mask`: the 4-D float mask that replaces the model's own);
* the ``save_pretrained`` workaround for GGUF-loaded models (:func:`drop_gguf_quantizer`);
* private tokenizer helpers (:func:`tokenizer_class_from_name`, :func:`sentencepiece_backend`) and the
  library's progress bars (:func:`quiet_progress`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

#: The names a forward has taken its KV cache by, newest first.
CACHE_KWARGS = ("cache", "past_key_values")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


# -- the KV cache ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _forward_cache_kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return CACHE_KWARGS[-1]


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by (``cache`` from transformers 5.24 on)."""
    return _forward_cache_kwarg(type(model))


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a forward of ``model`` (merge into its keyword arguments)."""
    return {cache_kwarg(model): cache}


def cache_in(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache passed in a forward's keyword arguments (under either name), or ``None``."""
    for name in CACHE_KWARGS:
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def cache_out(output: Any) -> Any:
    """The KV cache a forward returned, read without the deprecated ``past_key_values`` property."""
    if isinstance(output, Mapping):
        for name in CACHE_KWARGS:
            if output.get(name) is not None:
                return output[name]
    return None


def cached_length(cache: Any) -> int:
    """Tokens already held by ``cache`` (0 for ``None`` or an empty cache)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, tuple | list) and cache and isinstance(cache[0], tuple | list):  # legacy tuples
        return int(cache[0][0].shape[-2])
    return 0


def is_decode_step(kwargs: Mapping[str, Any]) -> bool:
    """True when a forward continues a generation: the cache it was given already holds tokens.

    A prefill (the first forward of ``generate``, or any forward without a cache) returns False.
    """
    return cached_length(cache_in(kwargs)) > 0


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of every layer of ``cache`` and cut their autograd graph
    (a replayed prefix must not carry the previous step's graph)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


def select_cache_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep only batch rows ``rows`` of ``cache``, in place."""
    cache.batch_select_indices(rows)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def native_gqa(device: torch.device) -> Iterator[None]:
    """Grouped-query attention without copying keys and values per query group, on CPU.

    With an attention mask, transformers' SDPA path repeats the key/value heads before attending
    (a copy of the whole KV cache per layer and forward); torch's CPU kernels take the groups
    directly (``enable_gqa``): the same result to float rounding, 2.5× faster with the backward at SmolLM2's
    9 query / 3 key-value heads. transformers reads its switch for this at every call, so it is
    set only inside the block; elsewhere (CUDA's kernels would fall back to the math path) and when
    the user set the switch, nothing changes."""
    if device.type != "cpu" or _FORCE_GQA in os.environ:
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


def same_block_inputs(config: Any) -> bool:
    """True when every transformer block of a model gets the same keyword arguments in a forward
    (mask, rotary embeddings, cache): no per-layer attention types (``config.layer_types``, as in
    Gemma's alternating sliding-window and global layers)."""
    types = getattr(config, "layer_types", None)
    return not types or len(set(types)) == 1


def plain_cache(model: nn.Module) -> Any | None:
    """An empty KV cache for ``model`` whose every layer keeps all positions (no sliding window), the
    kind :func:`gather_cache` can lay out anew; ``None`` for a model whose cache would be any other."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    return cache if layers and all(type(layer) is DynamicLayer for layer in layers) else None


def gather_cache(cache: Any, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Rebuild a filled :func:`plain_cache` in place so that batch row ``b``, position ``j`` holds the
    keys and values it held at (``rows[b, j]``, ``cols[b, j]``): a token-tree forward's cache laid out
    as the rows of a padded batch."""
    for layer in cache.layers:  # (P, H, W, d) indexed at (B, s) -> (B, s, H, d) -> (B, H, s, d)
        layer.keys = layer.keys[rows, :, cols].permute(0, 2, 1, 3).contiguous()
        layer.values = layer.values[rows, :, cols].permute(0, 2, 1, 3).contiguous()


# -- masks ----------------------------------------------------------------------------------------
def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, W, W) additive float mask that a Hugging Face decoder takes in place of a padding
    mask: 0 where ``allowed[b, i, j]`` (query ``i`` may attend to key ``j``), the dtype's minimum
    elsewhere. The model then applies it as given (no causal or sliding-window mask of its own)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


# -- generation -----------------------------------------------------------------------------------
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def generation_config(
    model: nn.Module, *, do_sample: bool, max_new_tokens: int, pad_token_id: int | None, **sampling: Any
):
    """A ``GenerationConfig`` from the model's own with loka's settings on top. Greedy decoding
    clears the sampling settings a model ships with (else transformers warns that they are unused)."""
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    if not do_sample:
        for k in _SAMPLING_KEYS:
            setattr(cfg, k, None)
    cfg.do_sample = do_sample
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.pad_token_id = pad_token_id
    for k, v in sampling.items():
        setattr(cfg, k, v)
    return cfg


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    pad_token_id: int | None,
    do_sample: bool = False,
    **sampling: Any,
) -> torch.Tensor:
    """``model.generate`` with loka's keyword conventions: the full sequences (prompt + new tokens)."""
    cfg = generation_config(
        model, do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **sampling
    )
    kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
    return model.generate(input_ids=input_ids, generation_config=cfg, **kw)


# -- loading and saving ---------------------------------------------------------------------------
def drop_gguf_quantizer(model: nn.Module) -> None:
    """Let a model loaded from a GGUF file (de-quantised on load) be saved with ``save_pretrained``:
    transformers refuses while it still carries the GGUF quantizer and its config entry."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_in_model_names(model: nn.Module) -> dict[str, Any]:
    """Keywords for ``model.save_pretrained`` that write the weights under the in-memory names.
    transformers 5 otherwise renames some back to the model type's checkpoint names (GPT-NeoX's
    ``lm_head`` as ``embed_out``) and renames them again on load by model type, which a folder with a
    model type of its own (an export with a modelling file) does not get."""
    params = inspect.signature(model.save_pretrained).parameters
    return {"save_original_format": False} if "save_original_format" in params else {}


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers progress bars inside the block: weight loading and shard writing (its own
    switch) and the GGUF de-quantisation (a plain ``tqdm`` in ``modeling_gguf_pytorch_utils``)."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    gguf_utils = None
    with contextlib.suppress(ImportError):
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was:
            hf_logging.enable_progress_bar()


def tokenizer_class_from_name(name: str) -> type | None:
    """The tokenizer class a ``tokenizer_config.json`` names (``None`` if transformers has none)."""
    try:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name as lookup

        cls = lookup(name or "")
    except Exception:  # an unknown or optional class (its backend not installed)
        return None
    return cls if isinstance(cls, type) else None


def sentencepiece_backend() -> type:
    """transformers' SentencePiece-backed tokenizer class (loads a ``.model`` file directly)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend
