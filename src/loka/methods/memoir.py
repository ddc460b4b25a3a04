"""MEMOIR: a sparse residual memory beside one MLP output matrix, written and read through
prompt-dependent masks (Wang et al. 2025, arXiv 2506.07899).

The edited matrix (input width ``D``, output width ``d``; ``down_proj`` / ``c_proj`` / ``fc_out`` of
``layer``) computes, at every position of a sequence,

    y = W0 x + W_m (x ⊙ m),

where ``W_m ∈ R^{d×D}`` starts at zero and ``m ∈ {0,1}^D`` (``k`` ones) is one mask for the whole
sequence. Only ``W_m`` is ever trained; the weights never change.

**Mask (TopHash).** From the prompt's inputs ``x_t`` of the matrix: ``a = mean_t x_t − b̄``
(``prompt_feature`` "mean_decentered"; "mean" leaves out ``b̄``, "last" takes the last prompt token),
``I`` = the ``k`` largest ``|a_i|``, and ``m`` is 1 on ``π(I)`` for a fixed seeded permutation ``π``
of the ``D`` columns (so the memory reads permuted columns; overlaps between masks are unchanged). The
background ``b̄`` is the same feature averaged over :data:`BACKGROUND` (everyday sentences bundled with
loka, never evaluation prompts), computed once on the unedited model and kept with the memory.
``top_k`` below 1 is a fraction of ``D``, from 1 on a count.

**Writing** (requests one at a time, as the paper): the bare edit prompt gives the mask; the prompt and
``n_prefixes`` copies behind random model-generated prefixes (half 5, half 10 tokens,
:func:`~loka.methods.templates.context_templates`) all use it. The loss is the mean over the copies of
each one's mean target-token NLL; SGD (``lr``, ``weight_decay``, gradient norm clipped to
``max_grad_norm``) for at most ``n_iter`` steps, stopping once the loss is ≤ ``early_stop_loss``.
Because ``x ⊙ m`` is zero off the mask, only the mask's ``k`` columns of ``W_m`` are trained. The mask
is stored (an exact duplicate of a stored one is not stored twice).

**Retrieval** (inference): the query's mask ``m_q`` from its prompt, overlaps
``r_e = |m_q ∧ m_e| / k`` with every stored mask, ``e* = argmax r_e``; if ``r_{e*} ≥ τ`` the memory
answers with the *stored* mask ``m_{e*}``, else ``W_m`` is off and the output is the base model's,
bit for bit. A forward without a cache (a prefill) computes one mask per row from that row's real
tokens; the decode steps of a cached generation keep the prefill's choice (told apart with
:func:`loka.hf_compat.is_decode_step`, as LOKA's codebook does). Teacher-forced scoring of
``prompt + answer`` rows must decide on the prompt alone: the memory registers as the model's router
(:mod:`loka.runtime`), so loka's scoring groups prompts by the stored mask they retrieve and runs each
group with it (hence MEMOIR and LOKA's codebook cannot be applied to one model together).

**Weight decay only on the written columns** (the paper decays all of ``W_m`` at every step): an edit
then changes exactly the columns its mask reads, so a batch's part of ``W_m`` is stored as those
columns (about ``k/D`` of the matrix: ~1 MB instead of 3.5 MB per single edit on SmolLM2), and earlier
edits on other columns no longer shrink with every later edit (the paper's factor is ~0.74 after 1,000
edits of 30 steps). Columns shared with earlier edits still decay while they are trained.

**Sequential, stateful.** The :class:`~loka.state.EditState` holds, per batch ``b`` (tags ``@b``, so
:meth:`~loka.state.EditState.truncate` rolls back exactly): the batch's part of ``W_m`` (its columns
and their change), its stored masks, and (in the batch that made them) the background, ``π`` and the
settings. ``W_m`` is the sum of the parts (:func:`memory_matrix`); each batch trains on top of it.

**Artifacts** (kind ``memory``) hold their batch's part (``memoir.delta`` d×C, ``memoir.cols``), its
masks (``memoir.masks``, column indices), ``memoir.background`` and ``memoir.perm``. Several applied
MEMOIR artifacts on one module act as ONE memory: the first installs a shared runtime (hooks + router),
each registers its part with it, ``W_m`` is the sum of the applied parts (in batch order) and the best
overlap over all their masks decides; reverting one removes exactly its part, the last removes the
hooks. While a method trains, the applied memory is switched off, so nothing counts twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArtifactError, ConfigError, LokaError
from ..forgetting import losses as L
from ..hf_compat import is_decode_step
from ..models.hooked import ExportedHook
from ..requests import fill_subject
from ..runtime import add_router, remove_router, routers
from ..state import EditState
from ..trace import capture, inputs_by_batch, run_until_stopped
from .base import (
    MAX_ABS_VALUE,
    HParams,
    Layer,
    MemoryMethod,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    UnitFloat,
    check_loss,
    check_update,
    register,
)
from .locate.prompts import answer_prompts
from .locate.replay import Replay
from .templates import context_templates
from .wise import OUT_OF_SCOPE

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

FEATURES = ("mean_decentered", "mean", "last")
RUNTIME_ATTR = "_loka_memoir"  # the model's MemoirRuntime while a MEMOIR artifact is applied
FIX = "lower lr (or max_grad_norm) in the memoir hyperparameters"

#: Unrelated prompts for the background feature ``b̄``: WISE's everyday sentences, then short generic
#: openings. Bundled text only: the evaluation's prompts (neighbourhood, paraphrase) are never used.
BACKGROUND = list(OUT_OF_SCOPE) + [
    "The book on the table belongs to my sister.",
    "It started to rain just as we reached the station.",
    "The new library opens at nine in the morning.",
    "Most birds build their nests in early spring.",
    "The soup needs a little more salt and pepper.",
    "We watched a film about the history of flight.",
    "The bridge was closed for repairs last week.",
    "Her favourite colour has always been green.",
    "The bakery on the corner sells fresh bread.",
    "A strong wind blew the leaves across the yard.",
    "The teacher asked the students to open their books.",
    "The price of coffee rose again this year.",
    "The concert was cancelled because of the storm.",
    "He forgot his umbrella at the office.",
    "The road winds through hills and small villages.",
    "Our neighbours have a large brown dog.",
    "The exam will take place in the main hall.",
    "The hotel offers a view of the harbour.",
    "She learned to swim when she was six.",
    "The old clock in the hallway stopped at noon.",
    "Fresh vegetables are sold at the Saturday market.",
    "The plane landed twenty minutes early.",
    "They painted the kitchen a pale yellow.",
    "The match ended in a draw after extra time.",
    "A cup of tea helps me relax in the evening.",
    "The printer on the second floor is out of paper.",
    "Snow covered the mountains by late October.",
    "The shop will be closed for the holidays.",
    "He writes a letter to his grandmother every month.",
    "The garden is full of roses in June.",
    "The bus was crowded on the way home.",
    "Please send me the report before Friday.",
    "The lake freezes over in the coldest winters.",
    "The kids built a sandcastle on the beach.",
    "The recipe calls for two cups of flour.",
    "A small boat drifted slowly down the river.",
    "The lecture was about the planets of the solar system.",
    "Our flight was delayed by two hours.",
    "The dentist appointment is on Tuesday morning.",
    "The street lights turn on at dusk.",
    "My phone battery runs out by the evening.",
    "The farmer planted wheat in the north field.",
    "The town hall was built more than a century ago.",
    "She keeps her keys in a bowl by the door.",
    "The festival attracts visitors from far away.",
    "A good night's sleep improves concentration.",
    "The cat chased a butterfly around the garden.",
    "The shelves were stacked with old newspapers.",
    "The orchestra rehearsed for three hours.",
    "We ordered pizza after the long meeting.",
    "The fence around the field needs painting.",
    "The tide comes in twice a day.",
    "He fixed the bicycle with a borrowed wrench.",
    "The restaurant serves breakfast until eleven.",
    "The wind turbines turned slowly on the hill.",
    "The students handed in their essays on time.",
    "A thick fog settled over the valley.",
    "The baby slept through the whole journey.",
    "Our internet connection was slow all day.",
    "The painting hangs above the fireplace.",
    "The parade passed along the main street.",
    "She planted tomatoes along the sunny wall.",
    "The meeting notes were shared by email.",
    "The stadium holds about forty thousand people.",
    "A loud noise woke everyone in the house.",
    "The cake should bake for forty minutes.",
    "Traffic was heavy on the motorway this morning.",
    "The puppy learned to sit in a single day.",
    "The hikers reached the summit before noon.",
    "A new café opened next to the cinema.",
    "The report covers sales from the last quarter.",
    "The candles flickered in the draught.",
    "The ferry crosses the bay every hour.",
    "He always reads the newspaper at breakfast.",
    "The windows were cleaned on Wednesday.",
    "The choir sang in the old stone church.",
    "The apples in the orchard are almost ripe.",
    "Our holiday photos are on the laptop.",
    "The elevator is out of order today.",
    "The runners gathered at the starting line.",
    "The soup was too hot to eat right away.",
    "The radio played old songs all afternoon.",
    "The library charges a small fee for late books.",
    "The pond behind the school is full of frogs.",
]


@dataclass
class MemoirHParams(HParams):
    layer: Layer = 24
    top_k: PosFloat = 0.28  # mask size: below 1 a fraction of the input width D, from 1 on a count
    tau: UnitFloat = 0.4  # irr_threshold: the memory answers when the best overlap is >= tau
    prompt_feature: Literal["mean_decentered", "mean", "last"] = "mean_decentered"
    lr: PosFloat = 1.0
    weight_decay: NonNegFloat = 1e-5
    max_grad_norm: PosFloat = 1.0
    n_iter: PosInt = 30
    early_stop_loss: NonNegFloat = 0.02
    n_prefixes: NonNegInt = 10  # copies of the edit behind random model-generated prefixes
    seed: int = 0


def mask_width(top_k: float, width: int) -> int:
    """``k``: ``top_k`` as a fraction of ``width`` (below 1) or a count (from 1 on), checked."""
    if not top_k > 0:
        raise LokaError(f"memoir: hyperparameter top_k must be > 0, got {top_k}")
    if top_k < 1:
        k = max(1, round(top_k * width))
    elif float(top_k).is_integer():
        k = int(top_k)
    else:
        raise LokaError(
            f"memoir: hyperparameter top_k must be a fraction below 1 or a whole count, got {top_k}"
        )
    if k > width:
        raise LokaError(f"memoir: top_k {k} exceeds the matrix's input width {width}")
    return k


def permutation(width: int, seed: int) -> torch.Tensor:
    """TopHash's fixed random permutation ``π`` of the ``width`` columns."""
    return torch.randperm(width, generator=torch.Generator().manual_seed(seed))


