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

import torch
from safetensors.torch import load_file, save_file

from .. import env
from ..utils.io import atomic_write_json, hash_tensors, sha256_file
from .base import register
from .memit import Memit, MemitHParams

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHParams(MemitHParams):
    nullspace_threshold: float = 2e-2
    L2: float = 10.0


def nullspace_projection(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``P = Û Ûᵀ`` over the eigenvectors of the symmetric ``C`` with eigenvalue < ``threshold``;
    returns ``(P, rank)`` (float32)."""
    evals, evecs = torch.linalg.eigh(C.to(env.SOLVE_DTYPE))
    U = evecs[:, evals < threshold]
    return (U @ U.T).to(torch.float32), int(U.shape[1])


def cached_projection(handle, layer: int, C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
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
    tmp = f.with_name(f".{f.name}.tmp")
    save_file({"P": P.contiguous()}, str(tmp))
    tmp.replace(f)
    atomic_write_json(meta_f, {"sha256": sha256_file(f), "rank": rank, "threshold": threshold, "dim": P.shape[0]})
    return P, rank


def alphaedit_solve(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, past: torch.Tensor | None,
                    l2: float) -> torch.Tensor:
    """``ΔW = (solve(P (K₁K₁ᵀ + K_pK_pᵀ) + L2·I, P K₁ Rᵀ))ᵀ`` for keys ``K`` (n × d_in), residuals
    ``R`` (n × d_out), projection ``P`` and past-key moment ``K_pK_pᵀ``; (d_out × d_in), float32."""
    dt = env.SOLVE_DTYPE
    Kt, P64 = K.to(dt).T, P.to(dt)
    M = Kt @ Kt.T
    if past is not None:
        M = M + past.to(dt)
    A = P64 @ M + l2 * torch.eye(M.shape[0], dtype=dt)
    return torch.linalg.solve(A, P64 @ Kt @ R.to(dt)).T.to(torch.float32)


def past_key_name(handle, layer: int) -> str:
    return f"alphaedit.keys.{handle.weight_name(layer)}"


def past_moment(handle, layer: int, state) -> torch.Tensor | None:
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

    def solve(self, handle, layer, K, R, C, hp: AlphaEditHParams, state):
        P, rank = cached_projection(handle, layer, C, hp.nullspace_threshold)
        self.info.setdefault("nullspace_rank", {})[str(layer)] = rank
        if rank == 0:
            log.warning("layer %d: no eigenvalue of C is below nullspace_threshold=%g; the update is zero",
                        layer, hp.nullspace_threshold)
        return alphaedit_solve(K, R, P, past_moment(handle, layer, state), hp.L2)

    def after_update(self, handle, layer, K_after, hp, state):
        if state is not None:
            state.add_batch_tensor(past_key_name(handle, layer), K_after.to(torch.float32))
