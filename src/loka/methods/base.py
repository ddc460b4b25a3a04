"""The method interface, the registry, and typed hyperparameters with per-model config files.

A method takes a model handle, requests and typed hyperparameters and returns an
:class:`~loka.artifact.Artifact`; it never leaves the model modified (weights are restored even when
it fails), so the caller decides whether to apply the result.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar

from ..errors import LokaError, ModelError

_SCALAR_CHECKS = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


@dataclass
class HParams:
    """Base of every method's hyperparameters: typed fields, loaded from JSON, unknown keys refused."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "hyperparameters"):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"_comment", "_evidence"})
        if unknown:
            raise LokaError(
                f"{where}: unknown field(s) {unknown} for {cls.__name__}; allowed: {sorted(names)}"
            )
        for f in dataclasses.fields(cls):  # scalar fields: a wrong type fails here, not deep in a run
            ok = _SCALAR_CHECKS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
            if f.name in data and ok is not None and not ok(data[f.name]):
                raise LokaError(f"{where}: {cls.__name__}.{f.name} must be a {f.type}, got {data[f.name]!r}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return self.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


class Method:
    """Interface: ``run(handle, requests, hparams, progress=None, state=None) -> (deltas, info)``.

    ``deltas`` maps parameter names to additive updates (stored orientation); ``info`` is JSON-able
    and goes into the artifact manifest. ``state`` (:class:`~loka.state.EditState`) carries what a
    sequential method needs from earlier batches; a method updates it in place.
    """

    name: ClassVar[str]
    hparams_cls: ClassVar[type[HParams]]
    stateful: ClassVar[bool] = False  # needs the EditState of earlier batches in sequential editing
    kind: ClassVar[str] = "weight-delta"  # or "context": the tensors are a store, not parameter deltas

    def run(self, handle, requests, hparams, progress=None, state=None):  # pragma: no cover - interface
        raise NotImplementedError


class MemoryMethod(Method):
    """A method whose artifact (kind ``memory``) is installed as a forward hook on the module named in
    the manifest's ``extra["module"]``; subclasses say how to build the hook from the artifact."""

    kind: ClassVar[str] = "memory"

    @staticmethod
    def hook(artifact):  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def attach(cls, model, artifact) -> object:
        """Install ``artifact``'s hook on ``model``; returns the removable hook handle."""
        return model.get_submodule(artifact.manifest["extra"]["module"]).register_forward_hook(
            cls.hook(artifact)
        )


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise LokaError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def _config(method: str, key: str) -> dict | None:
    f = resources.files("loka") / "configs" / method / f"{key}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def default_hparams(method: str, handle, overrides: dict[str, Any] | None = None) -> HParams:
    """Hyperparameters for ``method`` on ``handle``: ``configs/<method>/<model name>.json``, else the
    family file, else ``default.json`` (layers given as fractions of the depth), then ``overrides``."""
    cls = get_method(method).hparams_cls
    data = _config(method, handle.name) or _config(method, handle.spec.family) or _config(method, "default")
    if data is None:
        raise LokaError(f"no configuration for method {method!r}")
    data = dict(data)
    n = handle.n_layers
    if "layer_frac" in data:
        data["layer"] = min(n - 1, max(0, round(data.pop("layer_frac") * n)))
    if "layers_frac" in data:
        lo, hi = data.pop("layers_frac")
        a, b = max(0, round(lo * n)), min(n - 1, max(round(lo * n), round(hi * n)))
        data["layers"] = list(range(a, b + 1))
    hp = cls.from_dict(data, where=f"configs/{method}")
    if overrides:
        hp = hp.replace(**overrides)
    for layer in getattr(hp, "layers", None) or [getattr(hp, "layer", 0)]:
        if not 0 <= layer < n:
            raise ModelError(f"layer {layer} is out of range: {handle.name} has layers 0..{n - 1}")
    return hp
