"""LOKA's knowledge codebook at inference: mapping, retrieval and the plugged memory (arXiv
2502.00158).

A codebook holds ``m`` memories ``M_j = W + Δ_j`` of one MLP output matrix ``W`` (layer ``ℓ``),
stored as deltas so that an untrained memory (``Δ_j = 0``) is the base weight exactly. A query is
answered by:

1. the router (:mod:`loka.methods.codebook.router`): if ``P(updated | query) < τ_router`` the base model answers;
2. its embedding ``e(x)`` — the residual stream entering block ``ℓ`` at the query's last token,
   L2-normalised (the layer before the target FFN);
3. retrieval: the memory whose key (cluster centroid) is nearest to ``e(x)``; with LSH mapping only
   the memories of ``e(x)``'s bucket are candidates and an empty bucket means the base model;
4. plug: block ``ℓ``'s MLP output becomes ``M_j a = W a + Δ_j a`` for every position of that query
   (one memory per query, for the whole generation).

:class:`Codebook` installs this as three hooks (model pre-hook: the token ids and mask; block-``ℓ``
pre-hook: the embedding; MLP-out hook: the plug). A forward without cache (a prefill) routes each row
by its whole input, the decode steps that follow keep that choice — so ``model.generate`` on prompts
is routed exactly. Teacher-forced scoring of ``prompt + answer`` must route on the prompt alone:
:func:`routed_groups` does that for loka's scoring and generation functions, which then run each group
under :meth:`Codebook.select`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ArtifactError
from ...hf_compat import is_decode_step
from ...runtime import add_router, remove_router, routers, suspended
from ...trace import inputs_by_batch

if TYPE_CHECKING:
    from ...models.loader import ModelHandle

TOKENIZER_ATTR = "_loka_tokenizer"  # the handle's tokenizer, set on the model by the loader


# -- mapping: K-means for a batch, LSH for sequential updates -------------------------------------
def kmeans(emb: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means (k-means++ init, scikit-learn) on the rows of ``emb``: (labels (n,), centroids (k, d)).
    ``k`` is capped at the number of distinct rows."""
    from sklearn.cluster import KMeans

    x = emb.double().numpy()
    k = max(1, min(int(k), len({tuple(r) for r in x.round(6).tolist()})))
    if k == 1:
        return torch.zeros(len(x), dtype=torch.long), emb.double().mean(0, keepdim=True).float()
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return torch.as_tensor(km.labels_, dtype=torch.long), torch.as_tensor(
        km.cluster_centers_, dtype=torch.float32
    )


def lsh_planes(bits: int, dim: int, seed: int = 0) -> torch.Tensor:
    """SimHash hyperplanes ``R ∈ ℝ^{b×d}``, i.i.d. N(0, 1), fixed by ``seed``."""
    return torch.randn(bits, dim, generator=torch.Generator().manual_seed(seed))


