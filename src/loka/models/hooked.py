"""Where applied artifacts that act through hooks are kept on a model, and the refusal to export a
model that carries them: a Hugging Face folder holds weights, not hooks, so such an export would be
the base model with nothing said."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ArtifactError

MEMORY_ATTR = "_loka_memory"  # list of (artifact, hook handle) of applied memory artifacts (GRACE, …)
CONTEXT_ATTR = "_loka_context"  # applied context artifacts (SCR's fact stores), in order


def hooked_artifacts(model: nn.Module) -> list[Any]:
    """The applied artifacts whose effect lives in hooks or a fact store, not in the weights."""
    return [m[0] for m in model.__dict__.get(MEMORY_ATTR, [])] + list(model.__dict__.get(CONTEXT_ATTR, []))


def check_exportable(model: nn.Module) -> None:
    """Refuse to write ``model`` as a plain folder while a memory or context artifact is applied."""
    hooked = hooked_artifacts(model)
    if hooked:
        what = ", ".join(f"{a.id} ({a.method}, kind {a.kind})" for a in hooked)
        raise ArtifactError(
            f"cannot export: {what} acts at inference through hooks or a fact store, which a Hugging Face "
            "folder does not hold (the folder would answer as the base model); export weight-delta and "
            "adapter artifacts, and use memory or context ones through loka (loka generate --artifact)"
        )
