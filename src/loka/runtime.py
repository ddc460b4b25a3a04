"""Inference-time behaviour that applied artifacts install on a model; scoring and generation consult it.

Most updates change weights. Some act at inference instead, and scoring must honour them without
knowing any method:

* **prompt rewriters** — a context artifact (SCR's fact store) rewrites each prompt before the model
  sees it (relevant facts prepended). The method registers its rewrite function by name
  (:func:`register_rewriter`); applying a context artifact adds it to the model (:func:`add_context`).
* **routers** — a codebook (LOKA) answers each query with one of its memories, chosen on the prompt
  alone. It registers itself on the model (:func:`add_router`) while applied; :func:`route_groups`
  groups prompts by the memory they are routed to so that teacher-forced ``prompt + answer`` rows are
  routed on the prompt, and each group runs with that memory selected.

Forward hooks on modules (GRACE, WISE, the codebook's plug) are installed by the artifact kinds
themselves (:mod:`loka.artifact`); this module holds only what loka's own scoring must call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from torch import nn

from .errors import ArtifactError
from .models.hooked import CONTEXT_ATTR

ROUTER_ATTR = "_loka_routers"  # installed routers

#: method name -> ``fn(handle, prompts, stores) -> prompts``: how that method's context artifacts rewrite prompts
REWRITERS: dict[str, Callable[[Any, list[str], list], list[str]]] = {}


class Router(Protocol):
    """What a codebook offers scoring: group prompts by memory, and select one memory for a block."""

    def groups(self, handle: Any, prompts: Sequence[str]) -> list[tuple[int, list[int]]]: ...

    def select(self, memory: int) -> contextlib.AbstractContextManager: ...


def register_rewriter(method: str):
    """Decorator: ``fn(handle, prompts, stores)`` rewrites prompts for the applied context artifacts of ``method``."""

    def deco(fn):
        REWRITERS[method] = fn
        return fn

    return deco


# -- context artifacts --------------------------------------------------------------------------------
def applied_context(model: nn.Module) -> list:
    """The context artifacts applied to ``model``, in order."""
    return model.__dict__.get(CONTEXT_ATTR, [])


def add_context(model: nn.Module, artifact: Any) -> None:
    if artifact.method not in REWRITERS:
        raise ArtifactError(
            f"artifact {artifact.id} is a context store of method {artifact.method!r}, which this loka does not "
            "know; import loka.methods (loka.load_artifact does) or upgrade loka"
        )
    model.__dict__.setdefault(CONTEXT_ATTR, []).append(artifact)


def remove_context(model: nn.Module, artifact_id: str) -> bool:
    ctx = model.__dict__.get(CONTEXT_ATTR, [])
    pos = next((i for i, a in enumerate(ctx) if a.id == artifact_id), None)
    if pos is None:
        return False
    del ctx[pos]
    return True


def rewrite_prompts(handle: Any, prompts: Sequence[str]) -> list[str]:
    """``prompts`` as the model sees them under the applied context artifacts (unchanged without any)."""
    stores = applied_context(handle.model)
    out = list(prompts)
    for method in dict.fromkeys(a.method for a in stores):
        out = REWRITERS[method](handle, out, [a for a in stores if a.method == method])
    return out


# -- routers --------------------------------------------------------------------------------------------
def routers(model: nn.Module) -> list:
    return model.__dict__.get(ROUTER_ATTR, [])


def add_router(model: nn.Module, router: Router) -> None:
    if routers(model):
        raise ArtifactError(
            "a codebook is already applied to this model; revert it first (a sequential update makes one "
            "codebook holding every batch)"
        )
    model.__dict__.setdefault(ROUTER_ATTR, []).append(router)


def remove_router(model: nn.Module, router: Router) -> None:
    rs = routers(model)
    if router in rs:
        rs.remove(router)


def route_groups(
    handle: Any, prompts: Sequence[str]
) -> list[tuple[Callable[[], contextlib.AbstractContextManager], list[int]]]:
    """Prompt indices grouped by how they must run: ``[(select, indices)]``, where ``select()`` is the
    context manager to run that group under. Without a router: one group, nothing selected."""
    rs = routers(handle.model)
    if not rs or not prompts:
        return [(contextlib.nullcontext, list(range(len(prompts))))]
    router = rs[0]
    return [(lambda j=j: router.select(j), idx) for j, idx in router.groups(handle, list(prompts))]


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Run with every router switched off (its own embedding forwards need neither routing nor plug)."""
    rs = list(routers(model))
    saved = [r.enabled for r in rs]
    for r in rs:
        r.enabled = False
    try:
        yield
    finally:
        for r, s in zip(rs, saved):
            r.enabled = s
