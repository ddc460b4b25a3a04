"""ROME: rank-one model editing (Meng et al. 2022, arXiv 2202.05262).

For each request: ``k*`` = key at the subject's last token (averaged over context templates),
``u = C⁻¹k* / ‖C⁻¹k*‖`` (``compute_u``), ``v*`` from :func:`optimize_values` (``compute_v``), and
``ΔW = (v* − W k) uᵀ / (uᵀ k)`` (ROME Eq. 2 in the code's normalised form), so that ``Ŵ k = v*``.
Several requests are applied one after another, each on the model edited by the previous ones.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .. import env
from ..corpus import corpus_from_spec
from ..stats import second_moments
from ..utils.io import hash_tensors
from ..weights import preserved_weights
from .base import HParams, Layer, Method, Momentum, NonNegFloat, NonNegInt, PosFloat, PosInt, register
from .locate import optimize_values
from .templates import context_templates

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


@dataclass
class RomeHParams(HParams):
    layer: Layer = 4
    v_lr: PosFloat = 0.5
    v_steps: PosInt = 20
    v_beta1: Momentum = 0.9  # Adam's momentum in the value search (0.9 as in the reference)
    v_weight_decay: NonNegFloat = 0.5
    kl_factor: NonNegFloat = 0.0625
    clamp_norm_factor: PosFloat = 4.0
    early_stop_loss: NonNegFloat = 0.05
    v_batch_size: PosInt = 16
    v_dtype: Literal["float32", "bfloat16"] = "float32"
    v_grouping: Literal["auto", "suffix", "template", "kl", "none"] = (
        "auto"  # "suffix": by suffix length; "template": per template; "kl"; "none": one batch
    )
    mom2_adjustment: bool = True
    mom2_corpus: str = "self"
    mom2_n_tokens: PosInt = 20_000
    context_per_prefix: NonNegInt = 1
    context_length: PosInt = 10
    seed: int = 0


_FACTORS: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def _lu(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 LU factorisation of ``C``, kept for the few most recent statistics (by content
    hash): every edit of a session solves with the same ``C``, and factorising it cost more than the
    rest of the update."""
    key = hash_tensors({"C": C})
    hit = _FACTORS.get(key)
    if hit is None:
        hit = _FACTORS[key] = torch.linalg.lu_factor(C.to(env.SOLVE_DTYPE))
        while len(_FACTORS) > 4:
            _FACTORS.popitem(last=False)
    _FACTORS.move_to_end(key)
    return hit


def rome_update(k_star, k, v_target, v_current, C) -> torch.Tensor:
    """ROME's rank-one ``ΔW`` (out × in): direction ``u ∝ C⁻¹k*`` (``k*`` = template average, solved in
    float64), scaled so that ``(W + ΔW) k = v_target`` on the plain-prompt key ``k``."""
    k64, ks64 = k.to(env.SOLVE_DTYPE), k_star.to(env.SOLVE_DTYPE)
    u = torch.linalg.lu_solve(*_lu(C), ks64[:, None])[:, 0] if C is not None else ks64.clone()
    u = u / u.norm()
    right = (v_target - v_current).to(env.SOLVE_DTYPE) / (k64 @ u)
    return torch.outer(right, u).to(torch.float32)


@register
class Rome(Method):
    name = "rome"
    hparams_cls = RomeHParams

    def run(self, handle: ModelHandle, requests, hp: RomeHParams, progress=None, state=None):
        layer = handle.check_layer(hp.layer, "layer")
        timings = {"stats": 0.0, "templates": 0.0, "keys": 0.0, "values": 0.0, "update": 0.0}
        t = time.perf_counter()
        C = None
        if hp.mom2_adjustment:
            corpus = corpus_from_spec(hp.mom2_corpus, handle, hp.mom2_n_tokens)
            C = second_moments(handle, [layer], corpus, hp.mom2_n_tokens)[layer]
        timings["stats"] = time.perf_counter() - t
        t = time.perf_counter()
        templates = context_templates(handle, hp.context_per_prefix, hp.context_length, hp.seed)
        timings["templates"] = time.perf_counter() - t
        name = handle.weight_name(layer)
        total = torch.zeros_like(handle.weight(layer), dtype=torch.float32)
        info = []
        with preserved_weights(handle.model, [name]):
            for req in requests:
                vr = optimize_values(handle, [req], layer, templates, hp, where="mlp_out")
                timings["keys"] += vr.timings["keys"]
                timings["values"] += vr.timings["values"]
                t = time.perf_counter()
                dW = rome_update(vr.keys[0], vr.plain_keys[0], vr.targets[0], vr.init[0], C)
                with torch.no_grad():
                    handle.param(name).add_(handle.to_param_orientation(dW))
                total += dW
                timings["update"] += time.perf_counter() - t
                info.append({"nll": vr.nll[0], "steps": vr.steps, "delta_norm": float(dW.norm())})
                if progress is not None:
                    progress.update(1)
        return {name: handle.to_param_orientation(total)}, {"per_request": info, "timings": timings}
