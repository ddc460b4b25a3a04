"""Training-based unlearning and editing: GA, GD, NPO, SimNPO, IdK, DPO (IdkPO), ReLearn and FT-L.

KnowledgeSmith's framing, made literal: one constrained optimisation over the same request model,
``L = γ·L_forget(ForgetRequests) + w_edit·NLL(EditRequests) + α·L_retain(RetainRequests)``, where the
methods differ only in ``L_forget`` (ALGORITHMS.md §6.2). Every method accepts a mix of
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
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Literal

import torch
from tqdm.auto import tqdm

from ..errors import LokaError
from ..forgetting import losses as L
from ..requests import ForgetRequest, RetainRequest
from ..weights import preserved_weights
from .base import Domain, HParams, Layers, Method, NonNegFloat, PosFloat, PosInt, check_loss, register

log = logging.getLogger(__name__)


#: ReLearn's fallback rewrite for a forget request without a known relation (e.g. TOFU questions).
RELEARN_FALLBACK = "not something I have reliable information about"


def relearn_answer(req: ForgetRequest) -> str:
    """ReLearn's positive target for a forget request, built offline (ALGORITHMS.md §6.2).

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
    """Shared trainer; subclasses name their forget loss in ``forget``."""

    forget: str = "ga"
    hparams_cls = TrainHParams

    def run(self, handle, requests, hp: TrainHParams, progress=None, state=None):
        if hp.retain_loss not in ("nll", "kl"):
            raise LokaError(f"hyperparameter retain_loss must be 'nll' or 'kl', got {hp.retain_loss!r}")
        forget = [r for r in requests if isinstance(r, ForgetRequest)]
        retain = [r for r in requests if isinstance(r, RetainRequest)]
        edits = [r for r in requests if not isinstance(r, ForgetRequest | RetainRequest)]
        if not forget and not edits:
            raise LokaError(f"{self.name}: nothing to forget or edit (only retain requests were given)")
        if self.name == "ga" and retain:
            log.warning("ga has no retain term: %d retain request(s) ignored (use gd)", len(retain))
            retain = []
        tok = handle.tokenizer
        rng = self._rng = random.Random(hp.seed)
        torch.manual_seed(hp.seed)
        names = [handle.weight_name(handle.check_layer(x, "layers")) for x in hp.layers]
        fb = L.qa_batch(tok, [r.text for r in forget], [r.target_true for r in forget]) if forget else None
        eb = L.qa_batch(tok, [r.text for r in edits], [r.target_new for r in edits]) if edits else None
        rb = L.qa_batch(tok, [r.text for r in retain], [r.target_new for r in retain]) if retain else None
        wb = None
        if forget and self.forget in ("idk", "dpo"):
            pool = refusals()
            wb = L.qa_batch(tok, [r.text for r in forget], [r.target_new or rng.choice(pool) for r in forget])
        elif (
            forget and self.forget == "relearn"
        ):  # rewrites on the prompt and every paraphrase (augmentation)
            qs = [(q, relearn_answer(r)) for r in forget for q in [r.text, *r.paraphrases]]
            wb = L.qa_batch(tok, [q for q, _ in qs], [a for _, a in qs])
        ref = self._reference(handle, fb, wb, rb, hp)
        info: dict = {
            "forget": len(forget),
            "edit": len(edits),
            "retain": len(retain),
            "trained": names,
            "forget_loss": self.forget,
        }
        if wb is not None and self.forget == "relearn":
            info["relearn_rows"] = len(wb)
        with self._trainable(handle, names, hp) as tr:
            params = tr.params
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
            bar = tqdm(
                total=hp.max_steps,
                desc=f"{self.name} training",
                unit="step",
                disable=progress is None or getattr(progress, "disable", False),
            )
            history = []
            try:
                step = 0
                for step in range(1, hp.max_steps + 1):
                    fi = _sample(rng, len(fb) if fb else 0, hp.batch_size)
                    ei = _sample(rng, len(eb) if eb else 0, hp.batch_size)
                    ri = _sample(rng, len(rb) if rb else 0, hp.retain_batch_size)
                    opt.zero_grad()
                    parts, seen = self._losses(handle, fb, eb, rb, wb, ref, fi, ei, ri, hp)
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
                    if self._target_met(handle, fb, eb, hp, seen, rec):
                        info["stopped_early"] = True
                        break
                info["steps"] = step
                final = {k: rec[k] for k in ("forget_em", "edit_em") if k in rec} if history else {}
            finally:
                bar.close()
            with torch.no_grad():
                if not final:  # the last step ended without a full check: do one now
                    final = self._check(handle, fb, eb)
                deltas = tr.result()
        info.update(tr.info)
        info.update(final)
        info["history"] = history
        if progress is not None:
            progress.update(len(requests))
        return deltas, info

    # -- pieces ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _trainable(self, handle, names: list[str], hp) -> Iterator[_Trainable]:
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
    def _reference(self, handle, fb, wb, rb, hp) -> dict:
        ref: dict = {}
        if fb is not None and self.forget in ("npo", "dpo"):
            lg, rows = L.answer_logits(handle, fb)
            ref["forget"] = L.sequence_logprobs(lg, rows, fb)[0]
        if wb is not None and self.forget == "dpo":
            lg, rows = L.answer_logits(handle, wb)
            ref["win"] = L.sequence_logprobs(lg, rows, wb)[0]
        if rb is not None and hp.retain_loss == "kl":
            lg, rows = L.answer_logits(handle, rb)
            ref["retain_logp"] = torch.log_softmax(lg, -1).to(torch.bfloat16)  # answer positions only
            ref["retain_rows"] = rows
        return ref

    def _losses(self, handle, fb, eb, rb, wb, ref, fi, ei, ri, hp) -> tuple[dict, dict]:
        """The loss terms of one step, and the exact-match rates of this step's forget/edit rows
        (before the update: a cheap first test of the stopping rule)."""
        parts: dict = {}
        seen: dict = {}
        if fb is not None and len(fi):
            b = _rows(fb, fi)
            lg, rows = L.answer_logits(handle, b)
            lp, n = L.sequence_logprobs(lg, rows, b)
            seen["forget_em"] = float(L.exact_match(lg.detach(), rows, b).mean())
            f = self.forget
            if f == "ga":
                parts["forget"] = hp.gamma * L.ga_loss(lp, n)
            elif f == "npo":
                parts["forget"] = hp.gamma * L.npo_loss(lp, ref["forget"][fi], hp.beta)
            elif f == "simnpo":
                parts["forget"] = hp.gamma * L.simnpo_loss(lp, n, hp.beta, hp.delta)
            elif f == "relearn":  # positive learning on the rewrites, sampled on their own rows
                w = _rows(wb, _sample(self._rng, len(wb), hp.batch_size))
                wlg, wrows = L.answer_logits(handle, w)
                parts["forget"] = hp.gamma * L.nll_loss(*L.sequence_logprobs(wlg, wrows, w))
            elif f in ("idk", "dpo"):
                w = _rows(wb, fi)
                wlg, wrows = L.answer_logits(handle, w)
                wlp, wn = L.sequence_logprobs(wlg, wrows, w)
                if f == "idk":
                    parts["forget"] = hp.gamma * L.nll_loss(wlp, wn)
                else:
                    parts["forget"] = hp.gamma * L.dpo_loss(
                        wlp, ref["win"][fi], lp, ref["forget"][fi], hp.beta
                    )
            else:  # pragma: no cover - registry guarantees the names
                raise LokaError(f"unknown forget loss {f!r}")
        if eb is not None and len(ei):
            b = _rows(eb, ei)
            lg, rows = L.answer_logits(handle, b)
            lp, n = L.sequence_logprobs(lg, rows, b)
            parts["edit"] = hp.edit_weight * L.nll_loss(lp, n)
            seen["edit_em"] = float(L.exact_match(lg.detach(), rows, b).mean())
        if rb is not None and len(ri) and hp.alpha:
            b = _rows(rb, ri)
            lg, rows = L.answer_logits(handle, b)
            if hp.retain_loss == "nll":
                lp, n = L.sequence_logprobs(lg, rows, b)
                parts["retain"] = hp.alpha * L.nll_loss(lp, n)
            else:
                keep = torch.isin(ref["retain_rows"], ri)  # reference positions of the sampled rows, in order
                parts["retain"] = hp.alpha * L.kl_to_reference(lg, ref["retain_logp"][keep])
        return parts, seen

    @torch.no_grad()
    def _check(self, handle, fb, eb) -> dict:
        out = {}
        if fb is not None:
            lg, rows = L.answer_logits(handle, fb)
            out["forget_em"] = float(L.exact_match(lg, rows, fb).mean())
        if eb is not None:
            lg, rows = L.answer_logits(handle, eb)
            out["edit_em"] = float(L.exact_match(lg, rows, eb).mean())
        return out

    @staticmethod
    def _met(em: dict, hp) -> bool:
        return em.get("forget_em", 0.0) <= hp.stop_forget_em and em.get("edit_em", 1.0) >= hp.stop_edit_em

    def _target_met(self, handle, fb, eb, hp, seen: dict, rec: dict) -> bool:
        """The stopping rule: tested first on this step's rows (free), then on every row (one no-grad
        pass), whose rates go into ``rec``."""
        if not self._met(seen, hp):
            return False
        now = self._check(handle, fb, eb)
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


def _make(name: str, forget: str, doc: str) -> type[TrainMethod]:
    cls = type(name.capitalize() + "Method", (TrainMethod,), {"name": name, "forget": forget, "__doc__": doc})
    return register(cls)


_make("ga", "ga", "Gradient ascent on the forget answers (no retain term).")
_make("gd", "ga", "Gradient difference: gradient ascent on forget answers + α·retain loss.")
_make("npo", "npo", "Negative preference optimisation (Zhang et al. 2024) + α·retain loss.")
_make("simnpo", "simnpo", "SimNPO: reference-free, length-normalised NPO + α·retain loss.")
_make("idk", "idk", "Fine-tune forget prompts to 'I don't know'-style refusals + α·retain loss.")
_make("dpo", "dpo", "IdkPO: DPO preferring a refusal over the forget answer + α·retain loss.")
_make(
    "relearn",
    "relearn",
    "ReLearn: learn fluent rewrites of the forget answers that name no forgotten entity "
    "(on the prompt and its paraphrases) + α·retain loss.",
)
_make("ft", "ga", "FT-L: fine-tune one MLP output matrix on the new answers under an L∞ constraint.")
