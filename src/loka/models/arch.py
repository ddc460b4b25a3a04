"""Declarative architecture specs: where each family keeps the pieces editing methods touch.

One small spec per family, selected by the ``model_type`` field of the model's config; methods
never inspect model names. Paths are dotted attribute paths (``{}`` = block index).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # path of the ModuleList of transformer blocks
    mlp_out: str  # path, inside a block, of the MLP output projection (the matrix ROME/MEMIT rewrite)
    mlp: str  # path, inside a block, of the whole MLP
    final_norm: str  # path of the final norm before the unembedding
    unembed: str  # path of the unembedding (LM head)
    embed: str  # path of the token embedding
    transposed: bool = False  # weight stored as (in, out), e.g. GPT-2's Conv1D
    post_mlp_norm: str | None = None  # path, inside a block, of a norm applied to the MLP output (Gemma 2/3)
    n_layers_attr: str = "num_hidden_layers"

    def block_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_out_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def mlp_out_weight(self, layer: int) -> str:
        """Parameter name of the rewritten matrix of ``layer``."""
        return f"{self.mlp_out_path(layer)}.weight"


LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "qwen2", "mistral", "gemma"),
    blocks="model.layers",
    mlp_out="mlp.down_proj",
    mlp="mlp",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
)
GEMMA3 = ArchSpec(
    family="gemma3",
    model_types=("gemma3_text", "gemma2"),
    blocks="model.layers",
    mlp_out="mlp.down_proj",
    mlp="mlp",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    post_mlp_norm="post_feedforward_layernorm",
)
GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    mlp_out="mlp.c_proj",
    mlp="mlp",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.wte",
    transposed=True,
    n_layers_attr="n_layer",
)
GPTJ = ArchSpec(
    family="gptj",
    model_types=("gptj",),
    blocks="transformer.h",
    mlp_out="mlp.fc_out",
    mlp="mlp",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.wte",
    n_layers_attr="n_layer",
)
NEOX = ArchSpec(
    family="gpt_neox",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    mlp_out="mlp.dense_4h_to_h",
    mlp="mlp",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    embed="gpt_neox.embed_in",
)

SPECS: tuple[ArchSpec, ...] = (LLAMA, GEMMA3, GPT2, GPTJ, NEOX)


def spec_for(config) -> ArchSpec:
    """The spec whose ``model_types`` lists ``config.model_type``; a clear error otherwise."""
    mt = getattr(config, "model_type", None)
    for spec in SPECS:
        if mt in spec.model_types:
            return spec
    known = sorted(t for s in SPECS for t in s.model_types)
    raise ModelError(
        f"model_type {mt!r} has no architecture spec; supported model_type values: {', '.join(known)}. "
        "Add an ArchSpec in loka/models/arch.py for a new family."
    )
