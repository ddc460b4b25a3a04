"""Models: architecture specs, the catalogue of known models, loading. Attributes load lazily, so that
``loka models`` needs neither torch nor transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "SPECS": ".arch",
    "ArchSpec": ".arch",
    "spec_for": ".arch",
    "KNOWN_MODELS": ".catalog",
    "list_models": ".catalog",
    "DEFAULT_MODEL": ".catalog",
    "TINY_NAMES": ".catalog",
    "ModelHandle": ".loader",
    "load_model": ".loader",
}

__all__ = list(_WHERE)

if TYPE_CHECKING:
    from .arch import SPECS, ArchSpec, spec_for
    from .catalog import DEFAULT_MODEL, KNOWN_MODELS, TINY_NAMES, list_models
    from .loader import ModelHandle, load_model


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
