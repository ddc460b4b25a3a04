"""Where applied artifacts that act through hooks are kept on a model, how each method's are carried into
an exported Hugging Face folder, and the refusal to export a model whose hooked artifacts cannot be.

A Hugging Face folder holds weights, not hooks, so a plain export of such a model would be the base model
with nothing said. Formats that hold only weights (GGUF) refuse every hooked artifact
(:func:`check_exportable`). A Hugging Face folder can also hold a modelling file
(:mod:`loka.export.remote`): the methods whose hooks it reproduces register how their artifacts go into
it (:func:`register_export`), the others why they cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError

MEMORY_ATTR = "_loka_memory"  # list of (artifact, hook handle) of applied memory artifacts (GRACE, …)
CONTEXT_ATTR = "_loka_context"  # applied context artifacts (SCR's fact stores), in order


@dataclass
class ExportedHook:
    """One forward hook of an exported folder's modelling file (``modeling_loka.py``): its ``kind`` (which
    of the file's hooks), the ``module`` it hooks, its ``tensors`` (buffers in ``model.safetensors``) and
    JSON ``settings``, the ids of the artifacts it carries, and ``order``: where loka installed it among
    the hooks (the file installs them in this order, so hooks on one module compose as in loka)."""

    kind: str
    module: str
    tensors: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    order: int = 0


#: ``(model, [(artifact, handle)]) -> [ExportedHook]`` for the applied artifacts of one method
Exporter = Callable[[nn.Module, list[tuple[Any, Any]]], list[ExportedHook]]


@dataclass(frozen=True)
class ExportRule:
    """How a method's applied artifacts go into an exported folder: ``hooks`` builds the modelling
    file's hooks (``None``: it cannot), ``refusal(artifact)`` says why one cannot (a clause after
    "because"; ``""``: it can)."""

    hooks: Exporter | None = None
    refusal: Callable[[Any], str] | None = None

    def why_not(self, artifact: Any) -> str:
        why = self.refusal(artifact) if self.refusal is not None else ""
        if not why and self.hooks is None:
            why = "this loka does not write its memory into a modelling file"
        return why


#: method name -> how its hooked artifacts are exported (methods register it; see ``loka.methods.base``)
EXPORTS: dict[str, ExportRule] = {}


def register_export(
    method: str, hooks: Exporter | None = None, refusal: Callable[[Any], str] | None = None
) -> None:
    """Say how the applied artifacts of ``method`` go into an exported folder's modelling file
    (``hooks``), or why one cannot (``refusal(artifact)``, e.g. ``"its router runs a sentence encoder on
    the prompt's text"``)."""
    EXPORTS[method] = ExportRule(hooks, refusal)


def hooked_artifacts(model: nn.Module) -> list[Any]:
    """The applied artifacts whose effect lives in hooks or a fact store, not in the weights."""
    return [m[0] for m in model.__dict__.get(MEMORY_ATTR, [])] + list(model.__dict__.get(CONTEXT_ATTR, []))


def _hooked_with_handles(model: nn.Module) -> list[tuple[Any, Any]]:
    return list(model.__dict__.get(MEMORY_ATTR, [])) + [
        (a, None) for a in model.__dict__.get(CONTEXT_ATTR, [])
    ]


def _carried() -> str:
    """The methods whose memories a modelling file carries, for messages (``GRACE, MEMOIR, WISE``)."""
    names = sorted(m.upper() for m, rule in EXPORTS.items() if rule.hooks is not None)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names) or "no"


def check_exportable(model: nn.Module) -> None:
    """Refuse to write ``model`` as weights alone (a plain folder, a GGUF file) while a memory or context
    artifact is applied."""
    hooked = hooked_artifacts(model)
    if hooked:
        what = ", ".join(f"{a.id} ({a.method}, kind {a.kind})" for a in hooked)
        raise ArtifactError(
            f"cannot export: {what} acts at inference through hooks or a fact store, which a file of "
            "weights does not hold (it would answer as the base model); export weight-delta and adapter "
            f"artifacts, write {_carried()} memories as a Hugging Face folder (loka apply --out), and use "
            "the others through loka (loka generate --artifact)"
        )


def exported_hooks(model: nn.Module) -> list[ExportedHook]:
    """The hooks a modelling file must install to answer as ``model`` does with its hooked artifacts, in
    the order loka installed them; ``[]`` when none is applied. Refuses (one line naming every artifact
    that cannot be carried, its method, kind and why) before anything is written."""
    by_method: dict[str, list[tuple[Any, Any]]] = {}
    for a, h in _hooked_with_handles(model):
        by_method.setdefault(a.method, []).append((a, h))
    refused = []
    for method, applied in by_method.items():
        rule = EXPORTS.get(method, ExportRule())
        refused += [
            f"{a.id} ({a.method}, kind {a.kind}) because {why}"
            for a, _ in applied
            if (why := rule.why_not(a))
        ]
    if refused:
        raise ArtifactError(
            f"cannot export: {'; '.join(refused)}; a Hugging Face folder carries weight-delta and adapter "
            f"artifacts and {_carried()} memories; use the refused ones through loka (loka generate --artifact)"
        )
    hooks: list[ExportedHook] = []
    for method, applied in by_method.items():
        exporter = EXPORTS[method].hooks
        assert exporter is not None
        hooks += exporter(model, applied)
    return sorted(hooks, key=lambda h: h.order)
