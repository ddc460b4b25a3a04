"""oneDNN-prepacked ``nn.Linear`` weights for float32 scoring and value searches on CPU.

``torch.nn.functional.linear`` re-lays out the weight for the CPU's matmul kernel on every call;
oneDNN can keep the weight in its blocked layout. The matmul runs through
``mkldnn._linear_pointwise`` (dense input and output, packed weight — no per-call layout
conversions of the activations): 1.3–1.8× F.linear on SmolLM2's shapes. :class:`PackedLinears`
holds those packed copies for one model and patches every float32 ``nn.Linear`` to use them inside
:meth:`PackedLinears.active`.

The copies must never go stale: each is keyed by the weight's storage pointer and its in-place
version counter (``tensor._version``), which every artifact apply/revert and every edit bumps, so
an edited matrix is re-packed on the next call and untouched ones are reused. Results equal the
dense path up to float32 summation order (|Δ log p| ~1e-5; tests/test_scoring.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .models.loader import ModelHandle


def available(model: nn.Module) -> bool:
    p = next(model.parameters())
    return torch.backends.mkldnn.is_available() and p.device.type == "cpu" and p.dtype == torch.float32


def _pointwise_ok() -> bool:
    """Whether this torch has oneDNN's dense-in/dense-out linear on a prepacked weight (the op
    inductor's CPU backend uses); without it each call converts its input and output to oneDNN's
    layout, which cost 7 % of a MEMIT value search."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3))
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), w, None, "none", [], "")
        return bool(torch.equal(y, torch.full((1, 2), 3.0)))
    except (AttributeError, RuntimeError):
        return False


_POINTWISE = torch.backends.mkldnn.is_available() and _pointwise_ok()


def _pack_weight(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w) if _POINTWISE else w.to_mkldnn()


def _pack_bias(b: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The bias in the form ``_mm`` takes: dense or ``None``, or a oneDNN tensor (zeros if absent)."""
    if _POINTWISE:
        return b
    return (b if b is not None else torch.zeros(n)).to_mkldnn()


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if _POINTWISE:
        if w.dtype != x.dtype:  # reduced-precision weights: the matmul in their dtype, the result in x's
            return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype), w, b, "none", [], "").to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    shape = x.shape
    y = torch._C._nn.mkldnn_linear(x.reshape(-1, shape[-1]).contiguous().to_mkldnn(), w, b).to_dense()
    return y.reshape(*shape[:-1], y.shape[-1])


class _PackedLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` on packed weights, differentiable in ``x`` only (frozen weights: the value
    search of ROME/MEMIT needs gradients for δ, never for W); ``∂x = ∂y W`` on a packed ``Wᵀ``."""

    @staticmethod
    def forward(ctx, x, w, wt, b, zero):
        ctx.wt, ctx.zero = wt, zero
        return _mm(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        return _mm(gy, ctx.wt, ctx.zero), None, None, None, None


class PackedLinears:
    """Packed copies of a model's ``nn.Linear`` weights, one per module and compute dtype.

    A copy is looked up on every call and re-packed when the weight's storage or in-place version
    changed, so an edit made while :meth:`active` is open (MEMIT's layer-by-layer update) is seen by
    the next forward. ``Wᵀ`` (for input gradients) is packed only for modules that actually receive
    an input requiring grad, so a value search's frozen lower blocks never hold one.
    """

    def __init__(self):
        # (id(module), dtype) -> (weight key, (packed W, bias, packed Wᵀ or None, zero bias))
        self._packs: dict[tuple[int, torch.dtype], tuple[tuple[int, int, int], tuple]] = {}
        self.enabled = True  # set False to score with plain F.linear (benchmarks, tests)
        self.dtype = torch.float32  # compute dtype of the matmuls (see :meth:`compute`)
        self.on = False  # inside :meth:`active` with the packed path in use
        self._dense: torch.dtype | None = None  # a compute dtype that runs plain F.linear (see active)

    def _pack(self, m: nn.Linear, grad: bool, dtype: torch.dtype = torch.float32) -> tuple:
        key = (m.weight.data_ptr(), m.weight._version, -1 if m.bias is None else m.bias._version)
        hit = self._packs.get((id(m), dtype))
        if hit is None or hit[0] != key:
            w = m.weight.detach().to(dtype)
            bias = m.bias.detach().to(dtype) if m.bias is not None else None
            hit = (
                key,
                (_pack_weight(w), _pack_bias(bias, m.out_features), None, _pack_bias(None, m.in_features)),
            )
            self._packs[(id(m), dtype)] = hit
        if grad and hit[1][2] is None:  # Wᵀ for ∂x, packed on the first call that needs it
            wt = _pack_weight(m.weight.detach().to(dtype).T.contiguous())
            hit = (hit[0], (hit[1][0], hit[1][1], wt, hit[1][3]))
            self._packs[(id(m), dtype)] = hit
        return hit[1]

    def _forward(self, m: nn.Linear, grad: bool, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == self._dense:
            return nn.functional.linear(x, m.weight, m.bias)
        need = grad and torch.is_grad_enabled() and x.requires_grad
        w, b, wt, zero = self._pack(m, need, self.dtype)
        if need:
            return _PackedLinearFn.apply(x, w, wt, b, zero)
        return _mm(x, w, b)

    @contextlib.contextmanager
    def active(
        self,
        model: nn.Module,
        grad: bool = False,
        modules: Iterable[nn.Module] | None = None,
        dense: torch.dtype | None = None,
    ) -> Iterator[bool]:
        """Inside: every float32 ``nn.Linear`` of ``model`` (or of ``modules``, a subset) uses its
        packed weight. ``grad=True`` lets gradients flow to the *inputs* through a packed ``Wᵀ``
        (weights must be frozen). ``dense``: a compute dtype that stays on plain ``F.linear`` — a
        bfloat16 value search passes float32 so that its one reference forward does not leave float32
        copies of every matrix behind. Yields whether the packed path is in use."""
        if (
            not self.enabled
            or not available(model)
            or (grad and any(p.requires_grad for p in model.parameters()))
        ):
            yield False
            return
        patched = []
        old_dense, self._dense = self._dense, dense
        try:
            for m in model.modules() if modules is None else modules:
                if type(m) is nn.Linear:
                    m.forward = lambda x, m=m: self._forward(
                        m, grad, x
                    )  # instance attribute shadows the class's
                    patched.append(m)
            self.on = True
            yield True
        finally:
            self.on = False
            self._dense = old_dense
            for m in patched:
                del m.forward

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`compute` can run the matmuls in ``dtype`` (bfloat16 needs the dense-io kernel)."""
        return dtype == torch.float32 or (_POINTWISE and dtype == torch.bfloat16)

    @contextlib.contextmanager
    def compute(self, dtype: torch.dtype) -> Iterator[None]:
        """Inside :meth:`active`: matmuls on ``dtype`` copies of the weights, activations cast to
        ``dtype`` for the product only (norms, attention and the residual stream stay float32).
        ROME/MEMIT's optional bfloat16 value search: ~1.9× per matmul with AVX-512 BF16."""
        if not self.supports(dtype):
            raise ValueError(f"packed linears cannot compute in {dtype}")
        old, self.dtype = self.dtype, dtype
        try:
            yield
        finally:
            self.dtype = old


def packed_linears(handle: ModelHandle) -> PackedLinears:
    """The handle's packed-weight cache (created on first use; lives as long as the handle)."""
    cache = handle.__dict__.get("_packed_linears")
    if cache is None:
        cache = handle.__dict__["_packed_linears"] = PackedLinears()
    return cache
