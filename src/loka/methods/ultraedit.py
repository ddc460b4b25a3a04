"""UltraEdit: training-free lifelong editing by one closed-form solve per turn (Gu et al. 2025,
arXiv 2505.14679).

One turn edits a batch of requests on the MLP output matrices of ``layers`` (``W``, ``y = W k``):

1. forward and backward passes over the batch in mini-batches of ``batch_size`` rows (no weight change):
   at every position that predicts an answer token, each matrix's input ``k_p`` and the gradient of
   the mini-batch's mean answer cross-entropy with respect to its output, ``g_p = ∂L/∂y_p``;
2. *lifelong normalisation*: running per-dimension statistics of ``z = [k | g]`` over every turn so
   far (one set per weight shape, never reset; Chan et al.'s pairwise update per block of rows) are
   updated with this turn's rows, then ``ẑ = (z − μ) ⊘ (σ + ε)``;
3. pseudo-values ``v_p = −η ‖k̂_p‖² ĝ_p`` (the output change one gradient step on token ``p`` alone
   would make);
4. a ridge regression on the raw keys, ``Δ = (KᵀK + λI)⁻¹ KᵀV`` (``torch.linalg.solve`` in float64),
   and ``W ← W + Δᵀ`` for each matrix, all read at the pre-turn weights.

Nothing from past turns is kept but the statistics, which the :class:`~loka.state.EditState` carries
(one snapshot per batch, so a rollback restores the statistics of an earlier batch exactly). The
artifact is an ordinary weight delta.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import LokaError
from ..forgetting import losses as L
from ..requests import UpdateBatch
from .base import HParams, Layers, Method, NonNegFloat, PosFloat, PosInt, check_loss, register

if TYPE_CHECKING:
    from ..models.loader import ModelHandle
    from ..state import EditState

EPS = torch.finfo(torch.float32).eps  # the reference's ε in σ and in the normalisation


@dataclass
class UltraEditHParams(HParams):
    layers: Layers = field(default_factory=lambda: [26, 27, 28])  # MLP output matrices (configs/ultraedit)
    lr: PosFloat = 1e-6  # η of the pseudo-values
    ridge: PosFloat = 1.0  # λ of the ridge regression (the reference's identity)
    batch_size: PosInt = 10  # requests per forward/backward mini-batch
    # 0 = off (the reference). c > 0: a gradient row longer than c × the turn's median row (per matrix)
    # is scaled down to that length before it enters the statistics and the pseudo-values
    grad_clip: NonNegFloat = 0.0


@dataclass
class Normaliser:
    """Running mean and spread of ``z`` rows over every turn (the reference's ``RunningMeanStd``):
    ``n`` rows seen, mean ``μ``, accumulated squared deviation ``S``."""

    n: float
    mean: torch.Tensor
    var: torch.Tensor

    @classmethod
    def empty(cls, dim: int) -> Normaliser:
        return cls(0.0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Add a block of rows: ``n' = n + N``, ``δ = x̄ − μ``, ``μ += Nδ/n'``,
        ``S += N s² + n N δ² / n'`` (``s²`` the block's unbiased variance; 0 for one row)."""
        x = x.double()
        N = x.shape[0]
        n1 = self.n + N
        delta = x.mean(0) - self.mean
        s2 = x.var(0) if N > 1 else torch.zeros_like(self.mean)
        self.mean = self.mean + N * delta / n1
        self.var = self.var + N * s2 + self.n * N * delta.pow(2) / n1
        self.n = n1

    @property
    def std(self) -> torch.Tensor:
        return (self.var / (self.n - 1 + EPS)).sqrt()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / (self.std + EPS)).float()

    def to_tensor(self) -> torch.Tensor:
        """``[n, μ…, S…]`` as one float64 vector (what the state stores per batch)."""
        return torch.cat([torch.tensor([self.n], dtype=torch.float64), self.mean, self.var])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Normaliser:
        d = (t.numel() - 1) // 2
        t = t.double()
        return cls(float(t[0]), t[1 : 1 + d].clone(), t[1 + d :].clone())


def _state_name(shape: tuple[int, int]) -> str:
    return f"ultraedit.stats.{shape[0]}x{shape[1]}"


def load_normalisers(
    state: EditState | None, shapes: set[tuple[int, int]]
) -> dict[tuple[int, int], Normaliser]:
    """The statistics after the state's last batch (empty ones for a new state or a new shape)."""
    out = {}
    for shape in shapes:
        snaps = state.batch_tensors(_state_name(shape)) if state is not None else []
        out[shape] = Normaliser.from_tensor(snaps[-1]) if snaps else Normaliser.empty(shape[0] + shape[1])
    return out


