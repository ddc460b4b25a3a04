"""loka: edit, unlearn and measure what a language model knows.

The public API is imported on first use (``loka.edit`` imports torch and the methods, ``import loka``
alone does not), so that the command line starts fast. ``loka.env`` is imported first: it sets
offline mode before transformers can be imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import env  # sets HF_HUB_OFFLINE before transformers is imported
from .version import __version__

#: public name -> the module that defines it (relative to this package)
_API = {
    ".api": ["edit", "unlearn", "update", "validate_requests"],
    ".artifact": ["Artifact", "bundle_artifacts", "load_artifact", "preserved_weights", "stack_artifacts"],
    ".bench.kg": ["KnowledgeGraph", "build_curated", "build_derived", "load_graph"],
    ".bench.probes": ["generate_probes"],
    ".env": ["set_threads"],
    ".errors": [
        "ArtifactError",
        "CacheError",
        "ConfigError",
        "DivergenceError",
        "InputError",
        "LokaError",
        "ModelError",
        "OutputError",
        "RequestError",
    ],
    ".eval.run_report": ["write_report"],
    ".export.gguf": ["GGUFExport", "export_gguf"],
    ".eval.kg_runner": ["run_kg"],
    ".eval.runner": ["evaluate"],
    ".methods": ["default_hparams", "get_method"],
    ".methods.codebook": ["CodebookFolder", "LokaModel", "state_from_artifact"],
    ".models": ["KNOWN_MODELS", "ArchSpec", "ModelHandle", "list_models", "load_model"],
    ".requests": ["EditRequest", "ForgetRequest", "RetainRequest", "read_requests", "request_from_record"],
    ".result": ["EditResult"],
    ".scoring": ["generate", "target_logprobs"],
    ".serve": ["create_app"],
    ".session": ["Session"],
    ".state": ["EditState"],
    ".stats": ["second_moments"],
    ".trace": ["add_at_positions", "capture"],
}
_RENAMED = {"METHODS": (".methods", "REGISTRY")}
_WHERE = {name: (mod, name) for mod, names in _API.items() for name in names} | _RENAMED

__all__ = ["__version__", *sorted(_WHERE)]

if TYPE_CHECKING:
    from .api import edit, unlearn, update, validate_requests
    from .artifact import Artifact, bundle_artifacts, load_artifact, preserved_weights, stack_artifacts
    from .bench.kg import KnowledgeGraph, build_curated, build_derived, load_graph
    from .bench.probes import generate_probes
    from .env import set_threads
    from .errors import (
        ArtifactError,
        CacheError,
        ConfigError,
        DivergenceError,
        InputError,
        LokaError,
        ModelError,
        OutputError,
        RequestError,
    )
    from .eval.kg_runner import run_kg
    from .eval.run_report import write_report
    from .eval.runner import evaluate
    from .export.gguf import GGUFExport, export_gguf
    from .methods import REGISTRY as METHODS
    from .methods import default_hparams, get_method
    from .methods.codebook import CodebookFolder, LokaModel, state_from_artifact
    from .models import KNOWN_MODELS, ArchSpec, ModelHandle, list_models, load_model
    from .requests import EditRequest, ForgetRequest, RetainRequest, read_requests, request_from_record
    from .result import EditResult
    from .scoring import generate, target_logprobs
    from .serve import create_app
    from .session import Session
    from .state import EditState
    from .stats import second_moments
    from .trace import add_at_positions, capture


def __getattr__(name: str):
    if name in _WHERE:
        module, attr = _WHERE[name]
        if module == ".artifact":  # the methods say how their memory and context artifacts install
            importlib.import_module(".methods", __name__)
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
