"""The workbench page's own endpoint: ``GET /v1/methods``, what each registered method does, so the page
builds its method select from the registry instead of a list written into it."""

from __future__ import annotations

import inspect

from fastapi import APIRouter

from .. import api
from ..methods import REGISTRY

router = APIRouter()


def _default(fn) -> str:
    """The method ``fn`` (``loka.edit`` / ``loka.unlearn``) runs when none is named."""
    return inspect.signature(fn).parameters["method"].default


def methods() -> dict:
    """Every registered method, sorted by name: the request kinds it handles (``does``), the one it is
    for (``primary``), its artifact kind and whether it carries state between batches; ``defaults``
    names the method ``loka.edit`` and ``loka.unlearn`` run when none is given."""
    data = [
        {
            "name": name,
            "does": sorted(m.tasks),
            "primary": m.primary,
            "kind": m.kind,
            "stateful": m.stateful,
        }
        for name, m in sorted(REGISTRY.items())
    ]
    return {"data": data, "defaults": {"edit": _default(api.edit), "forget": _default(api.unlearn)}}


@router.get("/v1/methods")
def list_methods() -> dict:
    """What each registered method does (the workbench's method select)."""
    return methods()
