"""LyapLock: bounded knowledge preservation in sequential editing (arXiv 2505.15702).

Sequential editing as a long-term constrained problem — minimise the edit loss on average while the
time-averaged preservation loss ``PL`` stays below ``D`` — made per-batch with a virtual queue ``Z``
and Lyapunov drift-plus-penalty. Per edited layer and batch ``t`` (the paper's Eq. 13):

    Δ(t) = [V R₁ᵀK₁ + V (V_p − W K_p)ᵀ K_p + aZ(t) (W₀ − W) λC] · (V K₁ᵀK₁ + V K_pᵀK_p + aZ(t) λC)⁻¹

with ``R₁`` MEMIT's distributed residuals, ``(K_p, V_p)`` the keys and values of all earlier
batches (kept per batch in the :class:`~loka.state.EditState`), ``λC ≈ K₀K₀ᵀ`` the preserved keys'
moment (MEMIT's ``mom2_update_weight`` × the statistics) and ``W₀`` the original matrix, so
``(W₀ − W) λC`` pulls the accumulated update back where preserved keys live. After the batch,
``PL(t) = λ tr(ΔW C ΔWᵀ)`` of the accumulated ``ΔW = W − W₀`` updates the queue
``Z ← max(Z + a(PL − D) + b, Z_max)`` (Eq. 7). ``D = α·D_base`` with ``D_base`` the ``PL`` after the
first batch, ``a = 1/√D`` and ``Z_init = Z_max = √D`` (App. D.4), so ``aZ = 1`` at the start — the
first batch is plain MEMIT plus nothing — and preservation tightens whenever ``PL`` overshoots ``D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import env
from .base import NonNegFloat, PosFloat, register
from .memit import Memit, MemitHParams

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


@dataclass
class LyapLockHParams(MemitHParams):
    alpha: PosFloat = 60.0  # D = alpha * D_base
    V: NonNegFloat = 1.0  # weight of the edit and past-edit losses
    b: float = 0.0  # queue drift


def lyaplock_solve(
    K: torch.Tensor,
    R: torch.Tensor,
    W: torch.Tensor,
    W0: torch.Tensor,
    lamC: torch.Tensor,
    Kp: torch.Tensor | None,
    Vp: torch.Tensor | None,
    aZ: float,
    V: float,
) -> torch.Tensor:
    """Eq. 13 for keys ``K`` (n × d_in), residuals ``R`` (n × d_out), current/original ``W``/``W0``
    (d_out × d_in), ``λC`` (d_in × d_in) and past ``(Kp, Vp)``; returns Δ (d_out × d_in), float32."""
    dt = env.SOLVE_DTYPE
    K, R, W, W0, lamC = (x.to(dt) for x in (K, R, W, W0, lamC))
    A = V * K.T @ K + aZ * lamC
    B = V * R.T @ K + aZ * (W0 - W) @ lamC
    if Kp is not None:
        Kp, Vp = Kp.to(dt), Vp.to(dt)
        A = A + V * Kp.T @ Kp
        B = B + V * (Vp - Kp @ W.T).T @ Kp
    return torch.linalg.solve(A, B.T).T.to(torch.float32)  # A is symmetric: Δ A = B  ⇔  A Δᵀ = Bᵀ


@register
class LyapLock(Memit):
    name = "lyaplock"
    hparams_cls = LyapLockHParams
    stateful = True

    def _names(self, handle: ModelHandle, layer):
        w = handle.weight_name(layer)
        return f"lyaplock.base.{w}", f"lyaplock.keys.{w}", f"lyaplock.values.{w}", w

    def solve(self, handle: ModelHandle, layer, K, R, C, hp: LyapLockHParams, state):
        base_n, keys_n, vals_n, w = self._names(handle, layer)
        W = handle.weight(layer).detach()
        if state is None:  # a single batch: the queue starts at aZ = 1 (MEMIT with past terms empty)
            return lyaplock_solve(K, R, W, W, hp.mom2_update_weight * C, None, None, 1.0, hp.V)
        if state.get(base_n) is None:
            state.set(base_n, W)
        keys, vals = state.batch_tensors(keys_n), state.batch_tensors(vals_n)
        Kp = torch.cat(keys) if keys else None
        Vp = torch.cat(vals) if vals else None
        q = state.meta.setdefault("lyaplock", {}).setdefault(w, {})
        aZ = q["a"] * q["Z"] if "Z" in q else 1.0
        self._C = getattr(self, "_C", {})
        self._C[layer] = C
        self.info.setdefault("lyaplock_aZ", {})[str(layer)] = aZ
        return lyaplock_solve(K, R, W, state.get(base_n), hp.mom2_update_weight * C, Kp, Vp, aZ, hp.V)

    def after_update(self, handle: ModelHandle, layer, K_after, hp: LyapLockHParams, state):
        if state is None:
            return
        base_n, keys_n, vals_n, w = self._names(handle, layer)
        W = handle.weight(layer).detach()
        state.add_batch_tensor(keys_n, K_after.to(torch.float32))
        state.add_batch_tensor(vals_n, (K_after.double() @ W.double().T).to(torch.float32))
        dW = (W - state.get(base_n)).double()
        pl = float(hp.mom2_update_weight * torch.trace(dW @ self._C[layer].double() @ dW.T))
        q = state.meta["lyaplock"][w]
        if "D" not in q:  # after the first batch: the budget and the queue's scale
            D = max(hp.alpha * pl, 1e-12)
            q.update(D=D, a=1 / math.sqrt(D), Z=math.sqrt(D), Z_max=math.sqrt(D))
        else:
            q["Z"] = max(q["Z"] + q["a"] * (pl - q["D"]) + hp.b, q["Z_max"])
        q["PL"] = pl
        self.info.setdefault("lyaplock_PL", {})[str(layer)] = pl
