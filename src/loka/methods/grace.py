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
import torch.nn.functional as F
from torch import nn

from ..errors import LokaError
from ..forgetting import losses as L
from ..runtime import routers
from ..trace import add_at_positions, capture, run_until_stopped
from .base import HParams, Layer, MemoryMethod, NonNegFloat, PosFloat, PosInt, check_loss, register
from .locate.prompts import answer_prompts
from .locate.replay import Replay

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


GROUP = 32  # requests whose values are trained together (one padded batch; memory, not results)


def _train_values(
    handle: ModelHandle,
    layer: int,
    module: nn.Module,
    batch: L.QABatch,
    pos: torch.Tensor,
    V0: torch.Tensor,
    hp: GraceHParams,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Train each request's value shifts ``δ`` (one per answer position, added to ``V0``) so that its
    target is likely: Adam on the request's mean answer NLL, at most ``n_iter`` evaluations, stopping
    at NLL < ``early_stop_loss`` — for every row of the batch at once.

    The rows are independent (each ``δ`` acts on its own row only) and Adam is elementwise, so
    training them together follows each request's own trajectory: a request that stops keeps the
    ``δ`` it stopped with and leaves the batch. Only the blocks from ``layer`` up are re-run
    (:class:`~loka.methods.locate.replay.Replay`; nothing below depends on ``δ``). Returns ``δ``,
    each request's last NLL and its number of evaluations."""
    n = len(batch)
    targets = batch.labels[pos[:, 0], pos[:, 1]]
    prompts = answer_prompts(batch.input_ids, batch.attention_mask, batch.labels, L.IGNORE)
    full = Replay(handle, prompts, layer)
    delta = torch.zeros_like(V0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    nll = [float("nan")] * n
    steps = [0] * n
    active = torch.ones(n, dtype=torch.bool)  # requests still training
    stopped = torch.zeros(len(pos), dtype=torch.bool)  # answer positions of requests that stopped
    saved = torch.zeros_like(V0)  # the δ each stopped request stopped with
    # stopped requests leave the replayed batch, unless a router (a MEMOIR memory, a LOKA codebook) is
    # applied: its per-forward state is sized to the batch of the reference forward, so that batch stays
    shrink = not routers(handle.model)
    replay = full
    for step in range(1, hp.n_iter + 1):
        rows_of = active.nonzero()[:, 0]  # the requests still training
        idx = torch.cumsum(active, 0) - 1 if shrink else torch.arange(n)  # batch row -> replay row
        sel = ~stopped
        p_rows, p_cols = idx[pos[sel, 0]], pos[sel, 1]
        with add_at_positions(module, lambda sel=sel: delta[sel], torch.stack([p_rows, p_cols], 1)):
            logits = replay.logits_at(p_rows.to(handle.device), p_cols.to(handle.device))
        tok = F.cross_entropy(logits, targets[sel].to(handle.device), reduction="none").cpu()
        m = len(rows_of) if shrink else n
        count = torch.zeros(m).index_add(0, p_rows, torch.ones_like(tok))
        per_row = (torch.zeros(m).index_add(0, p_rows, tok) / count.clamp(min=1))[idx[rows_of]]
        check_loss(per_row.sum(), "grace", step)
        stops = per_row < hp.early_stop_loss
        for r, v in zip(rows_of.tolist(), per_row.tolist()):
            nll[r], steps[r] = v, step
        if bool(stops.any()):  # these requests keep the δ they have now and leave the batch
            done = torch.zeros(n, dtype=torch.bool)
            done[rows_of[stops]] = True
            at = done[pos[:, 0]]
            saved[at] = delta.detach()[at]
            stopped |= at
            active &= ~done
        if not bool(active.any()):
            break
        opt.zero_grad()
        per_row[~stops].sum().backward()
        opt.step()
        with torch.no_grad():  # Adam's momentum moves every row: put the stopped ones back
            delta[stopped] = saved[stopped]
        if shrink and bool(stops.any()):
            replay = full.subset(active.nonzero()[:, 0])
    return delta.detach(), nll, steps


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
        requests = list(requests)
        for g in range(0, len(requests), GROUP):
            group = requests[g : g + GROUP]
            batch = L.qa_batch(handle.tokenizer, [r.text for r in group], [r.target_new for r in group])
            K, V0, pos = _io_at_answer_positions(handle, layer, batch)
            delta, nll, steps = _train_values(handle, layer, module, batch, pos, V0, hp)
            V = (V0 + delta).float()
            for i, req in enumerate(group):  # the codebook is updated request by request, in order
                at = (pos[:, 0] == i).nonzero()[:, 0]
                for t, j in enumerate(at.tolist()):
                    label = f"{req.target_new}\x1f{t}"
                    counts[_insert(keys, values, eps, labels, K[j], V[j], label, hp.eps)] += 1
                nll_final.append(nll[i])
                steps_used.append(steps[i])
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
