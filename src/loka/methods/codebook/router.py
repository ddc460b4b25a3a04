"""LOKA's router: a binary classifier fine-tuned from the MiniLM encoder (arXiv 2502.00158).

Positives are the updated queries (edit ∪ forget), negatives the retained ones plus generic text;
the codebook is used only when ``P(updated | query) ≥ τ``. The seed fine-tunes a BERT classifier; we
fine-tune the top ``layers`` transformer layers of all-MiniLM-L6-v2 (shipped by a package, see
MODELS.md) with a linear head on the mean-pooled, normalised embedding, so the artifact stores only
the trained layers and the head (≈ 1.8 M parameters a layer) rather than a whole encoder.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...encoder import load_encoder
from ...errors import DivergenceError
from ...fastlinear import PackedLinears

PREFIX = "router."


def _pool(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens, L2-normalised (sentence-transformers' pooling for MiniLM)."""
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


class Router:
    def __init__(self, encoder_model: nn.Module, tokenizer, head: nn.Linear, trained: list[str]):
        self.model, self.tokenizer, self.head, self.trained = encoder_model, tokenizer, head, trained
        self._packed = PackedLinears()  # prepacked weights for inference (re-packed if training changes them)

    def _logits(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = self.model(**enc).last_hidden_state
        return self.head(_pool(h, enc["attention_mask"].unsqueeze(-1).to(h.dtype))).squeeze(-1)

    @torch.no_grad()
    def probs(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``P(updated | text)`` per text."""
        self.model.eval()
        with self._packed.active(self.model):
            out = [
                torch.sigmoid(self._logits(texts[i : i + batch_size]))
                for i in range(0, len(texts), batch_size)
            ]
        return torch.cat(out) if out else torch.zeros(0)

    def first_trained_layer(self) -> int | None:
        """Index of the lowest fine-tuned encoder layer (the layers below it are the base encoder's)."""
        idx = [int(n.split(".")[2]) for n in self.trained if n.startswith("encoder.layer.")]
        return min(idx) if idx and len(idx) == len(self.trained) else None

    @torch.no_grad()
    def probs_and_embeddings(
        self, texts: Sequence[str], base, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P(updated | text)`` and the base encoder's sentence embeddings in one pass.

        The router fine-tunes only the top encoder layers, so below them its states are the base
        encoder's: the embeddings continue the router's forward from there through the base's own
        top layers instead of re-running the whole encoder (the same numbers as ``base.encode``)."""
        first = self.first_trained_layer()
        if first is None:
            return self.probs(texts, batch_size), base.encode(list(texts), batch_size)
        from ...trace import block_output, capture

        path = f"encoder.layer.{first}"
        top = base.model.encoder.layer[first:]
        probs, embs = [], []
        self.model.eval()
        with self._packed.active(self.model), base._packed.active(base.model):
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                )
                with capture(self.model, [path], outputs=False, kwargs=True) as rec:
                    h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                probs.append(torch.sigmoid(self.head(_pool(h, m)).squeeze(-1)))
                x, kw = rec[path].input, dict(rec[path].kwargs)
                args = kw.pop("__args__", ())
                kw.pop("hidden_states", None)
                for layer in top:
                    x = block_output(layer(x, *args, **kw))
                embs.append(_pool(x, m))
        if not probs:
            return torch.zeros(0), torch.zeros(0, base.dim)
        return torch.cat(probs), torch.cat(embs)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained encoder parameters and the head, for the artifact."""
        params = dict(self.model.named_parameters())
        out = {PREFIX + "enc." + n: params[n].detach().clone().contiguous() for n in self.trained}
        out[PREFIX + "head.weight"] = self.head.weight.detach().clone().contiguous()
        out[PREFIX + "head.bias"] = self.head.bias.detach().clone().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Router | None:
        """The router stored in an artifact's tensors (``None`` when it has none)."""
        if PREFIX + "head.weight" not in tensors:
            return None
        base = load_encoder()
        model = copy.deepcopy(base.model).eval()
        trained = []
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith(PREFIX + "enc."):
                    n = k[len(PREFIX + "enc.") :]
                    model.get_parameter(n).copy_(v)
                    trained.append(n)
        head = nn.Linear(base.dim, 1)
        with torch.no_grad():
            head.weight.copy_(tensors[PREFIX + "head.weight"])
            head.bias.copy_(tensors[PREFIX + "head.bias"])
        return cls(model, base.tokenizer, head, trained)


def train_router(
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    layers: int = 1,
    epochs: int = 8,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    progress=None,
) -> tuple[Router, dict]:
    """Fine-tune the top ``layers`` MiniLM layers and a linear head with class-balanced BCE
    (positives weighted by ``#neg / #pos``); returns the router and its training accuracy."""
    base = load_encoder()
    torch.manual_seed(seed)
    model = copy.deepcopy(base.model)
    n_layers = len(model.encoder.layer)
    layers = max(0, min(layers, n_layers))
    trained = [
        n
        for n, _ in model.named_parameters()
        if any(n.startswith(f"encoder.layer.{i}.") for i in range(n_layers - layers, n_layers))
    ]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    head = nn.Linear(base.dim, 1)
    router = Router(model, base.tokenizer, head, trained)
    texts = list(positives) + list(negatives)
    labels = torch.tensor([1.0] * len(positives) + [0.0] * len(negatives))
    pos_weight = torch.tensor(max(1.0, len(negatives) / max(1, len(positives))))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
            {"params": list(head.parameters()), "lr": lr * 100},
        ],
        weight_decay=0.01,
    )
    rng = random.Random(seed)
    order = list(range(len(texts)))
    losses = []
    model.train()
    for _ in range(epochs):
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            logits = router._logits([texts[j] for j in idx])
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx], pos_weight=pos_weight)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"router: the loss became {float(loss)} while training; lower router_lr"
                )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        if progress is not None:
            progress.set_postfix(router_loss=f"{losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pr = router.probs(texts)
    acc = float(((pr >= 0.5).float() == labels).float().mean())
    return router, {
        "positives": len(positives),
        "negatives": len(negatives),
        "layers": layers,
        "epochs": epochs,
        "train_accuracy": acc,
        "final_loss": losses[-1] if losses else None,
    }
