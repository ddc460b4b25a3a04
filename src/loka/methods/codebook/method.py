"""LOKA: conflict-aware knowledge updating with a knowledge codebook (arXiv 2502.00158).

One run takes edit requests (new answers to learn), forget requests (answers to unlearn) and retain
requests (answers that must not move) — one request model, the two tasks differ in their target —
and returns a codebook artifact (kind ``memory``; the base weights never change):

1. **Embedding** of every edit/forget query: the residual stream entering block ``layer`` at the
   query's last token, L2-normalised (:func:`loka.methods.codebook.codebook.query_embeddings`).
2. **Mapping** (``mapping``): K-means with ``k`` clusters, or SimHash LSH with ``lsh_bits`` bits
   (buckets), the mapping for sequential updates; ``storage="dense"`` puts everything in one memory,
   ``"sparse"`` gives every fact its own.
3. **Conflict-aware allocation** per cluster holding both edit and forget data (``conflict``):
   ``auto`` computes the conflict score — the fraction of ``conflict_pairs`` sampled (edit, forget)
   minibatch pairs whose loss gradients on the memory have ``cos < 0`` — and gives the two
   tasks separate memories when it exceeds ``conflict_threshold``, else one shared memory trained
   along the two-task MGDA direction; ``separate`` / ``shared`` force either.
4. **Training** each memory ``Δ_j`` (the only trainable tensor; ``M_j = W + Δ_j``): edit loss = token
   NLL of the new answers, forget loss = NPO against the base model (β), retention = forward KL to
   the base model on the ``retain_per_memory`` retained queries nearest to the memory's key, weight
   ``retain_weight``. A shared memory steps along ``s·d_MGDA + λ_r ∇L_r`` with ``s`` the mean of the two
   task gradients' norms (MGDA combines unit vectors; ``s`` puts the step back on the loss scale).
   Adam, at most ``n_iter`` steps, stopped once every edit answer is and no forget answer is a
   teacher-forced exact match (after ``min_steps``) and the edits' mean answer NLL is at most
   ``edit_stop_nll`` (a margin that carries edits to paraphrases) and the forget rows' mean per-token
   answer NLL at least ``forget_stop_nll`` (0 by default; long answers need it); in a shared memory a task whose own
   target is met sits the step out (``gate_tasks``), so edits training on do not over-forget.
5. **Router** (:mod:`.router`): MiniLM fine-tuned on updated queries against retained queries,
   generic sentences and the update prompts with their subject swapped for a retained one
   (``swap_negatives``); the codebook is used only when ``P ≥ router_threshold``.

Sequential updating (LSH): with ``state`` (an :class:`~loka.state.EditState` built from the previous
codebook artifact, :func:`state_from_artifact`), new queries are hashed into the existing buckets;
only the buckets they touch are retrained (from their current memories, on the bucket's old and new
data); the other memories are carried over bit for bit and old knowledge is never re-assigned.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch

from ...errors import LokaError
from ...forgetting import losses as L
from ...requests import UpdateBatch
from ...state import EditState
from ...utils.progress import bar as progress_bar
from ..base import (
    Cosine,
    Domain,
    HParams,
    Layer,
    MemoryMethod,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    UnitFloat,
    check_update,
    register,
)
from ..templates import context_templates
from ..wise import OUT_OF_SCOPE
from .codebook import Codebook, conflict_score, cosine, embeddings, kmeans, lsh_hash, lsh_planes, mgda_two
from .router import Router, train_router

if TYPE_CHECKING:
    from ...models.loader import ModelHandle

log = logging.getLogger(__name__)

MAPPINGS = ("kmeans", "lsh")
STORAGES = ("clustered", "dense", "sparse")
CONFLICTS = ("auto", "shared", "separate")


@dataclass
class LokaHParams(HParams):
    layer: Layer = (
        24  # the MLP output matrix the memories copy (configs/loka: SmolLM2 27, else 0.8 of the depth)
    )
    mapping: Literal["kmeans", "lsh"] = "kmeans"  # or "lsh" (sequential updates)
    key_source: Literal["encoder", "llm"] = (
        "encoder"  # retrieval embedding: "encoder" (MiniLM) or "llm" (block-ℓ input, the paper's)
    )
    k: PosInt = 20  # K-means clusters (capped at the number of queries)
    lsh_bits: Annotated[int, Domain(ge=1, le=16)] = 4  # 2^bits buckets
    storage: Literal["clustered", "dense", "sparse"] = (
        "clustered"  # "dense": one memory; "sparse": one memory per fact
    )
    conflict: Literal["auto", "shared", "separate"] = (
        "auto"  # "shared" (always MGDA) / "separate" (always task-specific)
    )
    conflict_threshold: UnitFloat = 0.5  # separate memories when the conflict score exceeds this
    conflict_pairs: PosInt = 8  # S sampled (edit, forget) minibatch pairs
    conflict_batch: PosInt = 4
    beta: PosFloat = 0.1  # NPO temperature
    retain_weight: NonNegFloat = 1.0  # λ_r
    retain_per_memory: NonNegInt = 8
    lr: PosFloat = 2e-3
    n_iter: PosInt = 40
    min_steps: NonNegInt = 1  # stop as soon as the target is met: NPO past that point over-forgets (unl-tr)
    edit_stop_nll: NonNegFloat = (
        0.05  # edits must also reach this mean answer NLL before a memory stops (0: argmax only)
    )
    # forget rows must also reach this mean per-token answer NLL before a memory stops (0: argmax only).
    # A long answer stops being an exact match once one token flips; 2.0 (per-token p ~0.14) carries it further
    forget_stop_nll: NonNegFloat = 0.0
    gate_tasks: bool = (
        True  # shared memory: a task whose own target is met sits out the step (no over-forgetting)
    )
    edit_contexts: NonNegInt = (
        0  # also train each edit under this many of the model's context templates ("<text>. {}")
    )
    batch_size: PosInt = 16  # edit / forget rows per step and task (all when fewer)
    router: bool = True
    router_threshold: UnitFloat = 0.5
    # a routed query must also be this close (cosine of retrieval embeddings) to some updated query; None:
    # 0.65 with encoder keys (paraphrases of updated facts >= 0.78, held-out facts <= 0.57 here), off with llm keys
    match_threshold: Cosine | None = None
    router_layers: PosInt = 1
    router_epochs: PosInt = 8
    router_lr: PosFloat = 1e-4
    swap_negatives: bool = True
    seed: int = 0


@dataclass
class _Item:
    kind: str  # "edit" | "forget"
    text: str
    answer: str
    request: dict
    emb: torch.Tensor


def _check(hp: LokaHParams) -> None:
    for name, value, allowed in (
        ("mapping", hp.mapping, MAPPINGS),
        ("storage", hp.storage, STORAGES),
        ("key_source", hp.key_source, ("llm", "encoder")),
        ("conflict", hp.conflict, CONFLICTS),
    ):
        if value not in allowed:
            raise LokaError(f"loka: hyperparameter {name} must be one of {list(allowed)}, got {value!r}")
    if hp.k < 1:
        raise LokaError(f"loka: hyperparameter k must be >= 1, got {hp.k}")
    if not 1 <= hp.lsh_bits <= 16:
        raise LokaError(f"loka: hyperparameter lsh_bits must be in 1..16, got {hp.lsh_bits}")
    if hp.n_iter < 1:
        raise LokaError(f"loka: hyperparameter n_iter must be >= 1, got {hp.n_iter}")
    if hp.forget_stop_nll < 0:
        raise LokaError(
            f"loka: hyperparameter forget_stop_nll must be >= 0 (0: stop at the first flipped token), got {hp.forget_stop_nll}"
        )
    if hp.edit_contexts < 0:
        raise LokaError(f"loka: hyperparameter edit_contexts must be >= 0, got {hp.edit_contexts}")
    if hp.match_threshold is not None and not 0.0 <= hp.match_threshold <= 1.0:
        raise LokaError(
            f"loka: hyperparameter match_threshold must be in [0, 1] (a cosine; 0 turns the gate off), got {hp.match_threshold}"
        )
    if not 0.0 <= hp.router_threshold <= 1.0:
        raise LokaError(f"loka: hyperparameter router_threshold must be in [0, 1], got {hp.router_threshold}")


class _Trainer:
    """Losses of one memory ``Δ`` plugged into ``layer`` for every row (training-time hook)."""

    def __init__(self, handle: ModelHandle, layer: int, beta: float):
        self.handle, self.beta = handle, beta
        self.module = handle.mlp_out(layer)
        w = handle.weight(layer)
        self.shape = tuple(w.shape)
        self.delta: torch.Tensor | None = None
        self._refs: dict = {}  # reference() by batch content: a mixed cluster's forget rows serve the
        # conflict score and then the memory's training

    def __enter__(self):
        self._h = self.module.register_forward_hook(
            lambda _m, args, out: (
                out if self.delta is None else out + (args[0].float() @ self.delta.T).to(out.dtype)
            )
        )
        return self

    def __exit__(self, *exc):
        self._h.remove()

    def edit(self, batch):
        lg, rows = L.answer_logits(self.handle, batch)
        lp, n = L.sequence_logprobs(lg, rows, batch)
        return L.nll_loss(lp, n), L.exact_match(lg.detach(), rows, batch)

    def forget(self, batch, ref):
        lg, rows = L.answer_logits(self.handle, batch)
        lp, n = L.sequence_logprobs(lg, rows, batch)
        nll = float((-lp.detach() / n).mean())  # mean per-token answer NLL, for forget_stop_nll
        return L.npo_loss(lp, ref, self.beta), L.exact_match(lg.detach(), rows, batch), nll

    def retain(self, batch, ref_logprobs):
        lg, _ = L.answer_logits(self.handle, batch)
        return L.kl_to_reference(lg, ref_logprobs)

    @torch.no_grad()
    def reference(self, batch):
        """Summed answer log-probs and per-position log-softmax of the base model (no memory)."""
        key = (
            tuple(batch.input_ids.shape),
            batch.input_ids.numpy().tobytes(),
            batch.labels.numpy().tobytes(),
        )
        if key in self._refs:
            return self._refs[key]
        saved, self.delta = self.delta, None
        try:
            lg, rows = L.answer_logits(self.handle, batch)
            lp, _ = L.sequence_logprobs(lg, rows, batch)
            self._refs[key] = (lp, torch.log_softmax(lg, -1))
            return self._refs[key]
        finally:
            self.delta = saved

    def grad(self, loss, D):
        return torch.autograd.grad(loss, D)[0]


def _rows(tok, items: list[_Item]):
    return L.qa_batch(tok, [i.text for i in items], [i.answer for i in items])


def _sub(batch, idx):
    return L.QABatch(batch.input_ids[idx], batch.attention_mask[idx], batch.labels[idx])


@register
class Loka(MemoryMethod):
    name = "loka"
    hparams_cls = LokaHParams
    index_tensors = frozenset({"loka.groups", "loka.buckets"})
    tasks = frozenset({"edit", "forget", "retain"})
    stateful = True

    @classmethod
    def export_refusal_for(cls, artifact) -> str:
        if "router.head.weight" in artifact.deltas:
            return (
                "its router decides on the prompt's text with a fine-tuned MiniLM sentence encoder, a "
                "second model and tokenizer that the exported model's modelling file does not hold"
            )
        if artifact.manifest.get("extra", {}).get("key_source") == "encoder":
            return (
                "its keys are MiniLM sentence embeddings of the prompt's text, from a second model and "
                "tokenizer that the exported model's modelling file does not hold"
            )
        return "the modelling file reproduces GRACE, WISE and MEMOIR hooks, not a LOKA codebook's"

    @staticmethod
    def hook(artifact) -> Codebook:
        t, x = artifact.deltas, artifact.manifest["extra"]
        planes = t.get("loka.planes")
        return Codebook(
            t["loka.deltas"],
            t["loka.keys"],
            x["layer"],
            x["block"],
            x["module"],
            planes=planes,
            buckets=t.get("loka.buckets") if planes is not None else None,
            router=Router.from_tensors(t),
            router_threshold=float(x.get("router_threshold", 0.5)),
            key_source=x.get("key_source", "llm"),
            items=t.get("loka.item_emb"),
            match_threshold=float(x.get("match_threshold", 0.0)),
        )

    @classmethod
    def attach(cls, model, artifact) -> Codebook:
        """Install the codebook's hooks and register it as the model's router (:mod:`loka.runtime`;
        a second codebook on the same model is refused there)."""
        book = getattr(artifact, "runtime", None)  # re-applying reuses the built codebook (router, packs)
        if not isinstance(book, Codebook):
            book = cls.hook(artifact)
        book.attach(model)
        artifact.runtime = book
        return book

    # -- the method ------------------------------------------------------------------------------
    def run(self, handle: ModelHandle, requests, hp: LokaHParams, progress=None, state=None):
        _check(hp)
        layer = handle.check_layer(hp.layer, "layer")
        batch = UpdateBatch.of(requests)
        edits, forget, retain = batch.edits, batch.forget, batch.retain
        prev = _previous(state)
        if not edits and not forget and not prev["items"]:
            raise LokaError("loka: nothing to edit or forget (only retain requests were given)")
        if prev["items"] and (prev["layer"] != layer or prev["key_source"] != hp.key_source):
            raise LokaError(
                f"loka: the state's codebook is on layer {prev['layer']} with key_source "
                f"{prev['key_source']!r}; a sequential update must keep both (got {layer}, {hp.key_source!r})"
            )
        tok = handle.tokenizer
        rng = random.Random(hp.seed)
        torch.manual_seed(hp.seed)
        new_texts = [r.text for r in edits] + [r.text for r in forget]
        new_emb = embeddings(handle, layer, new_texts, hp.key_source) if new_texts else None
        new_items = []
        if new_emb is not None:
            new_items = [
                _Item("edit", r.text, r.target_new, r.to_dict(), e)
                for r, e in zip(edits, new_emb[: len(edits)])
            ]
            new_items += [
                _Item("forget", r.text, r.target_true, r.to_dict(), e)
                for r, e in zip(forget, new_emb[len(edits) :])
            ]
        items = prev["items"] + new_items
        retain_items = prev["retain"] + [(r.text, r.target_new, r.to_dict()) for r in retain]
        emb = torch.stack([i.emb for i in items])

        # mapping: group id per item; carried-over groups (LSH) keep their ids
        planes = None
        if hp.storage == "dense":
            groups = torch.zeros(len(items), dtype=torch.long)
        elif hp.storage == "sparse":
            groups = torch.arange(len(items))
        elif hp.mapping == "kmeans":
            groups, _ = kmeans(emb, hp.k, hp.seed)
        else:
            planes = (
                prev["planes"]
                if prev["planes"] is not None
                else lsh_planes(hp.lsh_bits, emb.shape[1], hp.seed)
            )
            groups = lsh_hash(emb, planes)
        n_old = len(prev["items"])
        incremental = hp.mapping == "lsh" and hp.storage == "clustered" and n_old > 0
        touched = set(groups[n_old:].tolist()) if incremental else set(groups.tolist())

        trainer = _Trainer(handle, layer, hp.beta)
        contexts = [t for t in context_templates(handle, seed=hp.seed) if t != "{}"][: hp.edit_contexts]
        r_emb = (
            embeddings(handle, layer, [t for t, _, _ in retain_items], hp.key_source)
            if retain_items
            else None
        )
        memories: list[dict] = []  # task, group, items, delta, key, stats
        plan = []
        for g in sorted(set(groups.tolist())):
            idx = (groups == g).nonzero().flatten().tolist()
            if incremental and g not in touched:
                memories += [m for m in prev["memories"] if m["group"] == g]
                continue
            plan.append((g, idx))
        bar = progress_bar(
            total=len(plan),
            desc="loka memories",
            unit="cluster",
            disable=progress is None or getattr(progress, "disable", False),
        )
        info_conf = []
        with trainer:
            for g, idx in plan:
                e_idx = [i for i in idx if items[i].kind == "edit"]
                f_idx = [i for i in idx if items[i].kind == "forget"]
                start = (
                    {m["task"]: m["delta"] for m in prev["memories"] if m["group"] == g}
                    if incremental
                    else {}
                )
                if e_idx and f_idx:
                    score = None
                    if hp.conflict == "auto":
                        d0 = start.get("shared", start.get("edit"))
                        score = self._conflict(trainer, tok, items, e_idx, f_idx, hp, rng, d0)
                    separate = hp.conflict == "separate" or (
                        score is not None and score > hp.conflict_threshold
                    )
                    info_conf.append(
                        {
                            "group": int(g),
                            "edit": len(e_idx),
                            "forget": len(f_idx),
                            "score": score,
                            "memories": "separate" if separate else "shared",
                        }
                    )
                    tasks = (
                        [("edit", e_idx, []), ("forget", [], f_idx)]
                        if separate
                        else [("shared", e_idx, f_idx)]
                    )
                else:
                    tasks = [("edit", e_idx, [])] if e_idx else [("forget", [], f_idx)]
                for task, ei, fi in tasks:
                    key = torch.nn.functional.normalize(emb[ei + fi].mean(0), dim=-1)
                    init = start.get(task)
                    if init is None and start and task == "shared":
                        init = start.get("edit")
                    delta, stats = self._train(
                        trainer, tok, items, ei, fi, retain_items, r_emb, key, hp, rng, init, contexts
                    )
                    memories.append(
                        {
                            "task": task,
                            "group": int(g),
                            "items": ei + fi,
                            "delta": delta,
                            "key": key,
                            "stats": stats,
                        }
                    )
                trainer._refs.clear()  # references are reused within a cluster only
                bar.update(1)
                bar.set_postfix(memories=len(memories))
        bar.close()
        if progress is not None:
            progress.update(len(requests))
        memories.sort(key=lambda m: (m["group"], m["task"]))

        tensors = {
            "loka.deltas": torch.stack([m["delta"] for m in memories]).contiguous(),
            "loka.keys": torch.stack([m["key"] for m in memories]).contiguous(),
            "loka.groups": torch.tensor([m["group"] for m in memories], dtype=torch.long),
        }
        if planes is not None:
            tensors["loka.planes"] = planes.contiguous()
            tensors["loka.buckets"] = tensors["loka.groups"].clone()
        router_info = None
        if hp.router:
            pos = [i.text for i in items]
            neg = self._negatives(
                items, retain_items, hp, random.Random(hp.seed)
            )  # independent of training draws
            router, router_info = train_router(
                pos, neg, layers=hp.router_layers, epochs=hp.router_epochs, lr=hp.router_lr, seed=hp.seed
            )
            tensors.update(router.tensors())
        info = {
            "module": handle.spec.mlp_out_path(layer),
            "block": handle.spec.block_path(layer),
            "layer": layer,
            "key_source": hp.key_source,
            "router_threshold": hp.router_threshold if hp.router else 0.0,
            "match_threshold": match_threshold(hp),
            "memories": [
                {
                    "task": m["task"],
                    "group": m["group"],
                    "edit": sum(items[i].kind == "edit" for i in m["items"]),
                    "forget": sum(items[i].kind == "forget" for i in m["items"]),
                    **m["stats"],
                }
                for m in memories
            ],
            "conflict": info_conf,
            "router": router_info,
            "retrained_groups": sorted(int(g) for g, _ in plan),
            "carried_over": len(memories)
            - sum(len([1 for m in memories if m["group"] == g]) for g, _ in plan),
            # what a later sequential update needs to retrain a bucket (the cumulative data)
            "data": {
                "items": [
                    {
                        "kind": i.kind,
                        "text": i.text,
                        "answer": i.answer,
                        "request": i.request,
                        "group": int(g),
                        "memory": _memory_of(memories, n),
                    }
                    for n, (i, g) in enumerate(zip(items, groups.tolist()))
                ],
                "retain": [{"text": t, "answer": a, "request": r} for t, a, r in retain_items],
            },
            "batch": state.batches if state is not None else 0,
        }
        tensors["loka.item_emb"] = emb.contiguous()
        if r_emb is not None:
            tensors["loka.retain_emb"] = r_emb.contiguous()
        return tensors, info

    # -- pieces ----------------------------------------------------------------------------------
    def _conflict(self, trainer, tok, items, e_idx, f_idx, hp, rng, d0) -> float:
        """Fraction of sampled (edit, forget) minibatch pairs with ``cos(∇L_e, ∇L_u) < 0`` at the
        memory's initial value, no weight update."""
        eb, fb = _rows(tok, [items[i] for i in e_idx]), _rows(tok, [items[i] for i in f_idx])
        ref, _ = trainer.reference(fb)
        D = (d0.clone() if d0 is not None else torch.zeros(trainer.shape)).requires_grad_(True)
        trainer.delta = D
        cos, ge_of, gu_of = (
            [],
            {},
            {},
        )  # a minibatch drawn again (small clusters: always all rows) is not recomputed
        try:
            for _ in range(hp.conflict_pairs):
                ei = tuple(sorted(rng.sample(range(len(eb)), min(hp.conflict_batch, len(eb)))))
                fi = tuple(sorted(rng.sample(range(len(fb)), min(hp.conflict_batch, len(fb)))))
                if ei not in ge_of:
                    ge_of[ei] = trainer.grad(trainer.edit(_sub(eb, list(ei)))[0], D)
                if fi not in gu_of:
                    gu_of[fi] = trainer.grad(trainer.forget(_sub(fb, list(fi)), ref[list(fi)])[0], D)
                cos.append(cosine(ge_of[ei], gu_of[fi]))
        finally:
            trainer.delta = None
        return conflict_score(cos)

    def _train(self, trainer, tok, items, e_idx, f_idx, retain_items, r_emb, key, hp, rng, init, contexts=()):
        # each edit fact trains on its prompt and, with edit_contexts, on the prompt after each context
        # template (ROME/MEMIT's augmentation); a step samples facts and takes all rows of each
        views = ["{}", *contexts]
        eb = (
            L.qa_batch(
                tok,
                [v.replace("{}", items[i].text) for i in e_idx for v in views],
                [items[i].answer for i in e_idx for _ in views],
            )
            if e_idx
            else None
        )
        fb = _rows(tok, [items[i] for i in f_idx]) if f_idx else None
        f_ref = trainer.reference(fb)[0] if fb is not None else None
        rb = r_ref = None
        if retain_items and hp.retain_weight > 0:
            near = (r_emb @ key).argsort(descending=True)[: hp.retain_per_memory].tolist()
            rb = L.qa_batch(tok, [retain_items[i][0] for i in near], [retain_items[i][1] for i in near])
            r_ref = trainer.reference(rb)[1]
        D = (init.clone() if init is not None else torch.zeros(trainer.shape)).requires_grad_(True)
        opt = torch.optim.Adam([D], lr=hp.lr)
        trainer.delta = D
        step, alphas, done, edit_nll, forget_nll = 0, [], False, None, None
        try:
            for step in range(1, hp.n_iter + 1):
                le = lu = None
                e_ok = f_ok = True
                if eb is not None:
                    facts = sorted(rng.sample(range(len(e_idx)), min(hp.batch_size, len(e_idx))))
                    le, em = trainer.edit(
                        _sub(eb, [f * len(views) + v for f in facts for v in range(len(views))])
                    )
                    edit_nll = float(le.detach())
                    e_ok = (
                        bool((em == 1).all())
                        and len(facts) == len(e_idx)
                        and (hp.edit_stop_nll <= 0 or edit_nll <= hp.edit_stop_nll)
                    )
                if fb is not None:
                    fi = sorted(rng.sample(range(len(fb)), min(hp.batch_size, len(fb))))
                    lu, em, forget_nll = trainer.forget(_sub(fb, fi), f_ref[fi])
                    f_ok = bool((em == 0).all()) and len(fi) == len(fb) and forget_nll >= hp.forget_stop_nll
                if e_ok and f_ok and step > hp.min_steps:
                    done = True
                    break
                if hp.gate_tasks and le is not None and lu is not None and step > hp.min_steps:
                    if e_ok:  # only one task can be met here (both met has stopped above)
                        le = None
                    elif f_ok:
                        lu = None
                lr_ = trainer.retain(rb, r_ref) if rb is not None else None
                if le is not None and lu is not None:  # shared memory: MGDA on the two task gradients
                    g_e, g_u = trainer.grad(le, D), trainer.grad(lu, D)
                    alpha, d = mgda_two(g_e, g_u)
                    alphas.append(alpha)
                    grad = d * (g_e.norm() + g_u.norm()) / 2
                    if lr_ is not None:
                        grad = grad + hp.retain_weight * trainer.grad(lr_, D)
                else:
                    loss = le if le is not None else lu
                    if lr_ is not None:
                        loss = loss + hp.retain_weight * lr_
                    grad = trainer.grad(loss, D)
                check_update("loka", {"gradient": grad}, fix="lower lr (loka hyperparameters)")
                opt.zero_grad()
                D.grad = grad
                opt.step()
        finally:
            trainer.delta = None
        stats = {"steps": step, "target_met": done}
        if edit_nll is not None:
            stats["edit_nll"] = round(edit_nll, 4)  # mean answer NLL on the last step's edit rows
        if forget_nll is not None:
            stats["forget_nll"] = round(forget_nll, 4)
        if alphas:
            stats["mgda_alpha"] = round(sum(alphas) / len(alphas), 4)
        return D.detach().clone(), stats

    @staticmethod
    def _negatives(items, retain_items, hp, rng) -> list[str]:
        neg = [t for t, _, _ in retain_items] + list(OUT_OF_SCOPE)
        if hp.swap_negatives:
            subjects = [r.get("subject") for _, _, r in retain_items if r.get("subject")] or ["someone", "it"]
            updated = {i.request.get("subject") for i in items}
            pool = [s for s in subjects if s not in updated] or ["someone", "it"]
            for i in items:
                p = i.request.get("prompt", "")
                if "{}" in p:
                    neg.append(p.replace("{}", rng.choice(pool)))
        return list(dict.fromkeys(neg))


