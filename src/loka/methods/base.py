"""The method interface, the registry, and typed hyperparameters with per-model config files.

A method takes a model handle, requests and typed hyperparameters and returns an
:class:`~loka.artifact.Artifact`; it never leaves the model modified (weights are restored even when
it fails), so the caller decides whether to apply the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from ..errors import ConfigError, DivergenceError, LokaError, ModelError
from ..models.hooked import ExportedHook, register_export

if TYPE_CHECKING:
    from ..models.loader import ModelHandle


@dataclass(frozen=True)
class Domain:
    """The values a hyperparameter accepts beyond its type, declared on the field with
    ``typing.Annotated`` (``v_lr: PosFloat``); :meth:`HParams.from_dict` checks every field against its
    type and domain, so a bad value fails at once with the field named, never deep in a run."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    lt: float | None = None
    layers: bool = False  # a non-empty, strictly ascending list of layer indices
    member_of: Mapping | None = field(default=None, hash=False, compare=False)  # a key of this registry

    def describe(self) -> str:
        if self.layers:
            return "a non-empty list of layer indices in ascending order, each once"
        if self.member_of is not None:
            return "one of " + ", ".join(repr(k) for k in sorted(self.member_of))
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        return " and ".join(parts)

    def admits(self, v: Any) -> bool:
        if self.member_of is not None:
            return isinstance(v, str) and v in self.member_of
        if self.layers:
            return bool(v) and all(b > a for a, b in zip(v, v[1:])) and v[0] >= 0
        return not (
            (self.gt is not None and not v > self.gt)
            or (self.ge is not None and not v >= self.ge)
            or (self.lt is not None and not v < self.lt)
            or (self.le is not None and not v <= self.le)
        )


PosFloat = Annotated[float, Domain(gt=0)]
NonNegFloat = Annotated[float, Domain(ge=0)]
UnitFloat = Annotated[float, Domain(ge=0, le=1)]  # a fraction, a probability or a threshold on one
Momentum = Annotated[float, Domain(ge=0, lt=1)]  # an exponential-average coefficient (Adam's β)
Cosine = Annotated[float, Domain(ge=-1, le=1)]
PosInt = Annotated[int, Domain(ge=1)]
NonNegInt = Annotated[int, Domain(ge=0)]
Layer = Annotated[int, Domain(ge=0)]
Layers = Annotated[list[int], Domain(layers=True)]


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Annotated:
        base, *meta = get_args(tp)
        doms = [m for m in meta if isinstance(m, Domain)]
        if any(d.layers or d.member_of is not None for d in doms):
            return next(d for d in doms if d.layers or d.member_of is not None).describe()
        cond = " and ".join(d.describe() for d in doms if d.describe())
        return f"{_type_name(base)} {cond}" if cond else _type_name(base)
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _admits(tp: Any, v: Any) -> bool:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        return _admits(base, v) and all(m.admits(v) for m in meta if isinstance(m, Domain))
    if origin is Literal:
        return v in get_args(tp) and not isinstance(v, bool)
    if origin in (Union, types.UnionType):
        return any(_admits(a, v) for a in get_args(tp))
    if origin is list:
        return isinstance(v, list) and all(_admits(get_args(tp)[0], x) for x in v)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    return True  # a type without a check (e.g. dict)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's declared type, domains included (resolved once per class)."""
    return get_type_hints(cls, include_extras=True)


#: an unknown field's likely meaning when the spelling is far off: the one-layer and many-layer fields
_FIELD_ALIASES = {"layers": "layer", "layer": "layers"}


def did_you_mean(unknown: list[str], names: set[str]) -> str:
    """``; did you mean 'layer'?`` for unknown fields with a close known one (difflib, or the
    ``layer``/``layers`` swap); ``""`` when none is close."""
    hints = []
    for u in unknown:
        alias = _FIELD_ALIASES.get(u)
        close = [alias] if alias in names else difflib.get_close_matches(u, sorted(names), n=1)
        if close:
            hints.append((u, f"'{close[0]}'"))
    if not hints:
        return ""
    if len(unknown) == 1:
        return f"; did you mean {hints[0][1]}?"
    return "; did you mean " + ", ".join(f"{h} for '{u}'" for u, h in hints) + "?"


