"""Hooks as context managers: capture module inputs/outputs, add vectors at token positions.

In the spirit of ROME's ``nethook``: methods never rewrite a model's forward, they observe or
patch it for the duration of a ``with`` block, and every hook is removed on exit (also on error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been captured."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


@dataclass
class Record:
    """What one traced module saw: its first positional input and its (first) output."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def capture(
    model: nn.Module,
    paths: Sequence[str],
    *,
    inputs: bool = True,
    outputs: bool = True,
    kwargs: bool = False,
    detach: bool = True,
    stop_after: str | None = None,
) -> Iterator[dict[str, Record]]:
    """Record the input and/or output of each module in ``paths`` during forwards run in the block.

    ``stop_after`` names a module after whose forward a :class:`StopForward` is raised; wrap the
    forward call in :func:`run_until_stopped` so the layers above it are never computed.
    ``kwargs=True`` also records the keyword arguments (masks, position embeddings) the module got.
    """
    records = {p: Record() for p in paths}
    handles = []

    def pre_hook(path):
        def hook(mod, args, kw):
            rec = records[path]
            if inputs:
                x = args[0] if args else next(iter(kw.values()))
                rec.input = x.detach() if detach else x
            if kwargs:
                rec.kwargs = dict(kw)
                if len(args) > 1:
                    rec.kwargs["__args__"] = args[1:]

        return hook

    def post_hook(path):
        def hook(mod, args, out):
            if outputs:
                o = _first(out)
                records[path].output = o.detach() if detach else o
            if path == stop_after:
                raise StopForward

        return hook

    try:
        for p in dict.fromkeys([*paths, *([stop_after] if stop_after else [])]):
            mod = model.get_submodule(p)
            if p in records and (inputs or kwargs):
                handles.append(mod.register_forward_pre_hook(pre_hook(p), with_kwargs=True))
            if p in records and outputs or p == stop_after:
                if p not in records:
                    records[p] = Record()
                handles.append(mod.register_forward_hook(post_hook(p)))
        yield records
    finally:
        for h in handles:
            h.remove()


def run_until_stopped(fn: Callable[[], object]) -> object | None:
    """Call ``fn`` and swallow the :class:`StopForward` a ``stop_after`` hook raises."""
    try:
        return fn()
    except StopForward:
        return None


@torch.no_grad()
def inputs_by_batch(
    handle, path: str, texts: Sequence[str], batch_size: int = 32
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each right-padded batch of ``texts``: the input of module ``path`` (B, T, D) and the batch's
    attention mask. The model runs only up to that module; the tokenizer's padding side is restored."""
    tok = handle.tokenizer
    old = tok.padding_side
    tok.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
            with capture(handle.model, [path], outputs=False, stop_after=path) as rec:
                run_until_stopped(
                    lambda enc=enc: handle.model(
                        **{k: v.to(handle.device) for k, v in enc.items()}, use_cache=False
                    )
                )
            yield rec[path].input, enc["attention_mask"]
    finally:
        tok.padding_side = old


@contextlib.contextmanager
def add_at_positions(
    module: nn.Module,
    delta: torch.Tensor | Callable[[], torch.Tensor],
    positions: Sequence[tuple[int, int]] | torch.Tensor,
) -> Iterator[None]:
    """Add vectors to ``module``'s output at (batch row, token) positions.

    ``delta`` is either one vector (added at every position) or a (len(positions), d) matrix, one
    row per position; a callable is evaluated at each forward (so an optimised tensor can change).
    Gradients flow into ``delta``.
    """
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1, 2)

    def hook(mod, args, out):
        o = _first(out)
        d = delta() if callable(delta) else delta
        if d.dim() == 1:
            d = d.unsqueeze(0).expand(len(pos), -1)
        o = o.clone()
        o[pos[:, 0], pos[:, 1]] = o[pos[:, 0], pos[:, 1]] + d.to(o.dtype)
        return _replace_first(out, o)

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def replace_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s (first) output by ``fn(output)`` for forwards run in the block."""

    def hook(mod, args, out):
        return _replace_first(out, fn(_first(out)))

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def block_output(out) -> torch.Tensor:
    """The hidden states a transformer block returned (a tensor, or the first item of a tuple)."""
    return _first(out)
