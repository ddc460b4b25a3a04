"""Training-based unlearning and editing: GA, GD, NPO, SimNPO, IdK, DPO (IdkPO), ReLearn and FT-L.

KnowledgeSmith's framing, made literal: one constrained optimisation over the same request model,
``L = γ·L_forget(ForgetRequests) + w_edit·NLL(EditRequests) + α·L_retain(RetainRequests)``, where the
methods differ only in ``L_forget``. Every method accepts a mix of
:class:`~loka.requests.ForgetRequest` (answers to forget), :class:`~loka.requests.EditRequest` (new
answers to learn: a joint edit + forget is one run) and :class:`~loka.requests.RetainRequest`
(answers to keep: NLL, or KL to the frozen model with ``retain_loss="kl"``).

Only the MLP output matrices of ``layers`` are trained (the weights locate-and-edit methods rewrite),
so the artifact is a small set of weight deltas with the usual apply / revert / save. Training stops
early when the forget target is met: at most ``stop_forget_em`` of the forget answers remain exact
matches under teacher forcing and at least ``stop_edit_em`` of the edit answers are. The reference
model of NPO/DPO/KL is the model at the start, so its numbers are computed once, before training.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import torch

from ..errors import LokaError
from ..forgetting import losses as L
from ..forgetting.objectives import (  # noqa: F401  (relearn_answer, refusals: part of this module's surface)
    FORGET_LOSSES,
    RELEARN_FALLBACK,
    ForgetLoss,
    ForgetStep,
    refusals,
    relearn_answer,
)
from ..requests import UpdateBatch
from ..utils.progress import bar as progress_bar
from ..weights import preserved_weights
from .base import Domain, HParams, Layers, Method, NonNegFloat, PosFloat, PosInt, check_loss, register

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class TrainHParams(HParams):
    layers: Layers = field(default_factory=lambda: [3, 4, 5, 6, 7])
    lr: PosFloat = 5e-4
    max_steps: PosInt = 40
    batch_size: PosInt = 64  # forget + edit rows per step (all when fewer)
    retain_batch_size: PosInt = 32
    gamma: NonNegFloat = 1.0  # forget weight
    alpha: NonNegFloat = 1.0  # retain weight
    edit_weight: NonNegFloat = 1.0
    beta: PosFloat = 0.1  # NPO / DPO temperature (SimNPO: 4.5)
    delta: NonNegFloat = 0.0  # SimNPO margin
    retain_loss: Literal["nll", "kl"] = "nll"  # or "kl" (to the frozen model, on answer positions)
    stop_forget_em: Annotated[float, Domain(ge=-1, le=1)] = 0.0
    stop_edit_em: Annotated[float, Domain(ge=0, le=2)] = 1.0
    linf_constraint: PosFloat | None = None  # FT-L: clamp each weight's change to ±ε
    weight_decay: NonNegFloat = 0.0
    seed: int = 0


class TrainMethod(Method):
    """The generic trainer: ``γ·L_forget + w_edit·NLL(edits) + α·L_retain``; a subclass names its
    unlearning objective (:data:`loka.forgetting.objectives.FORGET_LOSSES`) in ``objective``."""

    objective: ClassVar[str] = "ga"
    hparams_cls = TrainHParams
    tasks = frozenset({"edit", "forget", "retain"})
    primary = "forget"

    def forget_loss(self, hp) -> ForgetLoss:
        return FORGET_LOSSES[self.objective]

    def run(self, handle: ModelHandle, requests, hp: TrainHParams, progress=None, state=None):
        batch = UpdateBatch.of(requests)
        forget, retain, edits = batch.forget, batch.retain, batch.edits
        if not forget and not edits:
            raise LokaError(f"{self.name}: nothing to forget or edit (only retain requests were given)")
        if "retain" not in self.tasks and retain:
            log.warning("%s has no retain term: %d retain request(s) ignored", self.name, len(retain))
            retain = []
        tok = handle.tokenizer
        rng = self._rng = random.Random(hp.seed)
        torch.manual_seed(hp.seed)
        names = [handle.weight_name(handle.check_layer(x, "layers")) for x in hp.layers]
        forget_b = (
            L.qa_batch(tok, [r.text for r in forget], [r.target_true for r in forget]) if forget else None
        )
        edit_b = L.qa_batch(tok, [r.text for r in edits], [r.target_new for r in edits]) if edits else None
        retain_b = (
            L.qa_batch(tok, [r.text for r in retain], [r.target_new for r in retain]) if retain else None
        )
        objective = self.forget_loss(hp)
        wins = objective.wins(forget, rng) if forget else None
        win_b = L.qa_batch(tok, [q for q, _ in wins], [a for _, a in wins]) if wins else None
        ref = self._reference(handle, objective, forget_b, win_b, retain_b, hp)
        info: dict = {
            "forget": len(forget),
            "edit": len(edits),
            "retain": len(retain),
            "trained": names,
            "forget_loss": objective.name,
        }
        if win_b is not None and objective.name == "relearn":
            info["relearn_rows"] = len(win_b)
        with self._trainable(handle, names, hp) as tr:
            params = tr.params
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
            bar = progress_bar(
                total=hp.max_steps,
                desc=f"{self.name} training",
                unit="step",
                disable=progress is None or getattr(progress, "disable", False),
            )
            history = []
            try:
                step = 0
                for step in range(1, hp.max_steps + 1):
                    forget_i = _sample(rng, len(forget_b) if forget_b else 0, hp.batch_size)
                    edit_i = _sample(rng, len(edit_b) if edit_b else 0, hp.batch_size)
                    retain_i = _sample(rng, len(retain_b) if retain_b else 0, hp.retain_batch_size)
                    opt.zero_grad()
                    parts, seen = self._losses(
                        handle,
                        objective,
                        forget_b,
                        edit_b,
                        retain_b,
                        win_b,
                        ref,
                        forget_i,
                        edit_i,
                        retain_i,
                        hp,
                    )
                    loss = sum(parts.values())
                    check_loss(loss, self.name, step, fix="lower lr, gamma, alpha or edit_weight")
                    loss.backward()
                    opt.step()
                    tr.after_step()
                    rec = {
                        "step": step,
                        "loss": float(loss.detach()),
                        **{k: float(v.detach()) for k, v in parts.items()},
                    }
                    history.append(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                    bar.update(1)
                    if self._target_met(handle, forget_b, edit_b, hp, seen, rec):
                        info["stopped_early"] = True
                        break
                info["steps"] = step
                final = {k: rec[k] for k in ("forget_em", "edit_em") if k in rec} if history else {}
            finally:
                bar.close()
            with torch.no_grad():
                if not final:  # the last step ended without a full check: do one now
                    final = self._check(handle, forget_b, edit_b)
                deltas = tr.result()
        info.update(tr.info)
        info.update(final)
        info["history"] = history
        if progress is not None:
            progress.update(len(requests))
        return deltas, info

    # -- pieces ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _trainable(self, handle: ModelHandle, names: list[str], hp) -> Iterator[_Trainable]:
        """The parameters a run trains: here the weights ``names`` themselves (restored on exit, so the
        model is untouched; the result is their change). LoRA trains low-rank factors instead."""
        model = handle.model
        with preserved_weights(model, names):
            tr = _WeightDeltas([handle.param(n) for n in names], names, hp.linf_constraint)
            try:
                yield tr
            finally:
                for p in tr.params:
                    p.requires_grad_(False)

    @torch.no_grad()
    def _reference(self, handle: ModelHandle, objective: ForgetLoss, forget_b, win_b, retain_b, hp) -> dict:
        ref: dict = {}
        if forget_b is not None and objective.reference:
            lg, rows = L.answer_logits(handle, forget_b)
            ref["forget"] = L.sequence_logprobs(lg, rows, forget_b)[0]
        if win_b is not None and objective.win_reference:
            lg, rows = L.answer_logits(handle, win_b)
            ref["win"] = L.sequence_logprobs(lg, rows, win_b)[0]
        if retain_b is not None and hp.retain_loss == "kl":
            lg, rows = L.answer_logits(handle, retain_b)
            ref["retain_logp"] = torch.log_softmax(lg, -1).to(torch.bfloat16)  # answer positions only
            ref["retain_rows"] = rows
        return ref

    def _losses(
        self,
        handle: ModelHandle,
        objective: ForgetLoss,
        forget_b,
        edit_b,
        retain_b,
        win_b,
        ref,
        forget_i,
        edit_i,
        retain_i,
        hp,
    ) -> tuple[dict, dict]:
        """The loss terms of one step, and the exact-match rates of this step's forget/edit rows
        (before the update: a cheap first test of the stopping rule)."""
        parts: dict = {}
        seen: dict = {}
        if forget_b is not None and len(forget_i):
            b = _rows(forget_b, forget_i)
            lg, rows = L.answer_logits(handle, b)
            lp, n = L.sequence_logprobs(lg, rows, b)
            seen["forget_em"] = float(L.exact_match(lg.detach(), rows, b).mean())

            def logprobs(batch: L.QABatch):
                blg, brows = L.answer_logits(handle, batch)
                return L.sequence_logprobs(blg, brows, batch)

            step = ForgetStep(lp, n, forget_i, ref, win_b, hp, self._rng, logprobs, _rows, _sample)
            parts["forget"] = hp.gamma * objective.loss(step)
        if edit_b is not None and len(edit_i):
            b = _rows(edit_b, edit_i)
            lg, rows = L.answer_logits(handle, b)
            lp, n = L.sequence_logprobs(lg, rows, b)
            parts["edit"] = hp.edit_weight * L.nll_loss(lp, n)
            seen["edit_em"] = float(L.exact_match(lg.detach(), rows, b).mean())
        if retain_b is not None and len(retain_i) and hp.alpha:
            b = _rows(retain_b, retain_i)
            lg, rows = L.answer_logits(handle, b)
            if hp.retain_loss == "nll":
                lp, n = L.sequence_logprobs(lg, rows, b)
                parts["retain"] = hp.alpha * L.nll_loss(lp, n)
            else:
                keep = torch.isin(
                    ref["retain_rows"], retain_i
                )  # reference positions of the sampled rows, in order
                parts["retain"] = hp.alpha * L.kl_to_reference(lg, ref["retain_logp"][keep])
        return parts, seen

    @torch.no_grad()
    def _check(self, handle: ModelHandle, forget_b, edit_b) -> dict:
        out = {}
        if forget_b is not None:
            lg, rows = L.answer_logits(handle, forget_b)
            out["forget_em"] = float(L.exact_match(lg, rows, forget_b).mean())
        if edit_b is not None:
            lg, rows = L.answer_logits(handle, edit_b)
            out["edit_em"] = float(L.exact_match(lg, rows, edit_b).mean())
        return out

    @staticmethod
    def _met(em: dict, hp) -> bool:
        return em.get("forget_em", 0.0) <= hp.stop_forget_em and em.get("edit_em", 1.0) >= hp.stop_edit_em

    def _target_met(self, handle: ModelHandle, forget_b, edit_b, hp, seen: dict, rec: dict) -> bool:
        """The stopping rule: tested first on this step's rows (free), then on every row (one no-grad
        pass), whose rates go into ``rec``."""
        if not self._met(seen, hp):
            return False
        now = self._check(handle, forget_b, edit_b)
        rec.update(now)
        return self._met(now, hp)


class _Trainable:
    """What :meth:`TrainMethod._trainable` yields: the optimised tensors, a post-step projection, the
    artifact tensors at the end, and facts for the manifest."""

    params: list[torch.Tensor]
    info: dict

    def after_step(self) -> None:
        pass

    def result(self) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class _WeightDeltas(_Trainable):
    def __init__(self, params: list[torch.Tensor], names: list[str], linf: float | None):
        self.params, self.names, self.linf = params, names, linf
        self.orig = [p.detach().clone() for p in params]
        self.info = {}
        for p in params:
            p.requires_grad_(True)

    def after_step(self) -> None:
        if self.linf is not None:  # FT-L: project back into the L∞ ball around the original weights
            with torch.no_grad():
                for p, o in zip(self.params, self.orig):
                    p.copy_(o + (p - o).clamp(-self.linf, self.linf))

    def result(self) -> dict[str, torch.Tensor]:
        return {n: (p.detach() - o) for n, p, o in zip(self.names, self.params, self.orig)}


def _sample(rng: random.Random, n: int, k: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if n <= k:
        return torch.arange(n)
    return torch.tensor(sorted(rng.sample(range(n), k)))


def _rows(b: L.QABatch, idx: torch.Tensor) -> L.QABatch:
    """Rows ``idx`` of a batch, trimmed to their longest row."""
    mask = b.attention_mask[idx]
    width = int(mask.sum(1).max())
    return L.QABatch(b.input_ids[idx, :width], mask[:, :width], b.labels[idx, :width])


@register
class GA(TrainMethod):
    """Gradient ascent on the forget answers (no retain term)."""

    name = "ga"
    objective = "ga"
    tasks = frozenset({"edit", "forget"})


@register
class GD(TrainMethod):
    """Gradient difference: gradient ascent on the forget answers + α·retain loss."""

    name = "gd"
    objective = "ga"


@register
class NPOMethod(TrainMethod):
    """Negative preference optimisation (Zhang et al. 2024) + α·retain loss."""

    name = "npo"
    objective = "npo"


@register
class SimNPOMethod(TrainMethod):
    """SimNPO: reference-free, length-normalised NPO + α·retain loss."""

    name = "simnpo"
    objective = "simnpo"


@register
class IdKMethod(TrainMethod):
    """Fine-tune forget prompts to "I don't know"-style refusals + α·retain loss."""

    name = "idk"
    objective = "idk"


@register
class DPOMethod(TrainMethod):
    """IdkPO: DPO preferring a refusal over the forget answer + α·retain loss."""

    name = "dpo"
    objective = "dpo"


@register
class ReLearnMethod(TrainMethod):
    """ReLearn: learn fluent rewrites of the forget answers that name no forgotten entity (on the prompt
    and its paraphrases) + α·retain loss."""

    name = "relearn"
    objective = "relearn"


@register
class FT(TrainMethod):
    """FT-L: fine-tune MLP output matrices on the new answers under an L∞ constraint (forget rows, if
    any, by gradient ascent)."""

    name = "ft"
    objective = "ga"
    primary = "edit"
