"""GRACE: a discrete key–value codebook on one layer (Hartvigsen et al. 2023, arXiv 2211.11031).

The adaptor wraps the MLP output matrix of ``layer``. An entry is ``(key, value, ε, label)``: the key is
the matrix's *input* at a position that predicts an answer token, the value replaces the matrix's
*output* there. At inference every token position ``t`` is checked on its own: if its input ``x_t``
lies within ``ε_j`` of the nearest key ``k_j`` (Euclidean), the output at ``t`` becomes ``v_j``;
otherwise the model is untouched. A position's input depends only on the tokens up to it, so
teacher-forced scoring and greedy generation of the target see the same decisions.

GRACE keys only the last prompt token. One vector there cannot always steer a multi-token answer
(on the tiny test models it never moves the second token), so an edit here adds one entry per
answer position: the last prompt token (GRACE's key) and each answer token but the last, labelled
``target#t``. Entries of the answer positions only fire once the answer has begun.

Editing, request by request (GRACE's sequential protocol): the values are trained so that the target
is likely with them in place (Adam on ``NLL(target | prompt)``, initialised from the current outputs —
GRACE's "warm" start; stop at NLL < ``early_stop_loss``), then the codebook is updated per entry:

* no key within ``ε_nearest + eps`` → a new entry with radius ``eps``;
* the nearest key has the same label → its radius grows to cover the new key (GRACE's "coverage");
* a different label → a new entry, and both radii shrink to half their distance, so the balls never
  overlap; the same input again (distance 0) with another answer overwrites the entry's value.

The artifact (kind ``memory``) holds ``keys``, ``values`` and ``eps``; applying it installs the
forward hook, reverting removes it, and the weights never change (revert is exact by construction).
``eps`` is relative to the key's norm (``radius = eps·‖k‖``), so one default serves models whose
activations have different scales; ``benchmarks/grace_radius.py`` measures paraphrase and
neighbourhood distances against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LokaError
from ..forgetting import losses as L
from ..trace import add_at_positions, capture, run_until_stopped
from .base import HParams, Layer, MemoryMethod, NonNegFloat, PosFloat, PosInt, check_loss, register

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


@dataclass
class GraceHParams(HParams):
    layer: Layer = 24
    eps: PosFloat = 0.2  # initial radius, as a fraction of the key's norm (configs/grace: the evidence)
    lr: PosFloat = 0.5
    n_iter: PosInt = 50
    early_stop_loss: NonNegFloat = 0.05


def _io_at_answer_positions(
    handle: ModelHandle, layer: int, batch: L.QABatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and outputs of ``layer``'s rewritten matrix at the positions whose logits predict an
    answer token (the last prompt token, then each answer token but the last), and those positions."""
    pos = (batch.labels != L.IGNORE).nonzero()  # (T, 2): row, column
    path = handle.spec.mlp_out_path(layer)
    with torch.no_grad(), capture(handle.model, [path], stop_after=path) as rec:
        run_until_stopped(
            lambda: handle.model(
                input_ids=batch.input_ids.to(handle.device),
                attention_mask=batch.attention_mask.to(handle.device),
                use_cache=False,
            )
        )
    r = rec[path]
    return r.input[pos[:, 0], pos[:, 1]].float(), r.output[pos[:, 0], pos[:, 1]].float(), pos


