"""MEMIT: mass-editing memory in a transformer (Meng et al. 2023, arXiv 2210.07229).

``z_i = h_L + δ_i`` at the last edit layer ``L`` (:func:`optimize_values` with ``where="block_out"``),
then for each layer ``l`` in ascending order the remaining residual ``R = Z − H_L`` (recomputed
with the lower layers already edited) is spread evenly over the layers left and solved as
``ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹`` in float64 (MEMIT Eq. 14).

Families that normalise the MLP output before adding it to the residual stream (Gemma 2/3's
``post_feedforward_layernorm``) get the residual mapped back through that norm to first order
(:func:`through_post_norm`): the down-projection must add ``J⁺ R``, not ``R``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from .. import env
from ..corpus import corpus_from_spec
from ..fastlinear import packed_linears
from ..packing import within_window
from ..stats import second_moments
from ..trace import capture
from ..weights import preserved_weights
from .base import HParams, Layers, Method, Momentum, NonNegFloat, NonNegInt, PosFloat, PosInt, register
from .locate import (
    Replay,
    build_prompts,
    mean_over_templates,
    module_io_at_lookup,
    optimize_values,
    tree_batch,
)
from .templates import context_templates

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


@dataclass
class MemitHParams(HParams):
    layers: Layers = field(default_factory=lambda: [3, 4, 5, 6, 7])
    v_lr: PosFloat = 0.5
    v_steps: PosInt = 20
    v_beta1: Momentum = 0.9  # Adam's momentum in the value search (0.9 as in the reference)
    v_weight_decay: NonNegFloat = 0.5
    kl_factor: NonNegFloat = 0.0625
    clamp_norm_factor: PosFloat = 0.75
    early_stop_loss: NonNegFloat = 0.05
    v_batch_size: PosInt = (
        128  # requests per value-search chunk: one chunk amortises the per-group weight reads
    )
    v_dtype: Literal["float32", "bfloat16"] = "float32"
    v_grouping: Literal["auto", "suffix", "template", "kl", "none"] = (
        "auto"  # "suffix": by suffix length; "template": per template; "kl"; "none": one batch
    )
    v_prefix_tree: bool = True  # the search's reference forward: shared prefixes run once (locate.Replay)
    key_tree: bool = True  # the update phase's key forwards as token trees (:func:`locate.tree_batch`)
    mom2_update_weight: PosFloat = 15000.0
    mom2_corpus: str = "self"
    mom2_n_tokens: PosInt = 20_000
    context_per_prefix: NonNegInt = 1
    context_length: PosInt = 10
    seed: int = 0


def memit_solve(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """``ΔW = R Kᵀ (λC + KKᵀ)⁻¹`` for keys ``K`` (n × d_in) and residuals ``R`` (n × d_out).

    The minimiser of ``‖ΔW Kᵀ − Rᵀ‖² + λ tr(ΔW C ΔWᵀ)``; returned as (d_out × d_in), float32.
    """
    Kt = K.to(env.SOLVE_DTYPE).T  # d_in × n
    A = lam * C.to(env.SOLVE_DTYPE) + Kt @ Kt.T
    return torch.linalg.solve(A, Kt @ R.to(env.SOLVE_DTYPE)).T.to(torch.float32)


def through_post_norm(norm: torch.nn.Module, m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The change of a pre-norm vector ``m`` that moves ``norm(m)`` by ``r``, to first order:
    ``Δm = J⁺ r`` with ``J = ∂norm/∂m`` at ``m`` (per row, float64 least squares; ``J`` is singular
    along ``m`` because a norm ignores scale, and the pseudo-inverse drops that direction).

    It rescales ``r`` by ``rms(m) / gain`` channel by channel, which adding ``r`` to ``m`` directly
    would ignore. A normalised output cannot leave its sphere, so for a large ``r`` the edit moves
    less than asked; MEMIT's layer-by-layer recomputation of the residual then asks the next layers
    for the rest. (Iterating to the exact least-squares point on the sphere edited less well on the
    tiny test model than this single step.)
    """
    from torch.func import jacrev, vmap

    f = lambda v: norm(v.float()).double()  # noqa: E731 (the norm module runs in its own dtype)
    J = vmap(jacrev(f))(m.detach().double())  # (n, d, d)
    sol = torch.linalg.lstsq(
        J, r.double().unsqueeze(-1), rcond=1e-6, driver="gelsd"
    ).solution  # drop the radial null
    return sol.squeeze(-1).float()


