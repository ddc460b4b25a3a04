"""PRUNE: restrain the singular values of the accumulated update (Ma et al. 2025, arXiv 2405.16821).

After ``n`` sequential edits a matrix is ``W + ΔW``. PRUNE takes the SVD ``ΔW = U Σ Vᵀ`` of the
*accumulated* update and maps every singular value at or above ``σ_max(W)`` (of the original
matrix) through

    F(σ) = log_α(σ) − log_α(σ_max(W)) + σ_max(W)                      (PRUNE Eq. 6)

leaving smaller ones alone, so the edited matrix's spectrum (and condition number) cannot run away.
It wraps any locate-and-edit method: after each batch, the batch's delta becomes
``F(acc + Δ) − acc`` with ``acc = W_now − W`` (the restrained accumulation so far, read off the
live weights); the original ``W`` and ``σ_max(W)`` are kept in the :class:`~loka.state.EditState`
from the first batch that touches a matrix. Each artifact stays an additive delta, so apply/revert
are exact and a rollback needs no PRUNE bookkeeping.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..state import EditState

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


def check_alpha(alpha: float) -> None:
    """PRUNE's log base must exceed 1 (``loka.edit`` checks it before the method runs)."""
    if not alpha > 1:
        raise ConfigError(
            f"prune (--prune ALPHA) is PRUNE's log base and must be > 1 (e.g. 2.718), got {alpha}"
        )


def restrain(sigma: torch.Tensor, sigma_max: float, alpha: float = math.e) -> torch.Tensor:
    """``F(σ)``: identity below ``sigma_max``, logarithmic (base ``alpha``) growth above it."""
    check_alpha(alpha)
    log_a = lambda x: torch.log(x) / math.log(alpha)  # noqa: E731
    above = sigma >= sigma_max
    capped = log_a(sigma.clamp_min(sigma_max)) - math.log(sigma_max) / math.log(alpha) + sigma_max
    return torch.where(above, capped, sigma)


def restrain_matrix(
    delta: torch.Tensor, sigma_max: float, alpha: float = math.e
) -> tuple[torch.Tensor, float, float]:
    """``U diag(F(σ)) Vᵀ`` of ``delta`` (one float64 SVD; rank and singular vectors kept), with the
    largest singular value before and after."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    F = restrain(S, sigma_max, alpha)
    return ((U * F) @ Vh).to(delta.dtype), float(S[0]), float(F[0])


def prune_deltas(
    handle: ModelHandle, deltas: dict[str, torch.Tensor], state: EditState, alpha: float = math.e
) -> tuple[dict, dict]:
    """Restrain ``deltas`` (about to be applied on top of earlier ones) against the original weights.

    Returns the new deltas and, per matrix, ``sigma_max`` of the original and the largest singular
    value of the accumulated update before and after restraint.
    """
    out, info = {}, {}
    bounds = state.meta.setdefault("prune_sigma_max", {})
    for name, d in deltas.items():
        W = handle.param(name).detach()
        base = state.get(f"prune.base.{name}")
        if base is None:  # first batch touching this matrix: the live weight is the original
            state.set(f"prune.base.{name}", W)
            base = W
            bounds[name] = float(torch.linalg.svdvals(W.double())[0])
        smax = bounds[name]
        acc = W.double() - base.double()
        total = acc + d.double()
        restrained, before, after = restrain_matrix(total, smax, alpha)
        out[name] = (restrained - acc).to(d.dtype).contiguous()
        info[name] = {"sigma_max_W": smax, "sigma_max_acc_raw": before, "sigma_max_acc": after}
    return out, info
