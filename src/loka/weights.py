"""The model's weights kept safe: whatever runs inside :func:`preserved_weights`, they come back bit for bit.

Every method that changes weights while it works (the value search, the trainers) runs inside this
block, so a failing or refused method leaves the model exactly as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_weights(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Restore the named parameters exactly when the block exits, normally or by an exception."""
    names = list(dict.fromkeys(names))
    backup = {n: model.get_parameter(n).detach().clone() for n in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in backup.items():
                model.get_parameter(n).copy_(t)