def prompt_features(x: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """One feature per row of ``x`` (B, T, D): the mean over the row's real tokens (``mask`` (B, T);
    all when ``None``) or, for ``kind`` "last", its last real token (left or right padding)."""
    x = x.float()
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    m = mask.to(x.device)
    if kind == "last":
        last = m.shape[1] - 1 - m.flip(1).long().argmax(1)
        return x[torch.arange(x.shape[0], device=x.device), last]
    w = m.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def mask_columns(
    features: torch.Tensor, background: torch.Tensor, perm: torch.Tensor, k: int, kind: str
) -> torch.Tensor:
    """TopHash: the (B, k) columns ``π(TopK(|a|))`` of each feature row, sorted."""
    a = features.float()
    if kind == "mean_decentered":
        a = a - background.to(a.device, a.dtype)
    idx = a.abs().topk(k, dim=-1).indices
    return perm.to(idx.device)[idx].sort(dim=-1).values


def _dense(cols: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(cols.shape[0], width, dtype=torch.float32)
    if cols.numel():
        out.scatter_(1, cols.cpu(), 1.0)
    return out


def best_overlap(query: torch.Tensor, stored: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query mask (B, k columns): the best overlap ``|m_q ∧ m_e| / k`` with the stored masks
    (E, k) and its index (``-1`` and 0 when none is stored)."""
    if stored.shape[0] == 0:
        return torch.zeros(query.shape[0]), torch.full((query.shape[0],), -1, dtype=torch.long)
    r = (_dense(query, width) @ _dense(stored, width).T) / query.shape[1]
    best, idx = r.max(1)
    return best, idx


def _assemble(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], d_out: int, width: int) -> torch.Tensor:
    """``W_m`` (d, D) from (delta (d, C), cols (C,)) parts, summed in the order given in float64."""
    w = torch.zeros(d_out, width, dtype=torch.float64)
    for delta, cols in parts:
        w[:, cols.long()] += delta.double()
    return w.float()


# -- the runtime: one per model, holding one memory per hooked module ------------------------------
@dataclass
class _Part:
    key: int
    batch: int
    delta: torch.Tensor  # (d, C)
    cols: torch.Tensor  # (C,) long
    masks: torch.Tensor  # (E, k) long
    tau: float


class ModuleMemory:
    """The MEMOIR memory of one module: the sum of its applied parts and all their masks."""

    def __init__(self, background: torch.Tensor, perm: torch.Tensor, k: int, kind: str, owner: str):
        self.background, self.perm, self.k, self.kind, self.owner = background, perm, k, kind, owner
        self.width = int(background.numel())
        self.parts: list[_Part] = []
        self._rebuild()

    def compatible(self, background: torch.Tensor, perm: torch.Tensor, k: int, kind: str) -> bool:
        return (
            k == self.k
            and kind == self.kind
            and torch.equal(perm, self.perm)
            and background.shape == self.background.shape
            and torch.allclose(background, self.background, rtol=1e-4, atol=1e-5)
        )

    def _rebuild(self) -> None:
        parts = sorted(self.parts, key=lambda p: (p.batch, p.key))
        d_out = parts[0].delta.shape[0] if parts else 0
        self.W = _assemble([(p.delta, p.cols) for p in parts], d_out, self.width)
        self.masks = (
            torch.cat([p.masks for p in parts]) if parts else torch.zeros(0, self.k, dtype=torch.long)
        )
        self.taus = torch.tensor([p.tau for p in parts for _ in range(p.masks.shape[0])], dtype=torch.float32)
        self._dense = _dense(self.masks, self.width)

    def add(self, part: _Part) -> None:
        if self.parts and part.delta.shape[0] != self.parts[0].delta.shape[0]:
            raise ArtifactError(
                f"memoir: a part of width {part.delta.shape[0]} does not fit the applied memory's "
                f"{self.parts[0].delta.shape[0]}"
            )
        self.parts.append(part)
        self._rebuild()

    def drop(self, key: int) -> None:
        self.parts = [p for p in self.parts if p.key != key]
        self._rebuild()

    def retrieve(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The stored mask each row of ``x`` (B, T, D) retrieves from its tokens, ``-1`` for none."""
        if self.masks.shape[0] == 0:
            return torch.full((x.shape[0],), -1, dtype=torch.long)
        q = mask_columns(prompt_features(x, mask, self.kind), self.background, self.perm, self.k, self.kind)
        r = (_dense(q, self.width) @ self._dense.T) / self.k
        best, idx = r.max(1)
        return torch.where(best >= self.taus[idx], idx, torch.full_like(idx, -1))

    def add_output(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``out + W_m (x ⊙ m_e)`` on the rows that retrieved mask ``e``; other rows untouched."""
        if bool((rows < 0).all()):
            return out
        out = out.clone()
        rows = rows.to(out.device)
        for e in rows.unique().tolist():
            if e < 0:
                continue
            sel = rows == e
            cols = self.masks[e].to(x.device)
            w = self.W[:, self.masks[e]].to(x.device)
            out[sel] = out[sel] + (x[sel][..., cols].float() @ w.T).to(out.dtype)
        return out


class MemoirRuntime:
    """The hooks of every applied MEMOIR artifact of one model, and its router for loka's scoring.

    One model pre-hook notes each forward's attention mask and whether it is a decode step; one
    forward hook per memory module retrieves (prefill) or keeps (decode) each row's stored mask and adds
    the memory's output. :meth:`groups` / :meth:`select` route teacher-forced rows on their prompts."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.memories: dict[str, ModuleMemory] = {}
        self.enabled = True
        self.override: dict[str, int] | None = None
        self._ctx: tuple | None = None
        self._rows: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, Any] = {}
        self._groups: dict[int, dict[str, int]] = {}
        self._next = 0
        if routers(model):
            raise ArtifactError(
                "a MEMOIR memory cannot be applied while another router (LOKA's codebook) is applied to "
                "this model: revert that first"
            )
        add_router(model, self)
        self._model_hooks = [
            model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
            model.register_forward_hook(self._model_post),
        ]
        model.__dict__[RUNTIME_ATTR] = self

    # -- parts -----------------------------------------------------------------------------------
    def add_part(self, path: str, art_id: str, tensors: dict, extra: dict) -> Any:
        background = tensors["memoir.background"].float()
        perm = tensors["memoir.perm"].round().long()
        k, kind = int(extra["top_k"]), str(extra["prompt_feature"])
        mem = self.memories.get(path)
        if mem is None:
            mem = ModuleMemory(background, perm, k, kind, art_id)
        elif not mem.compatible(background, perm, k, kind):
            raise ArtifactError(
                f"artifact {art_id}: its MEMOIR memory on {path} was made with other settings (top_k, "
                f"prompt_feature, seed or background) than the applied {mem.owner}; MEMOIR artifacts act as "
                "one memory only when made with the same settings on the same model"
            )
        delta, cols, masks = tensors["memoir.delta"], tensors["memoir.cols"], tensors["memoir.masks"]
        width = background.numel()
        if (
            delta.dim() != 2
            or delta.shape[1] != cols.numel()
            or masks.dim() != 2
            or masks.shape[1] != k
            or perm.numel() != width
            or not all(bool(((t >= 0) & (t < width)).all()) for t in (cols, masks, perm))
        ):
            raise ArtifactError(f"MEMOIR artifact {art_id}: its tensors do not fit together; it is corrupt")
        part = _Part(
            self._next,
            int(extra.get("batch", 0)),
            delta.float(),
            cols.round().long(),
            masks.round().long(),
            float(extra["tau"]),
        )
        self._next += 1
        mem.add(part)
        if path not in self.memories:
            self.memories[path] = mem
            self._hooks[path] = self.model.get_submodule(path).register_forward_hook(self._hook(path))
        self._rows.clear()
        return _Attached(self, path, part.key)

    def drop_part(self, path: str, key: int) -> None:
        mem = self.memories.get(path)
        if mem is None:
            return
        mem.drop(key)
        self._rows.clear()
        if not mem.parts:
            self._hooks.pop(path).remove()
            del self.memories[path]
        self.close_if_empty()

    def close_if_empty(self) -> None:
        """Remove the hooks and the router once no part is left."""
        if not self.memories:
            for h in self._model_hooks:
                h.remove()
            self._model_hooks = []
            remove_router(self.model, self)
            self.model.__dict__.pop(RUNTIME_ATTR, None)

    # -- hooks -----------------------------------------------------------------------------------
    def _model_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"]
        shape = tuple(ids.shape[:2]) if ids is not None and ids.dim() >= 2 else None
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != shape:
            mask = None  # a 4-D or packed mask: every position counts
        self._ctx = (shape, mask, is_decode_step(kwargs))

    def _model_post(self, module, args, out):
        self._ctx = None

    def _hook(self, path: str):
        def hook(module, args, out):
            if not self.enabled or not torch.is_tensor(out):
                return out
            x = args[0]
            if x.dim() != 3:
                return out
            mem = self.memories[path]
            B, T = x.shape[:2]
            if self.override is not None:
                rows = torch.full((B,), self.override.get(path, -1), dtype=torch.long)
            else:
                ctx = self._ctx if self._ctx is not None and self._ctx[0] == (B, T) else None
                prev = self._rows.get(path)
                if ctx is not None and ctx[2] and prev is not None and len(prev) == B:
                    rows = prev  # a decode step: keep the prefill's choice
                else:
                    with torch.no_grad():
                        rows = mem.retrieve(x.detach(), ctx[1] if ctx is not None else None)
                    self._rows[path] = rows
            return mem.add_output(x, out, rows)

        return hook

    # -- routing for loka's scoring (loka.runtime.Router) ------------------------------------------
    def route(self, handle: ModelHandle, prompts: Sequence[str], batch_size: int = 32) -> list[dict]:
        """The stored mask each prompt retrieves, per module (``-1``: memory off)."""
        paths = [n for n, _ in self.model.named_modules() if n in self.memories]
        tok = handle.tokenizer
        old_side, old_override = tok.padding_side, self.override
        tok.padding_side, self.override = "right", None
        out: list[dict] = []
        try:
            for i in range(0, len(prompts), batch_size):
                enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
                self._rows.clear()
                with torch.no_grad(), capture(self.model, [], stop_after=paths[-1]):
                    run_until_stopped(
                        lambda enc=enc: self.model(
                            **{k: v.to(handle.device) for k, v in enc.items()}, use_cache=False
                        )
                    )
                n = enc["input_ids"].shape[0]
                rows = {p: self._rows.get(p, torch.full((n,), -1, dtype=torch.long)) for p in paths}
                out += [{p: int(rows[p][j]) for p in paths} for j in range(n)]
        finally:
            tok.padding_side, self.override = old_side, old_override
            self._rows.clear()
            self._ctx = None
        return out

    def groups(self, handle: ModelHandle, prompts: Sequence[str]) -> list[tuple[int, list[int]]]:
        """Prompt indices grouped by the stored masks they retrieve: ``[(group id or -1, indices)]``."""
        if not self.enabled or not prompts:
            return [(-1, list(range(len(prompts))))]
        uniq = list(dict.fromkeys(prompts))
        choice = dict(zip(uniq, self.route(handle, uniq)))
        keys: dict[tuple, int] = {}
        out: dict[int, list[int]] = {}
        self._groups = {}
        for i, p in enumerate(prompts):
            sel = choice[p]
            key = tuple(sorted(sel.items()))
            if all(v < 0 for v in sel.values()):
                gid = -1
            else:
                gid = keys.setdefault(key, len(keys))
                self._groups[gid] = sel
            out.setdefault(gid, []).append(i)
        return sorted(out.items())

    @contextlib.contextmanager
    def select(self, memory: int) -> Iterator[None]:
        """Run every row of the forwards in the block with group ``memory``'s masks (``-1``: off)."""
        old = self.override
        self.override = dict(self._groups.get(memory, {})) if memory >= 0 else {}
        try:
            yield
        finally:
            self.override = old


class _Attached:
    """The handle :meth:`Memoir.attach` returns: ``remove()`` takes exactly this artifact's part out."""

    def __init__(self, runtime: MemoirRuntime, path: str, key: int):
        self.runtime, self.path, self.key = runtime, path, key

    def remove(self) -> None:
        self.runtime.drop_part(self.path, self.key)


def runtime_of(model: nn.Module) -> MemoirRuntime | None:
    """The model's MEMOIR runtime, while any MEMOIR artifact is applied."""
    return model.__dict__.get(RUNTIME_ATTR)


@contextlib.contextmanager
def memory_off(model: nn.Module) -> Iterator[None]:
    """Run with the applied MEMOIR memory (if any) switched off."""
    rt = runtime_of(model)
    if rt is None:
        yield
        return
    old = rt.enabled
    rt.enabled = False
    try:
        yield
    finally:
        rt.enabled = old


# -- the state -----------------------------------------------------------------------------------
def _names(layer: int) -> dict[str, str]:
    p = f"memoir.L{layer}."
    return {k: p + k for k in ("delta", "cols", "masks", "background", "perm", "setup")}


def _first(state: EditState, name: str) -> torch.Tensor | None:
    got = state.batch_tensors(name)
    return got[0] if got else None


def memory_matrix(state: EditState, layer: int) -> torch.Tensor | None:
    """``W_m`` of ``layer`` as the state holds it: the sum of its batches' parts (``None``: no memory)."""
    n = _names(layer)
    bg = _first(state, n["background"])
    if bg is None:
        return None
    deltas, cols = state.batch_tensors(n["delta"]), state.batch_tensors(n["cols"])
    d_out = deltas[0].shape[0] if deltas else 0
    return _assemble(list(zip(deltas, cols)), d_out, bg.numel())


def stored_masks(state: EditState, layer: int, k: int) -> torch.Tensor:
    """Every mask the state stores for ``layer`` (E, k), in batch order."""
    got = state.batch_tensors(_names(layer)["masks"])
    return torch.cat(got) if got else torch.zeros(0, k, dtype=torch.long)


# -- the method ----------------------------------------------------------------------------------
def _features(
    handle: ModelHandle, path: str, texts: Sequence[str], kind: str, batch_size: int = 32
) -> torch.Tensor:
    """The prompt feature of each text (n, D) at the input of module ``path``, one right-padded batch of
    texts at a time."""
    return torch.cat(
        [prompt_features(x, mask, kind).cpu() for x, mask in inputs_by_batch(handle, path, texts, batch_size)]
    )


def _prefixes(handle: ModelHandle, n: int, seed: int) -> list[str]:
    """``n`` random model-generated prefix templates (``"<text>. {}"``): half of 5 tokens, half of 10."""
    if n == 0:
        return []
    per = math.ceil(n / 10)
    short = context_templates(handle, n_per_prefix=per, length=5, seed=seed)[1:]
    long = context_templates(handle, n_per_prefix=per, length=10, seed=seed)[1:]
    return short[: n - n // 2] + long[: n // 2]


@register
class Memoir(MemoryMethod):
    name = "memoir"
    hparams_cls = MemoirHParams
    index_tensors = frozenset({"memoir.perm", "memoir.masks", "memoir.cols"})
    stateful = True

    @classmethod
    def export_hooks(cls, model, applied: list) -> list[ExportedHook]:
        """One exported hook per memory module: the applied parts summed into ``W_m`` and all their masks
        (the modelling file's ``memoir`` hook retrieves and adds as :class:`MemoirRuntime` does)."""
        rt = runtime_of(model)
        if rt is None:
            return []
        out = []
        for path, mem in rt.memories.items():
            ids = [a.id for a, h in applied if getattr(h, "path", None) == path]
            tensors = {
                "W": mem.W,
                "masks": mem.masks,
                "taus": mem.taus,
                "background": mem.background,
                "perm": mem.perm,
            }
            settings = {"top_k": mem.k, "prompt_feature": mem.kind, "width": mem.width}
            out.append(ExportedHook("memoir", path, tensors, settings, ids, rt._hooks[path].id))
        return out

    @classmethod
    def attach(cls, model, artifact) -> _Attached:
        """Register ``artifact``'s part with the model's MEMOIR runtime (created by the first part)."""
        x = artifact.manifest.get("extra", {})
        rt = runtime_of(model) or MemoirRuntime(model)
        try:
            return rt.add_part(x["module"], artifact.id, artifact.deltas, x)
        except KeyError as e:
            raise ArtifactError(f"MEMOIR artifact {artifact.id} lacks {e}; it is corrupt") from None
        finally:
            rt.close_if_empty()  # a first part that failed leaves no hooks behind

    def run(self, handle: ModelHandle, requests, hp: MemoirHParams, progress=None, state=None):
        layer = handle.check_layer(hp.layer, "layer")
        if hp.n_iter < 1:
            raise LokaError(f"memoir: hyperparameter n_iter must be >= 1, got {hp.n_iter}")
        edits = list(requests.edits) if hasattr(requests, "edits") else list(requests)
        if not edits:
            raise LokaError("memoir: nothing to edit (MEMOIR writes edit requests only)")
        state = state if state is not None else EditState()
        path = handle.spec.mlp_out_path(layer)
        module = handle.mlp_out(layer)
        d_out, width = handle.weight(layer).shape
        k = mask_width(hp.top_k, width)
        names = _names(layer)
        with memory_off(handle.model):  # the applied MEMOIR parts are in the state's W_m: never twice
            background, perm = self._setup(handle, state, path, names, width, k, hp)
            w_before = memory_matrix(state, layer)
            if w_before is None or w_before.shape[0] != d_out:
                w_before = torch.zeros(d_out, width)
            W = w_before.clone()
            masks = stored_masks(state, layer, k)
            n_old = masks.shape[0]
            templates = _prefixes(handle, hp.n_prefixes, hp.seed)
            feats = _features(handle, path, [r.text for r in edits], hp.prompt_feature)
            cols_all = mask_columns(feats, background, perm, k, hp.prompt_feature)
            touched = torch.zeros(width, dtype=torch.bool)
            nll, steps, prior, duplicate = [], [], [], []
            for req, cols in zip(edits, cols_all):
                best, _ = best_overlap(cols[None], masks, width)
                prior.append(round(float(best[0]), 4))
                texts = [req.text] + [fill_subject(t, req.text) for t in templates]
                batch = L.qa_batch(handle.tokenizer, texts, [req.target_new] * len(texts))
                P, loss, used = self._write(handle, layer, module, batch, W[:, cols].clone(), cols, hp)
                W[:, cols] = P
                touched[cols] = True
                dup = bool((masks == cols).all(1).any()) if masks.shape[0] else False
                if not dup:
                    masks = torch.cat([masks, cols[None]])
                duplicate.append(dup)
                nll.append(round(loss, 5))
                steps.append(used)
                if progress is not None:
                    progress.update(1)
        C = touched.nonzero().flatten()
        delta = W[:, C] - w_before[:, C]
        new_masks = masks[n_old:]
        check_update("memoir", {"W_m": delta}, fix=FIX)
        state.add_batch_tensor(names["delta"], delta)
        state.add_batch_tensor(names["cols"], C)
        state.add_batch_tensor(names["masks"], new_masks)
        tensors = {
            "memoir.delta": delta,
            "memoir.cols": C.float(),
            "memoir.masks": new_masks.float(),
            "memoir.background": background,
            "memoir.perm": perm.float(),
        }
        info = {
            "module": path,
            "layer": layer,
            "top_k": k,
            "width": width,
            "tau": hp.tau,
            "prompt_feature": hp.prompt_feature,
            "batch": state.batches,
            "masks": int(new_masks.shape[0]),
            "masks_total": int(masks.shape[0]),
            "columns": int(C.numel()),
            "nll": nll,
            "steps": steps,
            "prior_overlap": prior,  # each edit's best overlap with the masks stored before it
            "duplicate_mask": duplicate,
        }
        return tensors, info

    @staticmethod
    def _setup(handle, state: EditState, path: str, names: dict, width: int, k: int, hp: MemoirHParams):
        """The background and permutation of this layer's memory: the state's, else computed now (on
        the unedited model) and recorded with the settings in this batch."""
        setup = _first(state, names["setup"])
        kind = FEATURES.index(hp.prompt_feature)
        if setup is not None:
            if int(setup[0]) != k or int(setup[1]) != kind or int(setup[2]) != hp.seed:
                raise ConfigError(
                    f"memoir: the sequential state's memory on layer {hp.layer} was made with top_k {int(setup[0])}, "
                    f"prompt_feature {FEATURES[int(setup[1])]!r}, seed {int(setup[2])}; this batch asks for "
                    f"top_k {k}, {hp.prompt_feature!r}, seed {hp.seed}: keep them for the whole sequence"
                )
            return _first(state, names["background"]), _first(state, names["perm"])
        background = _features(handle, path, BACKGROUND, hp.prompt_feature).mean(0)
        perm = permutation(width, hp.seed)
        state.add_batch_tensor(names["background"], background)
        state.add_batch_tensor(names["perm"], perm)
        state.add_batch_tensor(names["setup"], torch.tensor([k, kind, hp.seed], dtype=torch.long))
        return background, perm

    @staticmethod
    def _write(handle, layer: int, module, batch, P0: torch.Tensor, cols: torch.Tensor, hp: MemoirHParams):
        """Train the mask's columns of ``W_m`` on one edit's rows; returns them, the last loss and the
        number of updates. Only the blocks from ``layer`` up are re-run (:class:`Replay`): the memory
        changes nothing below."""
        pos = (batch.labels != L.IGNORE).nonzero()
        targets = batch.labels[pos[:, 0], pos[:, 1]].to(handle.device)
        n = len(batch)
        count = torch.zeros(n).index_add_(0, pos[:, 0], torch.ones(len(pos)))
        replay = Replay(
            handle,
            answer_prompts(batch.input_ids, batch.attention_mask, batch.labels, L.IGNORE),
            layer,
        )
        rows, at = pos[:, 0].to(handle.device), pos[:, 1].to(handle.device)
        P = P0.to(handle.device).clone().requires_grad_(True)
        opt = torch.optim.SGD([P], lr=hp.lr, weight_decay=hp.weight_decay)
        c = cols.to(handle.device)
        hook = module.register_forward_hook(
            lambda _m, args, out: out + (args[0][..., c].float() @ P.T).to(out.dtype)
        )
        loss_v, step = float("nan"), 0
        try:
            for step in range(hp.n_iter + 1):
                nll = F.cross_entropy(replay.logits_at(rows, at), targets, reduction="none").cpu()
                loss = (torch.zeros(n).index_add(0, pos[:, 0], nll) / count.clamp(min=1)).mean()
                loss_v = check_loss(loss, "memoir", step, fix=FIX)
                if loss_v <= hp.early_stop_loss or step == hp.n_iter:
                    break
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([P], hp.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    peak = float(P.abs().max())
                if not math.isfinite(peak) or peak > MAX_ABS_VALUE:
                    check_update("memoir", {f"W_m after step {step + 1}": P.detach()}, fix=FIX)
        finally:
            hook.remove()
        return P.detach().cpu(), loss_v, step