class GraceMemory:
    """The forward hook of an applied GRACE artifact: replace outputs whose input is within a radius."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, eps: torch.Tensor):
        self.keys, self.values, self.eps = keys, values, eps

    def __call__(self, module: nn.Module, args, out):
        x = args[0]
        if len(self.keys) == 0:
            return out
        flat = x.reshape(-1, x.shape[-1]).float()
        d = torch.cdist(flat, self.keys.to(flat.device))
        dmin, j = d.min(1)
        hit = dmin < self.eps.to(flat.device)[j]
        if not bool(hit.any()):
            return out
        o = out.reshape(-1, out.shape[-1]).clone()
        o[hit] = self.values.to(o.device, o.dtype)[j[hit]]
        return o.reshape(out.shape)


@register
class Grace(MemoryMethod):
    name = "grace"
    hparams_cls = GraceHParams
    export_kind = "grace"

    @staticmethod
    def hook(artifact) -> GraceMemory:
        return GraceMemory(
            artifact.deltas["grace.keys"], artifact.deltas["grace.values"], artifact.deltas["grace.eps"]
        )

    @staticmethod
    def export_tensors(artifact) -> tuple[dict, dict]:
        return {n: artifact.deltas[f"grace.{n}"] for n in ("keys", "values", "eps")}, {}

    def run(self, handle: ModelHandle, requests, hp: GraceHParams, progress=None, state=None):
        layer = handle.check_layer(hp.layer, "layer")
        if not hp.eps > 0:
            raise LokaError(
                f"grace: hyperparameter eps must be > 0 (a fraction of the key's norm, e.g. 0.2), got {hp.eps}"
            )
        if hp.n_iter < 1:
            raise LokaError(f"grace: hyperparameter n_iter must be >= 1, got {hp.n_iter}")
        module = handle.mlp_out(layer)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        eps: list[float] = []
        labels: list[str] = []
        nll_final, steps_used, counts = [], [], {"added": 0, "covered": 0, "overwritten": 0, "split": 0}
        for req in requests:
            batch = L.qa_batch(handle.tokenizer, [req.text], [req.target_new])
            K, V0, pos = _io_at_answer_positions(handle, layer, batch)
            delta = torch.zeros_like(V0, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=hp.lr)
            nll, step = float("nan"), 0
            while step < hp.n_iter:
                step += 1
                with add_at_positions(module, delta, pos):
                    lg, rows = L.answer_logits(handle, batch)
                loss = L.nll_loss(*L.sequence_logprobs(lg, rows, batch))
                nll = check_loss(loss, "grace", step)
                if nll < hp.early_stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
            for t, (k, v) in enumerate(zip(K, (V0 + delta.detach()).float())):
                counts[_insert(keys, values, eps, labels, k, v, f"{req.target_new}\x1f{t}", hp.eps)] += 1
            nll_final.append(nll)
            steps_used.append(step)
            if progress is not None:
                progress.update(1)
        tensors = {
            "grace.keys": torch.stack(keys),
            "grace.values": torch.stack(values),
            "grace.eps": torch.tensor(eps, dtype=torch.float32),
        }
        info = {
            "module": handle.spec.mlp_out_path(layer),
            "labels": labels,
            "entries": len(keys),
            "nll": nll_final,
            "steps": steps_used,
            **counts,
        }
        return tensors, info


def _insert(
    keys: list,
    values: list,
    eps: list,
    labels: list,
    k: torch.Tensor,
    v: torch.Tensor,
    label: str,
    eps_frac: float,
) -> str:
    """GRACE's codebook update for one (key, value, label); returns what happened."""
    radius = eps_frac * float(k.norm())
    if keys:
        dist = torch.stack(keys).sub(k).norm(dim=1)
        j = int(dist.argmin())
        dj = float(dist[j])
        if dj <= 1e-6 * float(k.norm()):  # the same input again: the newer answer overrides
            values[j], labels[j] = v, label
            return "overwritten"
        if dj < eps[j] + radius:
            if labels[j] == label:  # same answer: grow the ball to cover the new key
                eps[j] = max(eps[j], dj)
                values[j] = v
                return "covered"
            eps[j] = dj / 2  # conflicting answers: split the distance between the two balls
            radius = min(radius, dj / 2)
            outcome = "split"
        else:
            outcome = "added"
    else:
        outcome = "added"
    for store, item in ((keys, k), (values, v), (eps, radius), (labels, label)):
        store.append(item)
    return outcome
