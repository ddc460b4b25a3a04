"""``loka serve``: an HTTP server for one model and its artifacts.

:func:`create_app` builds the FastAPI app (OpenAI-compatible completions with per-request artifact
stacks, the artifacts API, probes, the workbench page); :class:`~loka.serve.engine.Engine` holds the
model, its lock and the applied artifacts; :class:`~loka.serve.store.ArtifactStore` the verified
artifact folders. FastAPI is imported only when :func:`create_app` is first used (``pip install
'loka[serve]'``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {"create_app": ".app", "Engine": ".engine", "GenParams": ".engine", "ArtifactStore": ".store"}

__all__ = ["ArtifactStore", "Engine", "GenParams", "create_app"]

if TYPE_CHECKING:
    from .app import create_app
    from .engine import Engine, GenParams
    from .store import ArtifactStore


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