def lsh_hash(emb: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """``h(x) = Σ_j 2^j · 1[R_j·x ≥ 0]`` per row (random hyperplanes ``R``)."""
    bits = (emb.float() @ planes.T.float() >= 0).long()
    return (bits * (2 ** torch.arange(planes.shape[0]))).sum(-1)


# -- conflict and MGDA ---------------------------------------------------------------------------
def cosine(g1: torch.Tensor, g2: torch.Tensor) -> float:
    return float((g1.flatten() @ g2.flatten()) / (g1.norm() * g2.norm() + 1e-12))


def conflict_score(cosines: Sequence[float]) -> float:
    """Fraction of sampled (edit, forget) gradient pairs that conflict, ``cos < 0`` — both gradients
    are of losses to minimise (the frequency form)."""
    return sum(c < 0 for c in cosines) / len(cosines) if cosines else 0.0


def mgda_two(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Two-task min-norm direction on the normalised gradients (Sener & Koltun 2018; LOKA normalises):
    ``α* = clip(((ĝ2 − ĝ1)ᵀ ĝ2) / ‖ĝ1 − ĝ2‖², 0, 1)``, ``d = α* ĝ1 + (1 − α*) ĝ2``."""
    n1, n2 = g1 / (g1.norm() + 1e-12), g2 / (g2.norm() + 1e-12)
    diff = n1 - n2
    den = float((diff * diff).sum())
    alpha = 0.5 if den < 1e-12 else min(1.0, max(0.0, float(((n2 - n1) * n2).sum()) / den))
    return alpha, alpha * n1 + (1 - alpha) * n2


# -- embeddings ----------------------------------------------------------------------------------
@torch.no_grad()
def query_embeddings(
    handle: ModelHandle, layer: int, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``e(x)``: the residual stream entering block ``layer`` at the last token of each text, L2-normalised
    (n, d). Runs the model only up to that block."""
    out = []
    with suspended(handle.model):  # neither routing nor plug for an embedding forward
        for h, mask in inputs_by_batch(handle, handle.spec.block_path(layer), texts, batch_size):
            last = mask.sum(1) - 1
            out.append(F.normalize(h[torch.arange(len(last)), last.to(h.device)].float().cpu(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, handle.config.hidden_size)


def encoder_embeddings(texts: Sequence[str]) -> torch.Tensor:
    """MiniLM sentence embeddings (unit vectors): the ``key_source="encoder"`` alternative to ``e(x)``."""
    from ...encoder import load_encoder

    return load_encoder().encode(list(texts))


def embeddings(handle: ModelHandle, layer: int, texts: Sequence[str], source: str = "llm") -> torch.Tensor:
    """Retrieval embeddings of ``texts`` from ``source`` ("llm": :func:`query_embeddings`; "encoder")."""
    return encoder_embeddings(texts) if source == "encoder" else query_embeddings(handle, layer, texts)


# -- the runtime ---------------------------------------------------------------------------------
class Codebook:
    """An applied LOKA codebook: memories, keys, optional LSH planes and router, and its hooks."""

    def __init__(
        self,
        deltas: torch.Tensor,
        keys: torch.Tensor,
        layer: int,
        block_path: str,
        out_path: str,
        planes: torch.Tensor | None = None,
        buckets: torch.Tensor | None = None,
        router=None,
        router_threshold: float = 0.5,
        key_source: str = "llm",
        items: torch.Tensor | None = None,
        match_threshold: float = 0.0,
    ):
        self.key_source = key_source  # "llm": e(x) from block ℓ's input; "encoder": MiniLM sentence embedding
        self.deltas, self.keys, self.layer = deltas.float(), F.normalize(keys.float(), dim=-1), layer
        self.block_path, self.out_path = block_path, out_path
        self.planes, self.buckets = planes, buckets
        self.router, self.router_threshold = router, router_threshold
        # retrieval embeddings of the updated queries: a query whose cosine to every one of them is below
        # match_threshold is answered by the base model (0: no such gate)
        self.items = F.normalize(items.float(), dim=-1) if items is not None and match_threshold > 0 else None
        self.match_threshold = match_threshold
        self.override: int | None = None  # set by select(): every row uses this memory (-1: none)
        self.enabled = True
        self._rows: torch.Tensor | None = None  # per-row memory ids of the current generation
        self._pending: tuple | None = None  # (last positions, router mask) awaiting the block-ℓ input
        self._handles: list = []

    @property
    def size(self) -> int:
        return int(self.deltas.shape[0])

    # retrieval ------------------------------------------------------------------------------------
    def nearest(self, emb: torch.Tensor) -> torch.Tensor:
        """Memory id per embedding (``-1``: no memory — an LSH bucket without one, or a query no closer than
        ``match_threshold`` in cosine to any updated query)."""
        emb = F.normalize(emb.float(), dim=-1)
        dist = torch.cdist(emb, self.keys)
        if self.planes is not None and self.buckets is not None:
            b = lsh_hash(emb, self.planes)
            allowed = b[:, None] == self.buckets[None, :]
            dist = dist.masked_fill(~allowed, math.inf)
        ids = dist.argmin(-1)
        ok = torch.isfinite(dist.min(-1).values)
        if self.items is not None:
            ok &= (emb @ self.items.T).max(-1).values >= self.match_threshold
        return torch.where(ok, ids, torch.full_like(ids, -1))

    def router_probs(self, texts: Sequence[str]) -> torch.Tensor:
        if self.router is None:
            return torch.ones(len(texts))
        return self.router.probs(list(texts))

    def route(self, texts: Sequence[str], emb: torch.Tensor) -> torch.Tensor:
        """Router, then nearest memory: memory id per query, ``-1`` where the base model answers."""
        ids = self.nearest(emb)
        active = self.router_probs(texts) >= self.router_threshold
        return torch.where(active, ids, torch.full_like(ids, -1))

    def route_encoder(self, texts: Sequence[str]) -> torch.Tensor:
        """Memory id per text with MiniLM keys (``key_source="encoder"``), ``-1`` where the base model
        answers. The router and the key share one encoder pass (:meth:`Router.probs_and_embeddings`):
        the key costs only the encoder's top layer(s) on top of the router's forward."""
        from ...encoder import load_encoder

        if self.router is None:
            return self.nearest(encoder_embeddings(texts))
        probs, emb = self.router.probs_and_embeddings(texts, load_encoder())
        ids = self.nearest(emb)
        return torch.where(probs >= self.router_threshold, ids, torch.full_like(ids, -1))

    @contextlib.contextmanager
    def select(self, memory: int | None) -> Iterator[None]:
        """Force every row of the forwards in the block to use ``memory`` (``-1``: the base model)."""
        old = self.override
        self.override = memory
        try:
            yield
        finally:
            self.override = old

    def groups(self, handle: ModelHandle, prompts: Sequence[str]) -> list[tuple[int, list[int]]]:
        """Prompt indices grouped by the memory each is routed to (router on the prompt text, then the
        nearest memory to the prompt's embedding): ``[(memory id or -1, indices)]``, for
        :func:`loka.runtime.route_groups`."""
        uniq = list(dict.fromkeys(prompts))
        if self.key_source == "encoder":
            ids = self.route_encoder(uniq)
        else:
            active = self.router_probs(uniq) >= self.router_threshold
            ids = torch.full((len(uniq),), -1, dtype=torch.long)
            on = active.nonzero().flatten().tolist()  # retrieval only for the queries the router lets through
            if on:
                ids[on] = self.nearest(embeddings(handle, self.layer, [uniq[i] for i in on], self.key_source))
        of = dict(zip(uniq, ids.tolist()))
        out: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            out.setdefault(of[p], []).append(i)
        return sorted(out.items())

    # hooks ------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Codebook:
        """Install the three hooks and register as the model's router (one codebook per model)."""
        self.remove()  # attached at most once
        add_router(model, self)
        self._rows, self._pending, self.override = None, None, None
        self._handles = [
            model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
            model.get_submodule(self.block_path).register_forward_pre_hook(self._block_pre, with_kwargs=True),
            model.get_submodule(self.out_path).register_forward_hook(self._plug),
        ]
        self._model = model
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        model = getattr(self, "_model", None)
        if model is not None:
            remove_router(model, self)

    def _model_pre(self, module, args, kwargs):
        if not self.enabled or self.override is not None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (
            is_decode_step(kwargs)
            and self._rows is not None
            and len(self._rows) == (len(ids) if ids is not None else -1)
        ):
            return None  # a decode step: keep the prefill's choice
        if ids is None:
            self._rows, self._pending = None, None
            return None
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones_like(ids)
        width = mask.shape[1]
        last = (
            width - 1 - mask.flip(1).long().argmax(1)
        )  # last real token of each row (left or right padding)
        tok = module.__dict__.get(TOKENIZER_ATTR)
        texts = None
        if tok is not None and (self.router is not None or self.key_source == "encoder"):
            texts = [
                tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                for r, m in zip(ids.cpu(), mask.cpu())
            ]
        if self.key_source == "encoder" and texts is not None:
            self._rows, self._pending = self.route_encoder(texts), None
            return None
        if self.router is not None and texts is not None:
            active = self.router_probs(texts) >= self.router_threshold
        else:
            active = torch.ones(len(ids), dtype=torch.bool)
        self._pending = (last.cpu(), active)
        self._rows = None
        return None

    def _block_pre(self, module, args, kwargs):
        if not self.enabled or self.override is not None or self._pending is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        last, active = self._pending
        self._pending = None
        emb = h.detach()[torch.arange(h.shape[0]), last.to(h.device)].float().cpu()
        ids = self.nearest(emb)
        self._rows = torch.where(active, ids, torch.full_like(ids, -1))
        return None

    def _plug(self, module, args, out):
        if not self.enabled:
            return out
        if self.override is not None:
            if self.override < 0:
                return out
            d = self.deltas[self.override].to(out.device)
            return out + (args[0].to(d.dtype) @ d.T).to(out.dtype)
        rows = self._rows
        if rows is None or len(rows) != out.shape[0] or bool((rows < 0).all()):
            return out
        a = args[0]
        extra = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for j in rows.unique().tolist():
            if j < 0:
                continue
            sel = (rows == j).to(out.device)
            extra[sel] = a[sel].float() @ self.deltas[j].to(out.device).T
        return out + extra.to(out.dtype)


def applied_codebooks(model: nn.Module) -> list[Codebook]:
    """The codebooks applied to ``model`` (at most one)."""
    return [r for r in routers(model) if isinstance(r, Codebook)]


def routed_groups(
    handle: ModelHandle, prompts: Sequence[str]
) -> list[tuple[Codebook | None, int | None, list[int]]]:
    """``[(codebook, memory id, indices)]``: :meth:`Codebook.groups` of the applied codebook, or one
    group ``(None, None, all)`` without one."""
    books = applied_codebooks(handle.model)
    if not books or not prompts:
        return [(None, None, list(range(len(prompts))))]
    return [(books[0], j, idx) for j, idx in books[0].groups(handle, list(prompts))]


def selected(book: Codebook | None, memory: int | None):
    """``book.select(memory)``, or a no-op when there is no codebook."""
    return book.select(memory) if book is not None else contextlib.nullcontext()


class LokaModel:
    """A Hugging Face-model-like view of a handle with a LOKA codebook applied.

    ``model(input_ids=…)`` and ``model.generate(…)`` route every row by its whole input (router, then
    the nearest memory) at the prefill and keep that memory for the decode steps; :meth:`score` and
    :meth:`generate_text` route on the prompt alone (teacher-forced answers never influence the
    choice) through loka's scoring functions, so every metric runs on it unchanged.
    """

    def __init__(self, handle: ModelHandle, artifact=None):
        self.handle = handle
        if artifact is not None and getattr(artifact, "runtime", None) not in applied_codebooks(handle.model):
            artifact.apply(handle)
        if not applied_codebooks(handle.model):
            raise ArtifactError(
                "LokaModel needs a LOKA codebook artifact applied to the handle (or passed in)"
            )

    @property
    def codebook(self) -> Codebook:
        return applied_codebooks(self.handle.model)[0]

    @property
    def config(self):
        return self.handle.model.config

    @property
    def device(self):
        return self.handle.device

    def __call__(self, *args, **kwargs):
        return self.handle.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.handle.model.generate(*args, **kwargs)

    def route(self, prompts: Sequence[str]) -> list[int]:
        """The memory each prompt is answered with (``-1``: the base model)."""
        out = [-1] * len(prompts)
        for _, j, idx in routed_groups(self.handle, list(prompts)):
            for i in idx:
                out[i] = -1 if j is None else int(j)
        return out

    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[dict]:
        from ...scoring import target_logprobs

        return target_logprobs(self.handle, list(prompts), list(targets))

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
        from ...scoring import generate

        return generate(self.handle, list(prompts), max_new_tokens=max_new_tokens)