def match_threshold(hp: LokaHParams) -> float:
    """The retrieval gate's cosine bound (``match_threshold``; None: 0.65 for encoder keys, 0 for llm keys)."""
    if hp.match_threshold is not None:
        return float(hp.match_threshold)
    return 0.65 if hp.key_source == "encoder" else 0.0


def _memory_of(memories: list[dict], n: int) -> int:
    for j, m in enumerate(memories):
        if n in m["items"]:
            return j
    return -1


def _previous(state: EditState | None) -> dict:
    """What an earlier codebook left in ``state``: items (with embeddings), retained data, memories, planes."""
    out = {"items": [], "retain": [], "memories": [], "planes": None, "layer": None, "key_source": None}
    if state is None or state.get("loka.deltas") is None:
        return out
    data = state.meta.get("loka_data", {})
    emb = state.get("loka.item_emb")
    out["layer"] = state.meta.get("loka_layer")
    out["key_source"] = state.meta.get("loka_key_source", "llm")
    for n, d in enumerate(data.get("items", [])):
        out["items"].append(_Item(d["kind"], d["text"], d["answer"], d["request"], emb[n]))
    out["retain"] = [(r["text"], r["answer"], r["request"]) for r in data.get("retain", [])]
    deltas, keys, groups = state.get("loka.deltas"), state.get("loka.keys"), state.get("loka.groups")
    tasks = state.meta.get("loka_tasks", [])
    for j in range(deltas.shape[0]):
        members = [n for n, d in enumerate(data.get("items", [])) if d.get("memory") == j]
        out["memories"].append(
            {
                "task": tasks[j],
                "group": int(groups[j]),
                "items": members,
                "delta": deltas[j],
                "key": keys[j],
                "stats": {"steps": 0, "carried_over": True},
            }
        )
    out["planes"] = state.get("loka.planes")
    return out


