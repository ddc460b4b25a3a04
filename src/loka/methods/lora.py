"""LoRA editing and unlearning (Hu et al. 2021), trained with ``peft``; the artifact is the adapter.

The same trainer and losses as :mod:`loka.methods.train` (edit NLL, any forget loss, retain NLL/KL),
but instead of the MLP output matrices themselves it trains rank-``r`` factors on them:
``W' = W + (lora_alpha / r) · B A`` with ``A ∈ R^{r×in}`` (Kaiming init) and ``B ∈ R^{out×r}`` (zero
init, so the untrained adapter is the identity). ``peft`` injects its LoRA layers into the model for
the run and they are taken out again afterwards, also on an error, so the model is left as it was.

The artifact (kind ``adapter``) stores ``<weight>.lora_A`` / ``<weight>.lora_B`` and the scaling;
applying it adds the merged ``scaling · B A`` (transposed for GPT-2's Conv1D) to the weight and keeps
the original for a bit-exact revert, like a weight delta. ``forget_loss`` picks the unlearning term
when forget requests are given (``npo`` by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import torch

from ..artifact import merged_adapter
from ..errors import LokaError
from ..forgetting.objectives import FORGET_LOSSES, ForgetLoss
from .base import Domain, PosFloat, PosInt, register
from .train import TrainHParams, TrainMethod, _Trainable

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


@dataclass
class LoraHParams(TrainHParams):
    rank: PosInt = 8
    lora_alpha: PosFloat = 16.0
    forget_loss: Annotated[str, Domain(member_of=FORGET_LOSSES)] = "npo"  # a registered unlearning objective


class _LoraFactors(_Trainable):
    def __init__(self, model, paths: list[str], names: list[str], transposed: bool, scaling: float):
        self.mods = [model.get_submodule(p) for p in paths]
        self.names = names
        self.params = [t for m in self.mods for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        self.info = {"adapter": {"scaling": scaling, "transposed": transposed, "targets": names}}

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, m in zip(self.names, self.mods):
            out[f"{n}.lora_A"] = m.lora_A["default"].weight.detach().clone()
            out[f"{n}.lora_B"] = m.lora_B["default"].weight.detach().clone()
        return out


@register
class LoraMethod(TrainMethod):
    """LoRA on the MLP output projections of ``layers`` (peft), for edits, forgets and retains."""

    name = "lora"
    hparams_cls = LoraHParams
    kind = "adapter"
    primary = "edit"

    def forget_loss(self, hp: LoraHParams) -> ForgetLoss:
        return FORGET_LOSSES[hp.forget_loss]

    @contextlib.contextmanager
    def _trainable(self, handle: ModelHandle, names: list[str], hp: LoraHParams) -> Iterator[_Trainable]:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:  # pragma: no cover - peft is a declared dependency
            raise LokaError("method lora needs the peft package: pip install peft") from None
        model = handle.model
        paths = [n.removesuffix(".weight") for n in names]
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        originals = {p: model.get_submodule(p) for p in paths}
        had_config = "peft_config" in model.__dict__
        cfg = LoraConfig(
            r=hp.rank,
            lora_alpha=hp.lora_alpha,
            target_modules=paths,
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=handle.spec.transposed,
        )
        try:
            inject_adapter_in_model(cfg, model)
            tr = _LoraFactors(model, paths, names, handle.spec.transposed, hp.lora_alpha / hp.rank)
            for p in tr.params:
                p.requires_grad_(True)
            yield tr
        finally:  # take the LoRA layers out again: the original modules, untouched
            for path, mod in originals.items():
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, mod)
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, False))
            if not had_config:  # peft leaves its config on the model
                model.__dict__.pop("peft_config", None)


merged_delta = merged_adapter  # the adapter kind's own math (loka.artifact)