def keys_and_gradients(
    handle: ModelHandle, requests, layers: list[int], batch_size: int, progress=None
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, per mini-batch: the matrix's inputs ``K`` (N, d_in) and the gradients of the
    mini-batch's mean answer cross-entropy with respect to its outputs ``G`` (N, d_out), at the
    positions that predict answer tokens; the weights are not changed."""
    modules = {layer: handle.mlp_out(layer) for layer in layers}
    out: dict[int, list] = {layer: [] for layer in layers}
    weights = [m.weight for m in modules.values()]
    was = [w.requires_grad for w in weights]
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        batch = L.qa_batch(handle.tokenizer, [r.text for r in chunk], [r.target_new for r in chunk])
        sel = (batch.labels != L.IGNORE).to(handle.device)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(layer, seen=seen, sel=sel):
            def fn(_m, args, y):
                seen[layer] = (args[0][sel].detach().float(), y)

            return fn

        hooks = [modules[layer].register_forward_hook(hook(layer)) for layer in layers]
        try:
            for w in weights:  # so the outputs join the graph; only their gradients are asked for
                w.requires_grad_(True)
            with torch.enable_grad():
                lg, rows = L.answer_logits(handle, batch)
                targets = batch.labels[batch.labels != L.IGNORE].to(lg.device)
                loss = torch.nn.functional.cross_entropy(lg, targets)
                check_loss(loss, "ultraedit", i // batch_size + 1)
                grads = torch.autograd.grad(loss, [seen[layer][1] for layer in layers])
        finally:
            for h in hooks:
                h.remove()
            for w, r in zip(weights, was):
                w.requires_grad_(r)
        for layer, g in zip(layers, grads):
            out[layer].append((seen[layer][0], g[sel].float()))
        if progress is not None:
            progress.update(len(chunk))
    return out


def clip_gradients(rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], c: float) -> dict[str, int]:
    """Scale every gradient row longer than ``c`` × the median row length of its matrix (over the whole
    turn) down to that length, in place; returns how many rows were clipped per layer.

    Not in the reference. A single request the model is far from answering can give a gradient row
    tens of times the others'; the per-dimension normalisation, whose spread one turn barely moves,
    passes it on at full size, and that turn's update is several times the usual one."""
    out = {}
    for layer, blocks in rows.items():
        norms = torch.cat([g.norm(dim=1) for _, g in blocks])
        cap = c * float(norms.median())
        n = 0
        for i, (k, g) in enumerate(blocks):
            r = g.norm(dim=1, keepdim=True)
            over = r > cap
            n += int(over.sum())
            blocks[i] = (k, torch.where(over, g * (cap / r.clamp_min(1e-30)), g))
        out[str(layer)] = n
    return out


def solve_shift(K: torch.Tensor, V: torch.Tensor, ridge: float) -> torch.Tensor:
    """``Δ = (KᵀK + λI)⁻¹ KᵀV`` (d_in, d_out), solved in float64."""
    K, V = K.double(), V.double()
    A = K.T @ K + ridge * torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
    return torch.linalg.solve(A, K.T @ V)


@register
class UltraEdit(Method):
    name = "ultraedit"
    hparams_cls = UltraEditHParams
    stateful = True  # the lifelong normalisation statistics

    def run(self, handle: ModelHandle, requests, hp: UltraEditHParams, progress=None, state=None):
        batch = UpdateBatch.of(requests)
        edits = list(batch.edits)
        if not edits:
            raise LokaError("ultraedit: no edit requests given")
        layers = [handle.check_layer(layer, "layers") for layer in hp.layers]
        spec = handle.spec
        shapes = {}
        for layer in layers:
            w = handle.mlp_out(layer).weight
            d_out, d_in = (w.shape[1], w.shape[0]) if spec.transposed else (w.shape[0], w.shape[1])
            shapes[layer] = (d_in, d_out)
        norms = load_normalisers(state, set(shapes.values()))
        t0 = time.time()
        rows = keys_and_gradients(handle, edits, layers, hp.batch_size, progress)
        t1 = time.time()
        clipped = clip_gradients(rows, hp.grad_clip) if hp.grad_clip > 0 else {}
        # statistics first, block by block in the reference's order (mini-batch, then matrix) ...
        for b in range(len(next(iter(rows.values())))):
            for layer in layers:
                K, G = rows[layer][b]
                norms[shapes[layer]].update(torch.cat([K, G], -1))
        # ... then every matrix's pseudo-values with the updated statistics, and its ridge solve
        deltas, info = {}, {"layers": layers, "rows": {}, "key_norm": {}, "shift_norm": {}}
        for layer in layers:
            d_in, d_out = shapes[layer]
            K = torch.cat([k for k, _ in rows[layer]])
            G = torch.cat([g for _, g in rows[layer]])
            z = norms[shapes[layer]](torch.cat([K, G], -1))
            k_hat, g_hat = z[:, :d_in], z[:, d_in:]
            V = -hp.lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat
            delta = solve_shift(K, V, hp.ridge)  # (d_in, d_out)
            if not torch.isfinite(delta).all():
                raise LokaError(
                    f"ultraedit: the solve for layer {layer} gave NaN/Inf; nothing was applied; lower lr "
                    f"(now {hp.lr:g}) or raise ridge (now {hp.ridge:g})"
                )
            name = spec.mlp_out_weight(layer)
            w = handle.mlp_out(layer).weight
            deltas[name] = (delta if spec.transposed else delta.T).to(w.dtype).contiguous()
            info["rows"][str(layer)] = int(K.shape[0])
            info["key_norm"][str(layer)] = round(float(K.norm(dim=1).mean()), 4)
            info["shift_norm"][str(layer)] = round(float(delta.norm()), 6)
        if state is not None:
            for shape, nm in norms.items():
                state.add_batch_tensor(_state_name(shape), nm.to_tensor())
        if hp.grad_clip > 0:
            info["clipped_rows"] = clipped
        info["normaliser_rows"] = {f"{s[0]}x{s[1]}": int(nm.n) for s, nm in norms.items()}
        # the evaluation runner's per-phase split (edits.jsonl): the passes, then statistics and solves
        info["timings"] = {"keys": t1 - t0, "update": time.time() - t1}
        if not all(math.isfinite(v) for v in info["shift_norm"].values()):
            raise LokaError("ultraedit: a weight shift is not finite; nothing was applied")
        return deltas, info
