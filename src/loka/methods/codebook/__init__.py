"""LOKA: edit and forget at once with a knowledge codebook (arXiv 2502.00158).

* :mod:`.method` — the method ``loka``: mapping (K-means or LSH), the conflict score that picks shared
  or task-specific memories (MGDA), memory training, sequential codebook folders;
* :mod:`.codebook` — the codebook at inference: retrieval, the plugged memory, routing for scoring;
* :mod:`.router` — the MiniLM router with its confidence threshold.
"""

from .codebook import (
    Codebook,
    LokaModel,
    applied_codebooks,
    conflict_score,
    encoder_embeddings,
    kmeans,
    lsh_hash,
    mgda_two,
    query_embeddings,
    routed_groups,
)
from .method import CodebookFolder, Loka, LokaHParams, state_from_artifact
from .router import Router, train_router

__all__ = [
    "Codebook",
    "CodebookFolder",
    "Loka",
    "LokaHParams",
    "LokaModel",
    "Router",
    "applied_codebooks",
    "conflict_score",
    "encoder_embeddings",
    "kmeans",
    "lsh_hash",
    "mgda_two",
    "query_embeddings",
    "routed_groups",
    "state_from_artifact",
    "train_router",
]