class _KeyPasses:
    """MEMIT's key and residual forwards, one per edited layer, each from the lowest block whose
    input can have changed.

    Pass ``i`` follows the updates of ``layers[:i]``; the input of block ``layers[i-1]`` is the same
    as in pass ``i-1`` (only blocks at or above it were edited since), so pass ``i`` replays blocks
    ``layers[i-1]..top`` from that stored input. For layers 3–7: 22 block passes instead of 40.
    The same numbers as a fresh forward per layer (tests/test_methods_tiny.py).
    """

    def __init__(self, handle: ModelHandle, batch, layers: list[int]):
        self.handle, self.batch, self.layers, self.top = handle, batch, layers, layers[-1]
        self.replay = Replay(
            handle, batch, layers[0], end=self.top
        )  # no edit yet: block inputs are the originals
        self.inputs = {layers[0]: self.replay.h0}  # block index -> its input in the latest pass
        self.rows = batch.row_index

    @torch.no_grad()
    def run(self, i: int) -> dict:
        layer, spec = self.layers[i], self.handle.spec
        first = self.layers[max(i - 1, 0)]
        path = spec.mlp_out_path(layer)
        with capture(self.handle.model, [path]) as rec:
            h = self.inputs[first]
            if layer > first:
                h = self.replay.run_blocks(h, first, layer - 1)
            self.inputs[layer] = h  # unchanged in the next pass: it edits this layer and above
            h = self.replay.run_blocks(h, layer, self.top)
        lk = self.batch.lookup
        return {
            "keys": {layer: rec[path].input[self.rows, lk]},
            "values": {layer: rec[path].output[self.rows, lk]},
            "block_out": h[self.rows, lk],
        }


@register
class Memit(Method):
    name = "memit"
    hparams_cls = MemitHParams

    def solve(
        self, handle: ModelHandle, layer: int, K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, hp, state
    ) -> torch.Tensor:
        """The (out × in) update of ``layer`` from keys ``K`` (n × d_in) and residuals ``R`` (n × d_out)."""
        return memit_solve(K, R, C, hp.mom2_update_weight)

    def after_update(self, handle: ModelHandle, layer: int, K_after: torch.Tensor, hp, state) -> None:
        """Called per layer with the batch's keys recomputed after all layers were updated."""

    def run(self, handle: ModelHandle, requests, hp: MemitHParams, progress=None, state=None):
        self.info: dict = {}  # method-specific numbers for the manifest
        self.requests = list(requests)
        layers = sorted(handle.check_layer(layer, "layers") for layer in hp.layers)
        top = layers[-1]
        t = time.perf_counter()
        corpus = corpus_from_spec(hp.mom2_corpus, handle, hp.mom2_n_tokens)
        covs = second_moments(handle, layers, corpus, hp.mom2_n_tokens)
        timings = {"stats": time.perf_counter() - t}
        t = time.perf_counter()
        templates = context_templates(handle, hp.context_per_prefix, hp.context_length, hp.seed)
        timings["templates"] = time.perf_counter() - t
        vr = optimize_values(handle, requests, top, templates, hp, where="block_out", progress=progress)
        timings.update(vr.timings)
        t = time.perf_counter()
        names = [handle.weight_name(layer) for layer in layers]
        deltas = {}
        n = len(requests)
        key_batch = build_prompts(handle, requests, templates, with_targets=False, kl_prompts=())
        deepest = int(key_batch.attention_mask.sum(1).max()) + 1
        if hp.key_tree and within_window(handle.config, deepest):  # shared prefixes run once (same keys)
            key_batch = tree_batch(
                key_batch, handle.tokenizer.pad_token_id or 0, next(handle.model.parameters()).dtype
            )
        plain = (key_batch.template == 0).nonzero().squeeze(1)
        fast = packed_linears(handle)  # no-grad key forwards; an edited matrix is re-packed on its next use
        with preserved_weights(handle.model, names), fast.active(handle.model):
            passes = _KeyPasses(handle, key_batch, layers)
            for i, layer in enumerate(layers):
                io = passes.run(i)
                K = mean_over_templates(io["keys"][layer], key_batch, n)
                R = (vr.targets - io["block_out"][plain]) / (len(layers) - i)
                if handle.spec.post_mlp_norm:
                    spec = handle.spec
                    norm = handle.module(f"{spec.block_path(layer)}.{spec.post_mlp_norm}")
                    R = through_post_norm(norm, io["values"][layer][plain], R)
                dW = self.solve(handle, layer, K, R, covs[layer], hp, state)
                with torch.no_grad():
                    handle.param(handle.weight_name(layer)).add_(handle.to_param_orientation(dW))
                deltas[handle.weight_name(layer)] = handle.to_param_orientation(dW)
            if type(self).after_update is not Memit.after_update:
                io = module_io_at_lookup(handle, key_batch, layers)
                for layer in layers:
                    self.after_update(
                        handle, layer, mean_over_templates(io["keys"][layer], key_batch, n), hp, state
                    )
        timings["update"] = time.perf_counter() - t
        return deltas, {"nll": vr.nll, "steps": vr.steps, "timings": timings, **self.info}
