"""WISE: a side memory next to one MLP output matrix, with activation-gap routing (Wang et al. 2024,
arXiv 2405.14768).

The side memory is a copy ``W' = W + D`` of the MLP output matrix of ``layer``; an edit trains only
``D``, and only on a random fraction ``mask_ratio`` of its entries (WISE's knowledge shard: each run
draws its own mask, so sequential runs write to different parameters). At inference the side memory
answers where the activation gap is large: with ``a_t`` the matrix's input at position ``t``,

    Δact(t) = ‖D a_t‖₂ ,  output_t = W a_t + D a_t   if Δact(t) ≥ τ,   else W a_t,

so an untrained side memory (``D = 0``) never fires and the model is untouched. Routing is decided
per token position (a position's input depends only on the tokens up to it, so teacher-forced
scoring and cached greedy generation see the same decisions; WISE decides per sequence). ``τ`` is
WISE's rule: ``act_ratio`` × the smallest gap over the edits' in-scope positions after training.

Training (Adam on the masked ``D``, at most ``n_iter`` steps — fewer once the NLL is below
``early_stop_loss`` after ``min_steps`` —, entries clamped to ±``norm_constraint``):
``NLL(target | prompt)`` with the side memory in place at every position, plus WISE's margin loss
``[Δ_out − Δ_in + γ]₊ + [Δ_out − α]₊ + [β − Δ_in]₊`` on the gaps of in-scope positions (those that
predict answer tokens) and out-of-scope positions (every token of :data:`OUT_OF_SCOPE`, generic
sentences that ship with loka; the evaluation's neighbourhood prompts are never used, so NS is not
trained on). The margins ``(α, β, γ)`` are in units of the median output norm ``‖W a‖`` over the
out-of-scope tokens, so one default serves models whose activations have different scales (WISE's
absolute 5 / 20 / 10 were set for LLaMA-2-7B).

The artifact (kind ``memory``) holds ``wise.delta`` (``D`` as (out, in)) and ``wise.tau``; applying
installs the routed side memory as a forward hook, reverting removes it; weights never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import torch
from torch import nn

from ..errors import LokaError
from ..forgetting import losses as L
from ..requests import fill_subject
from ..trace import capture, run_until_stopped
from .base import (
    Domain,
    HParams,
    Layer,
    MemoryMethod,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    check_loss,
    register,
)
from .grace import _io_at_answer_positions
from .train import _rows

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

#: Out-of-scope text for the margin loss: everyday sentences unrelated to any edit.
OUT_OF_SCOPE = [
    "The weather today is sunny with a light breeze from the west.",
    "She opened the window and looked at the garden.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The meeting has been moved to Thursday afternoon.",
    "He bought bread, milk and a dozen eggs at the shop.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "The train to the airport leaves every twenty minutes.",
    "Our team finished the project two days ahead of schedule.",
    "The river flows slowly through the old town.",
    "Please remember to turn off the lights when you leave.",
    "The capital of Japan is Tokyo, a city of many millions.",
    "A healthy breakfast includes fruit and whole grains.",
    "The museum is closed on Mondays and public holidays.",
    "Cats often sleep for more than twelve hours a day.",
    "The children played football in the park after school.",
    "An apple a day keeps the doctor away, as the saying goes.",
]


#: Subjects that turn an edit prompt into a template-only negative ("it was born in the city of").
NEUTRAL_SUBJECTS = ("it", "someone")


@dataclass
class WiseHParams(HParams):
    layer: Layer = 24
    lr: PosFloat = 0.01
    n_iter: PosInt = 70
    mask_ratio: Annotated[float, Domain(gt=0, le=1)] = (
        0.2  # fraction of D's entries this run may change (the knowledge shard)
    )
    norm_constraint: PosFloat = 1.0  # |D_ij| ≤ this
    act_ratio: Annotated[float, Domain(gt=0, le=1)] = 0.88  # τ = act_ratio · min in-scope gap
    margin_out: NonNegFloat = 0.1  # α: out-of-scope gap ceiling (× median output norm)
    margin_in: NonNegFloat = 1.0  # β: in-scope gap floor
    margin_gap: NonNegFloat = 0.5  # γ: required Δ_in − Δ_out
    margin_weight: NonNegFloat = 1.0
    batch_size: PosInt = 32  # edit rows per step (all when fewer)
    early_stop_loss: NonNegFloat = 0.05  # stop once NLL is below this, after min_steps of margin training
    min_steps: NonNegInt = 30
    template_negatives: bool = True  # the edit prompts with neutral subjects are out of scope too
    seed: int = 0


class SideMemory:
    """The forward hook of an applied WISE artifact: add ``D a_t`` where ``‖D a_t‖ ≥ τ``."""

    def __init__(self, delta: torch.Tensor, tau: float):
        self.delta, self.tau = delta, tau

    def __call__(self, module: nn.Module, args, out):
        a = args[0]
        d = a.to(self.delta.dtype) @ self.delta.to(a.device).T
        fire = d.norm(dim=-1, keepdim=True) >= self.tau
        if not bool(fire.any()):
            return out
        return out + (d * fire).to(out.dtype)


def _inputs(handle: ModelHandle, path: str, texts: list[str]) -> torch.Tensor:
    """The inputs of module ``path`` at every real token of ``texts`` (rows, no padding)."""
    enc = handle.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), capture(handle.model, [path], stop_after=path) as rec:
        run_until_stopped(
            lambda: handle.model(**{k: v.to(handle.device) for k, v in enc.items()}, use_cache=False)
        )
    return rec[path].input[enc["attention_mask"].bool().to(handle.device)].float()


@register
class Wise(MemoryMethod):
    name = "wise"
    hparams_cls = WiseHParams
    export_kind = "wise"

    @staticmethod
    def hook(artifact) -> SideMemory:
        return SideMemory(artifact.deltas["wise.delta"], float(artifact.deltas["wise.tau"]))

    @staticmethod
    def export_tensors(artifact) -> tuple[dict, dict]:
        return {"delta": artifact.deltas["wise.delta"], "tau": artifact.deltas["wise.tau"].reshape(1)}, {}

    def run(self, handle: ModelHandle, requests, hp: WiseHParams, progress=None, state=None):
        layer = handle.check_layer(hp.layer, "layer")
        if not 0 < hp.mask_ratio <= 1:
            raise LokaError(f"wise: hyperparameter mask_ratio must be in (0, 1], got {hp.mask_ratio}")
        if hp.n_iter < 1:
            raise LokaError(f"wise: hyperparameter n_iter must be >= 1, got {hp.n_iter}")
        if not hp.norm_constraint > 0:
            raise LokaError(f"wise: hyperparameter norm_constraint must be > 0, got {hp.norm_constraint}")
        path = handle.spec.mlp_out_path(layer)
        module = handle.mlp_out(layer)
        w = handle.weight(layer).detach().float()  # (out, in)
        gen = torch.Generator().manual_seed(hp.seed)
        mask = (torch.rand(w.shape, generator=gen) < hp.mask_ratio).float()
        batch = L.qa_batch(handle.tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        a_in = _io_at_answer_positions(handle, layer, batch)[0]
        negatives = list(OUT_OF_SCOPE)
        if hp.template_negatives:
            negatives += sorted({fill_subject(r.prompt, s) for r in requests for s in NEUTRAL_SUBJECTS})
        a_out = _inputs(handle, path, negatives)
        scale = float((a_out @ w.T).norm(dim=-1).median())
        alpha, beta, gamma = hp.margin_out * scale, hp.margin_in * scale, hp.margin_gap * scale

        D = torch.zeros_like(w, requires_grad=True)
        opt = torch.optim.Adam([D], lr=hp.lr)
        hook = module.register_forward_hook(
            lambda _m, args, out: out + (args[0].float() @ (D * mask).T).to(out.dtype)
        )
        rng = torch.Generator().manual_seed(hp.seed)
        history, step = [], 0
        try:
            for step in range(1, hp.n_iter + 1):
                idx = torch.randperm(len(batch), generator=rng)[: hp.batch_size].sort().values
                rows = _rows(batch, idx)
                lg, r = L.answer_logits(handle, rows)
                nll = L.nll_loss(*L.sequence_logprobs(lg, r, rows))
                Dm = D * mask
                g_in = (a_in @ Dm.T).norm(dim=-1)
                g_out = (a_out @ Dm.T).norm(dim=-1)
                margin = (
                    torch.relu(g_out.mean() - g_in.mean() + gamma)
                    + torch.relu(g_out - alpha).mean()
                    + torch.relu(beta - g_in).mean()
                )
                loss = nll + hp.margin_weight * margin / scale
                check_loss(loss, "wise", step)
                history.append(
                    {"step": step, "nll": float(nll.detach()), "margin": float(margin.detach()) / scale}
                )
                if float(nll.detach()) < hp.early_stop_loss and (
                    step >= hp.min_steps or float(margin.detach()) == 0.0
                ):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    D.clamp_(-hp.norm_constraint, hp.norm_constraint)
        finally:
            hook.remove()
        with torch.no_grad():
            Dm = (D * mask).detach()
            g_in = (a_in @ Dm.T).norm(dim=-1)
            g_out = (a_out @ Dm.T).norm(dim=-1)
            tau = hp.act_ratio * float(g_in.min())
        if progress is not None:
            progress.update(len(requests))
        info = {
            "module": path,
            "tau": tau,
            "scale": scale,
            "steps": step,
            "history": history,
            "gap_in_min": float(g_in.min()),
            "gap_in_median": float(g_in.median()),
            "gap_out_max": float(g_out.max()),
            "out_of_scope_fired": float((g_out >= tau).float().mean()),
        }
        return {"wise.delta": Dm, "wise.tau": torch.tensor([tau])}, info
