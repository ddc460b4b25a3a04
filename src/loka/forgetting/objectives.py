"""The unlearning objectives: how one training step turns the forget rows into a loss.

KnowledgeSmith's framing: every training method minimises ``γ·L_forget + w_edit·NLL(edits) + α·L_retain``
and they differ only in ``L_forget``. Each objective here is a small registered class
(:func:`forget_loss`); the trainer (:mod:`loka.methods.train`) is generic, and a new unlearning loss is
one class in this file plus one method class naming it.

An objective may need the frozen model's log-probabilities of the forget answers (``reference``:
NPO, DPO) and may learn "winning" rows of its own (``wins``: refusals for IdK and DPO, offline
rewrites for ReLearn).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar

import torch

from ..requests import ForgetRequest
from . import losses as L

#: ReLearn's fallback rewrite for a forget request without a known relation (e.g. TOFU questions).
RELEARN_FALLBACK = "not something I have reliable information about"


def relearn_answer(req: ForgetRequest) -> str:
    """ReLearn's positive target for a forget request, built offline.

    The seed rewrites forget answers with an LLM so that they stay fluent but carry no forgotten
    fact. Offline we substitute the object by a vague phrase of its type: the request's own
    ``target_new`` when given, else the relation's entry in :data:`loka.relations.VAGUE`
    ("The mother tongue of Danielle Darrieux is" → " a language"), else :data:`RELEARN_FALLBACK`.
    """
    from ..relations import VAGUE

    if req.target_new:
        return req.target_new
    return VAGUE.get(req.relation_id or "", RELEARN_FALLBACK)


def refusals() -> list[str]:
    """TOFU's refusal strings (``idontknow.jsonl``), bundled with the package."""
    text = (resources.files("loka") / "forgetting" / "idontknow.jsonl").read_text()
    return [json.loads(x) if x.strip().startswith('"') else x.strip() for x in text.splitlines() if x.strip()]


@dataclass
class ForgetStep:
    """What an objective sees in one step: the sampled forget rows and their log-probabilities."""

    logp: torch.Tensor  # summed log-probability of each sampled forget answer (with gradient)
    count: torch.Tensor  # answer length of each sampled row
    idx: torch.Tensor  # which forget rows were sampled
    ref: dict  # the frozen model's numbers (``forget``, ``win``) when the objective asked for them
    win: L.QABatch | None  # the objective's own rows (``wins``), all of them
    hp: Any  # the method's hyperparameters (beta, delta, batch_size, …)
    rng: random.Random
    logprobs: Callable[
        [L.QABatch], tuple[torch.Tensor, torch.Tensor]
    ]  # (logp, count) of a batch, with gradient
    rows: Callable[[L.QABatch, torch.Tensor], L.QABatch]  # rows of a batch
    sample: Callable[[random.Random, int, int], torch.Tensor]  # k of n row indices


class ForgetLoss:
    """One unlearning objective. ``name`` is what a method's ``objective`` (or LoRA's ``forget_loss``) names."""

    name: ClassVar[str]
    reference: ClassVar[bool] = False  # needs the frozen model's log-prob of each forget answer
    win_reference: ClassVar[bool] = False  # … and of each of its own rows

    def wins(self, forget: list[ForgetRequest], rng: random.Random) -> list[tuple[str, str]] | None:
        """(prompt, answer) rows the objective learns, or ``None``."""
        return None

    def loss(self, s: ForgetStep) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


#: name -> the objective; filled by :func:`forget_loss`
FORGET_LOSSES: dict[str, ForgetLoss] = {}


def forget_loss(cls: type[ForgetLoss]) -> type[ForgetLoss]:
    """Class decorator: register an unlearning objective under its ``name``."""
    FORGET_LOSSES[cls.name] = cls()
    return cls


@forget_loss
class GradientAscent(ForgetLoss):
    """GA: raise the NLL of the forget answers (Eq. ``-NLL``)."""

    name = "ga"

    def loss(self, s: ForgetStep) -> torch.Tensor:
        return L.ga_loss(s.logp, s.count)


@forget_loss
class NPO(ForgetLoss):
    """Negative preference optimisation (Zhang et al. 2024): ``-(2/β) E log σ(-β log(π/π_ref))``."""

    name = "npo"
    reference = True

    def loss(self, s: ForgetStep) -> torch.Tensor:
        return L.npo_loss(s.logp, s.ref["forget"][s.idx], s.hp.beta)


@forget_loss
class SimNPO(ForgetLoss):
    """SimNPO: reference-free, length-normalised NPO with margin ``δ``."""

    name = "simnpo"

    def loss(self, s: ForgetStep) -> torch.Tensor:
        return L.simnpo_loss(s.logp, s.count, s.hp.beta, s.hp.delta)


def _refusal_rows(forget: list[ForgetRequest], rng: random.Random) -> list[tuple[str, str]]:
    pool = refusals()
    return [(r.text, r.target_new or rng.choice(pool)) for r in forget]


@forget_loss
class IdK(ForgetLoss):
    """IdK: learn a refusal ("I don't know"-style) for each forget prompt (NLL)."""

    name = "idk"

    def wins(self, forget, rng):
        return _refusal_rows(forget, rng)

    def loss(self, s: ForgetStep) -> torch.Tensor:
        return L.nll_loss(*s.logprobs(s.rows(s.win, s.idx)))


@forget_loss
class IdkPO(ForgetLoss):
    """IdkPO: DPO preferring a refusal over the forget answer (β-scaled log-ratio to the reference)."""

    name = "dpo"
    reference = True
    win_reference = True

    def wins(self, forget, rng):
        return _refusal_rows(forget, rng)

    def loss(self, s: ForgetStep) -> torch.Tensor:
        wlp, _ = s.logprobs(s.rows(s.win, s.idx))
        return L.dpo_loss(wlp, s.ref["win"][s.idx], s.logp, s.ref["forget"][s.idx], s.hp.beta)


@forget_loss
class ReLearn(ForgetLoss):
    """ReLearn: learn fluent rewrites that name no forgotten entity, on the prompt and each paraphrase
    (the augmentation), sampled on their own rows."""

    name = "relearn"

    def wins(self, forget, rng):
        return [(q, relearn_answer(r)) for r in forget for q in [r.text, *r.paraphrases]]

    def loss(self, s: ForgetStep) -> torch.Tensor:
        w = s.rows(s.win, s.sample(s.rng, len(s.win), s.hp.batch_size))
        return L.nll_loss(*s.logprobs(w))
