"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025, arXiv 2410.02355).

MEMIT's residuals and keys, with the update confined to the null space of the preserved keys:
``P = Û Ûᵀ`` with ``Û`` the eigenvectors of ``C = E[k kᵀ]`` whose eigenvalues are below
``nullspace_threshold`` (so ``P k₀ ≈ 0`` for preserved keys), and the closed form

    ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + L2·I)⁻¹            (AlphaEdit Eq. 9)

solved as ``solve(P (K₁K₁ᵀ + K_pK_pᵀ) + L2·I, P K₁ Rᵀ)ᵀ`` in float64. ``K_pK_pᵀ`` comes from the keys of all
earlier batches, kept per batch in the :class:`~loka.state.EditState` (recomputed after each
batch's update, as the reference code does), so a rollback simply drops the last batches' keys. ``P`` is computed once from the unedited statistics and
cached on disk next to them, keyed by the statistics' content and the threshold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from .. import env
from ..utils.io import atomic_write_json, hash_tensors, save_safetensors, sha256_file, tmp_sibling
from .base import NonNegFloat, PosFloat, PosInt, UnitFloat, register
from .memit import Memit, MemitHParams

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHParams(MemitHParams):
    nullspace_threshold: PosFloat = 2e-2
    L2: NonNegFloat = 10.0
    # keep K_pK_pᵀ, the keys of earlier batches, in the solve (Eq. 9); off = every batch is solved as if
    # it were the first (its own null-space projection only), the ablation of the accumulated-keys term
    accumulate_keys: bool = True
    # AlphaEdit+ ("Model Editing in the Presence of Conflicting and Inconsistent Knowledge"),
    # each off by default and independent
    relax_projection: bool = False
    relax_epsilon: UnitFloat = 0.01  # stop relaxing when the edit loss falls by less than this fraction
    relax_step: PosInt = 16  # eigenvectors added back per relaxation step
    relax_max: PosInt = 512  # at most this many directions added back
    smooth_values: bool = False
    smooth_T: PosInt = 5  # iterations of the value schedule
    conflict_weighting: bool = False


def nullspace_projection(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``P = Û Ûᵀ`` over the eigenvectors of the symmetric ``C`` with eigenvalue < ``threshold``;
    returns ``(P, rank)`` (float32)."""
    evals, evecs = torch.linalg.eigh(C.to(env.SOLVE_DTYPE))
    U = evecs[:, evals < threshold]
    return (U @ U.T).to(torch.float32), int(U.shape[1])


def cached_projection(
    handle: ModelHandle, layer: int, C: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, int]:
    """:func:`nullspace_projection`, cached by model hash, module, statistics content and threshold;
    the file's sha256 is checked before use."""
    key = f"{hash_tensors({'C': C.contiguous()})[:16]}-{threshold:g}"
    d = env.cache_dir("projections") / handle.model_hash[:16] / handle.spec.mlp_out_path(layer)
    f, meta_f = d / f"{key}.safetensors", d / f"{key}.json"
    if f.exists() and meta_f.exists():
        meta = json.loads(meta_f.read_text())
        if sha256_file(f) == meta.get("sha256"):
            return load_file(str(f))["P"], int(meta["rank"])
        log.warning("projection cache %s failed its sha256 check; recomputing", f)
    P, rank = nullspace_projection(C, threshold)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / tmp_sibling(f)
    try:
        save_safetensors({"P": P.contiguous()}, tmp)
        tmp.replace(f)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(
        meta_f, {"sha256": sha256_file(f), "rank": rank, "threshold": threshold, "dim": P.shape[0]}
    )
    return P, rank


def alphaedit_solve(
    K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, past: torch.Tensor | None, l2: float
) -> torch.Tensor:
    """``ΔW = (solve(P (K₁K₁ᵀ + K_pK_pᵀ) + L2·I, P K₁ Rᵀ))ᵀ`` for keys ``K`` (n × d_in), residuals
    ``R`` (n × d_out), projection ``P`` and past-key moment ``K_pK_pᵀ``; (d_out × d_in), float32."""
    dt = env.SOLVE_DTYPE
    Kt, P64 = K.to(dt).T, P.to(dt)
    M = Kt @ Kt.T
    if past is not None:
        M = M + past.to(dt)
    A = P64 @ M + l2 * torch.eye(M.shape[0], dtype=dt)
    return torch.linalg.solve(A, P64 @ Kt @ R.to(dt)).T.to(torch.float32)


def relax(
    K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, P: torch.Tensor, past: torch.Tensor | None, hp
) -> tuple[torch.Tensor, int]:
    """AlphaEdit+ remedy 1: give back to ``P`` the preserved directions that matter least.

    Walk over the eigenvectors of ``C`` that ``P`` removes, smallest eigenvalue first, adding
    ``relax_step`` of them at a time to ``P``; after each step re-solve and measure the edit loss
    ``‖ΔW K₁ᵀ − Rᵀ‖²``; stop when a step lowers it by less than ``relax_epsilon`` (relative) and undo
    that last step (AlphaEdit+: ``P_mod = P + P̃ − u_l u_lᵀ``). Adding ``relax_step`` vectors per solve
    instead of one is our shortcut (one solve per direction would cost a 1536² solve each).
    """
    evals, evecs = torch.linalg.eigh(C.to(env.SOLVE_DTYPE))
    removed = evecs[:, evals >= hp.nullspace_threshold]  # ascending eigenvalue order
    dt = env.SOLVE_DTYPE

    def loss(Pm):
        dW = alphaedit_solve(K, R, Pm, past, hp.L2).to(dt)
        return float((K.to(dt) @ dW.T - R.to(dt)).pow(2).sum())

    cur, best, added = P.to(dt), loss(P), 0
    while added < min(hp.relax_max, removed.shape[1]):
        U = removed[:, added : added + hp.relax_step]
        trial = cur + U @ U.T
        new = loss(trial)
        if best - new < hp.relax_epsilon * best:
            break
        cur, best, added = trial, new, added + U.shape[1]
    return cur.to(torch.float32), added


def smoothed_solve(
    K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, past: torch.Tensor | None, hp
) -> torch.Tensor:
    """AlphaEdit+ remedy 2: reach large-residual targets gradually.

    ``v_i^t = v_i + β_i(t)(v_{0,i} − v_i)``, ``β_i(t) = 0`` if ``‖r_i‖ ≤ τ_r`` else ``(T − t)/(2T)``
    with ``τ_r`` the batch's median residual norm (AlphaEdit+; T and τ_r are our choices, as
    the source leaves them open). In residual terms the target at iteration ``t`` is ``(1 − β_i(t)) r_i``;
    each iteration solves for what is still missing and the updates add up.
    """
    T = max(1, hp.smooth_T)
    norms = R.norm(dim=1)
    big = norms > norms.median()
    total = torch.zeros(R.shape[1], K.shape[1])
    for t in range(T + 1):
        beta = torch.where(big, torch.tensor((T - t) / (2 * T)), torch.tensor(0.0))
        missing = (1 - beta)[:, None] * R - K @ total.T
        total = total + alphaedit_solve(K, missing, P, past, hp.L2)
    return total


def conflict_weights(K: torch.Tensor, Kp: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """AlphaEdit+ remedy 3: ``λ_p = 1 / (1 + max_j cos(k_p, k_j))`` over the new keys ``j``, and 0 when
    a new edit has the same subject and relation as past edit ``p`` (it supersedes it)."""
    cos = (
        torch.nn.functional.normalize(Kp.double(), dim=1) @ torch.nn.functional.normalize(K.double(), dim=1).T
    )
    lam = 1.0 / (1.0 + cos.max(dim=1).values.clamp_min(0.0))
    return torch.where(same, torch.zeros_like(lam), lam)


def _fact_id(r) -> str:
    return f"{r.subject}\x1f{r.prompt}"


def past_key_name(handle: ModelHandle, layer: int) -> str:
    return f"alphaedit.keys.{handle.weight_name(layer)}"


def past_moment(handle: ModelHandle, layer: int, state) -> torch.Tensor | None:
    """``K_p K_pᵀ`` (d_in × d_in, float64) over the keys of all earlier batches, or ``None``."""
    keys = state.batch_tensors(past_key_name(handle, layer)) if state is not None else []
    if not keys:
        return None
    Kp = torch.cat(keys).double()
    return Kp.T @ Kp


@register
class AlphaEdit(Memit):
    name = "alphaedit"
    hparams_cls = AlphaEditHParams
    stateful = True

    def solve(self, handle: ModelHandle, layer, K, R, C, hp: AlphaEditHParams, state):
        P, rank = cached_projection(handle, layer, C, hp.nullspace_threshold)
        self.info.setdefault("nullspace_rank", {})[str(layer)] = rank
        if rank == 0:
            log.warning(
                "layer %d: no eigenvalue of C is below nullspace_threshold=%g; the update is zero",
                layer,
                hp.nullspace_threshold,
            )
        past = past_moment(handle, layer, state) if hp.accumulate_keys else None
        if hp.conflict_weighting and past is not None:
            keys = state.batch_tensors(past_key_name(handle, layer))
            Kp = torch.cat(keys).double()
            ids = [
                i for b in range(state.batches) for i in state.meta.get("alphaedit_facts", {}).get(str(b), [])
            ]
            new = {_fact_id(r) for r in self.requests}
            same = (
                torch.tensor([i in new for i in ids])
                if len(ids) == Kp.shape[0]
                else torch.zeros(Kp.shape[0], dtype=torch.bool)
            )
            lam = conflict_weights(K, Kp, same)
            past = (Kp * lam[:, None]).T @ Kp
            self.info.setdefault("superseded", {})[str(layer)] = int(same.sum())
        if hp.relax_projection:
            P, added = relax(K, R, C, P, past, hp)
            self.info.setdefault("relaxed_dims", {})[str(layer)] = added
        if hp.smooth_values:
            return smoothed_solve(K, R, P, past, hp)
        return alphaedit_solve(K, R, P, past, hp.L2)

    def after_update(self, handle: ModelHandle, layer, K_after, hp, state):
        if state is not None:
            state.add_batch_tensor(past_key_name(handle, layer), K_after.to(torch.float32))
            # which fact each stored key row belongs to (conflict weighting supersedes by identity)
            state.meta.setdefault("alphaedit_facts", {})[str(state.batches)] = [
                _fact_id(r) for r in self.requests
            ]