@dataclass
class HParams:
    """Base of every method's hyperparameters: typed fields with declared domains, loaded from JSON,
    unknown keys refused."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "hyperparameters"):
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where}: hyperparameters must be a JSON object of name: value, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"_comment", "_evidence"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {unknown} for {cls.__name__}; allowed: {sorted(names)}"
                + did_you_mean(unknown, names)
            )
        types_ = field_types(cls)
        for name in sorted(names & set(data)):  # every field: a wrong value fails here, not deep in a run
            tp = types_.get(name)
            if tp is not None and not _admits(tp, data[name]):
                raise ConfigError(
                    f"{where}: {cls.__name__}.{name} must be {_type_name(tp)}, got {data[name]!r}"
                )
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        """A copy with ``changes`` (the overrides of ``--set`` / ``--hparams``), checked like a config."""
        return self.from_dict(
            {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}},
            where="hparams",
        )


#: an update whose Frobenius norm exceeds this multiple of its weight's norm is refused as exploded (a sanity
#: bound against blow-ups: ill-conditioned statistics on tiny random models give legitimate updates of ~200x)
MAX_UPDATE_RATIO = 1e4
#: no tensor of an update (delta, memory value, key) may exceed this magnitude
MAX_ABS_VALUE = 1e6


def check_loss(loss, method: str, step: int, fix: str = "lower lr") -> float:
    """The loss as a float; a NaN or infinite loss stops the method (the update is refused, the weights
    are restored by the method's ``preserved_weights``)."""
    v = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(v):
        raise DivergenceError(
            f"{method}: the loss became {v} at step {step}: the optimisation diverged, nothing was applied; {fix}"
        )
    return v


def check_update(method: str, tensors: dict, weights: dict | None = None, fix: str = "lower lr") -> None:
    """Refuse a result with a non-finite or huge entry, or (``weights``: name -> the parameter it adds
    to) a delta larger than :data:`MAX_UPDATE_RATIO` times its weight."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        if not bool(t.isfinite().all()):
            raise DivergenceError(
                f"{method}: the result {name} has NaN or infinite entries; nothing was applied; {fix}"
            )
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > MAX_ABS_VALUE:
            raise DivergenceError(
                f"{method}: the result {name} has entries of {peak:.3g} (over {MAX_ABS_VALUE:g}): the update exploded; "
                f"nothing was applied; {fix}"
            )
    for name, w in (weights or {}).items():
        d = tensors.get(name)
        if d is None:
            continue
        ratio = float(d.double().norm() / (w.detach().double().norm() + 1e-12))
        if ratio > MAX_UPDATE_RATIO:
            raise DivergenceError(
                f"{method}: the update of {name} is {ratio:.3g}x the weight's norm (over {MAX_UPDATE_RATIO:g}x): it "
                f"exploded; nothing was applied; {fix}"
            )


class Method:
    """Interface: ``run(handle, requests, hparams, progress=None, state=None) -> (deltas, info)``.

    ``deltas`` maps parameter names to additive updates (stored orientation); ``info`` is JSON-able
    and goes into the artifact manifest. ``state`` (:class:`~loka.state.EditState`) carries what a
    sequential method needs from earlier batches; a method updates it in place.
    """

    name: ClassVar[str]
    hparams_cls: ClassVar[type[HParams]]
    #: the request kinds one run handles (``edit``, ``forget``, ``retain``): ``loka.update`` runs a method
    #: that handles every kind given in one optimisation, else edits first and forgets second
    tasks: ClassVar[frozenset[str]] = frozenset({"edit"})
    #: the intervention the method is for: a KnowledgeSmith run gives it this task by default
    primary: ClassVar[Literal["edit", "forget"]] = "edit"
    stateful: ClassVar[bool] = False  # needs the EditState of earlier batches in sequential editing
    #: the artifact kind it makes: weight-delta, adapter, memory (forward hooks), context (a fact store)
    kind: ClassVar[Literal["weight-delta", "adapter", "memory", "context"]] = "weight-delta"
    #: artifact tensors that hold indices or labels, not values (``loka inspect`` gives them no norm)
    index_tensors: ClassVar[frozenset[str]] = frozenset()
    #: a memory or context method whose artifacts an exported folder cannot carry: why (a clause after
    #: "because"); one that can implements ``export_hooks`` instead
    export_refusal: ClassVar[str] = ""

    @classmethod
    def export_refusal_for(cls, artifact) -> str:
        """Why ``artifact`` (applied) cannot go into an exported folder; ``""`` when it can."""
        return cls.export_refusal

    def run(
        self, handle: ModelHandle, requests, hparams, progress=None, state=None
    ):  # pragma: no cover - interface
        raise NotImplementedError


class MemoryMethod(Method):
    """A method whose artifact (kind ``memory``) is installed as a forward hook on the module named in
    the manifest's ``extra["module"]``; subclasses say how to build the hook from the artifact."""

    kind: ClassVar[str] = "memory"

    @staticmethod
    def hook(artifact):  # pragma: no cover - interface
        raise NotImplementedError

    #: the hook of the exported modelling file (``loka/export/templates/modeling_loka.py``) that reproduces
    #: this method's hook, given :meth:`export_tensors`; ``None``: not exportable (say why in
    #: ``export_refusal``, or override :meth:`export_hooks`)
    export_kind: ClassVar[str | None] = None

    @classmethod
    def attach(cls, model, artifact) -> object:
        """Install ``artifact``'s hook on ``model``; returns the removable hook handle."""
        return model.get_submodule(artifact.manifest["extra"]["module"]).register_forward_hook(
            cls.hook(artifact)
        )

    @staticmethod
    def export_tensors(artifact) -> tuple[dict, dict]:  # pragma: no cover - interface
        """The tensors and JSON settings the modelling file's ``export_kind`` hook reads."""
        raise NotImplementedError

    @classmethod
    def export_hooks(cls, model, applied: list) -> list[ExportedHook]:
        """One exported hook per applied artifact (``applied``: its (artifact, hook handle) pairs), in the
        order their hooks were installed (a handle's id counts up)."""
        out = []
        for artifact, handle in applied:
            tensors, settings = cls.export_tensors(artifact)
            module = artifact.manifest["extra"]["module"]
            out.append(ExportedHook(cls.export_kind, module, tensors, settings, [artifact.id], handle.id))
        return out


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add the method to :data:`REGISTRY` (and tell the artifact layer how its
    ``memory`` artifacts are installed)."""
    REGISTRY[cls.name] = cls
    if cls.index_tensors:
        from ..artifact import register_index_tensors

        register_index_tensors(cls.index_tensors)
    if cls.kind == "memory":
        from ..artifact import register_memory

        register_memory(cls.name, cls.attach)
    if cls.kind in ("memory", "context"):
        exportable = getattr(cls, "export_kind", None) is not None or "export_hooks" in vars(cls)
        register_export(cls.name, cls.export_hooks if exportable else None, cls.export_refusal_for)
    return cls


def methods_for(task: str) -> list[str]:
    """The registered methods that handle ``task`` ("edit", "forget" or "retain"), sorted."""
    return sorted(n for n, m in REGISTRY.items() if task in m.tasks)


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise LokaError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def _config(method: str, key: str) -> dict | None:
    f = resources.files("loka") / "configs" / method / f"{key}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def method_config(method: str, handle: ModelHandle, _seen: tuple[str, ...] = ()) -> dict:
    """The raw config of ``method`` for ``handle``: ``configs/<method>/<model name>.json``, else the
    family file, else ``default.json``. A config may say ``"extends": "memit"`` (that method's config for
    the same model) or ``"extends": "memit/default"`` (one file); its own keys override the parent's."""
    if method in _seen:
        raise ConfigError(f"configs: 'extends' loops through {' -> '.join((*_seen, method))}")
    data = _config(method, handle.name) or _config(method, handle.spec.family) or _config(method, "default")
    if data is None:
        raise LokaError(f"no configuration for method {method!r}")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent:
        pm, _, pk = str(parent).partition("/")
        base = _config(pm, pk) if pk else method_config(pm, handle, (*_seen, method))
        if base is None:
            raise ConfigError(f"configs/{method}: extends {parent!r}, which does not exist")
        base = {k: v for k, v in base.items() if k != "extends"}
        data = {**base, **data}
    return data


def default_hparams(method: str, handle: ModelHandle, overrides: dict[str, Any] | None = None) -> HParams:
    """Hyperparameters for ``method`` on ``handle``: its config (:func:`method_config`; layers may be
    given as fractions of the depth), then ``overrides``."""
    cls = get_method(method).hparams_cls
    data = method_config(method, handle)
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