def state_from_artifact(artifact) -> EditState:
    """The sequential-update state held by a LOKA codebook artifact (its memories, keys, LSH planes and
    cumulative data), to pass as ``state=`` to the next update."""
    if artifact.method != "loka":
        raise LokaError(f"artifact {artifact.id} is a {artifact.method} artifact, not a LOKA codebook")
    x = artifact.manifest["extra"]
    keep = ("loka.deltas", "loka.keys", "loka.groups", "loka.planes", "loka.item_emb", "loka.retain_emb")
    st = EditState(
        {k: v.clone() for k, v in artifact.deltas.items() if k in keep},
        {
            "loka_data": x["data"],
            "loka_layer": x["layer"],
            "loka_key_source": x.get("key_source", "llm"),
            "loka_tasks": [m["task"] for m in x["memories"]],
            "batches": int(x.get("batch", 0)) + 1,
        },
    )
    return st


class CodebookFolder:
    """A sequential LOKA codebook on disk: a :class:`~loka.sequential.BatchFolder` of ``batch_00000.loka``,
    ``batch_00001.loka``, … Each batch artifact holds the whole codebook after that batch (old memories
    carried over, touched ones retrained), so the latest one is the model's update and rolling back is
    removing the later ones."""

    def __init__(self, folder):
        from pathlib import Path

        self.folder = Path(folder)
        self._bf = None

    @property
    def index(self):
        """The verified batch folder (opened, and created, on first use)."""
        from ...sequential import BatchFolder

        if self._bf is None:
            self._bf = BatchFolder(self.folder)
        return self._bf

    def batches(self) -> list:
        """The batch artifact folders, in order."""
        if self._bf is None and not self.folder.exists():
            return []
        return [self.index.path(n) for n in range(len(self.index))]

    def latest(self):
        if self._bf is None and not self.folder.exists():
            return None
        return self.index.latest()

    def state(self) -> EditState | None:
        """The state to continue from (``None`` for an empty folder)."""
        art = self.latest()
        return state_from_artifact(art) if art is not None else None

    def append(self, artifact):
        return self.index.append(artifact)

    def rollback_last(self, n: int) -> int:
        """Remove the last ``n`` batches; returns how many were removed."""
        return len(self.index.drop_last(n))

    def keep_first(self, n: int) -> int:
        """Keep the first ``n`` batches; returns how many were removed."""
        return len(self.index.keep_first(n))

    def rollback(self, n: int) -> int:
        """The same as :meth:`rollback_last`: remove the last ``n`` batches."""
        return self.rollback_last(n)
