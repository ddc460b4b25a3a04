"""Progress for anything that takes more than a few seconds: a bar on a terminal, one line per
stage otherwise (a log or a pipe gets ``stage: N unit in S s`` when the stage ends, not hundreds of
redraws), nothing with ``LOKA_QUIET=1`` (``loka --quiet``)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("loka")


def quiet() -> bool:
    return os.environ.get("LOKA_QUIET", "") not in ("", "0")


class _Stage:
    """The bar's interface without drawing: it reports the stage once, when it closes."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.disable = False
        self._t0 = time.time()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            unit = self.unit if self.n == 1 or not self.unit or self.unit.endswith("s") else self.unit + "s"
            log.info("%s: %d %s in %.1f s", self.desc, self.n, unit, time.time() - self._t0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Off(_Stage):
    def __init__(self):
        super().__init__(None, "", "")
        self.disable = True

    def close(self) -> None:
        pass


def track(items, desc: str = "", unit: str = "it", disable: bool = False):
    """Iterate ``items`` under :func:`bar`."""
    items = list(items)
    b = bar(total=len(items), desc=desc, unit=unit, disable=disable)
    try:
        for x in items:
            yield x
            b.update(1)
    finally:
        b.close()


def bar(
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
    leave: bool = False,
):
    """A progress bar (``tqdm``) on a terminal, a one-line stage report elsewhere, or nothing when
    ``disable`` or quiet. Nested bars do not stay on screen (``leave=False``)."""
    if disable or quiet():
        return _Off()
    if not sys.stderr.isatty():
        return _Stage(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
