"""Sequential editing that survives restarts: a folder of batches plus the state they built.

``DIR/session.json`` (model identity, method, hyperparameter overrides, PRUNE base),
``DIR/batches/`` (a :class:`~loka.sequential.BatchFolder`: one artifact per batch, numbered by its
stored counter, each recorded with its id and the hash of the state after it) and ``DIR/state/`` (the
:class:`~loka.state.EditState`: AlphaEdit's per-batch keys, PRUNE's original matrices). Opening a
session verifies all of it and applies the batches to the model in order; :meth:`Session.append`
edits one more batch on top and saves artifact, state and index in that order (each atomically);
:meth:`Session.rollback_last` reverts and removes the last batches and truncates the state to match.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .api import edit
from .artifact import Artifact
from .errors import ArtifactError, LokaError
from .sequential import BatchFolder
from .state import EditState
from .utils.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from .models.loader import ModelHandle

log = logging.getLogger(__name__)

SESSION_KEYS = ("format", "model", "model_hash", "method", "hparams", "prune")


def read_session_meta(folder: str | Path) -> dict | None:
    """``DIR/session.json`` checked for every field a session needs, or ``None`` when absent."""
    f = Path(folder) / "session.json"
    if not f.exists():
        return None
    meta = read_json(f, 1 << 20)
    if not isinstance(meta, dict) or meta.get("format") != "loka-session":
        raise ArtifactError(f"{f} is not a loka session file; it was edited by hand or is not loka's")
    missing = [k for k in SESSION_KEYS if k not in meta]
    if missing:
        raise ArtifactError(
            f"{f} lacks {', '.join(missing)}: the session file is incomplete (edited by hand?)"
        )
    if not isinstance(meta["method"], str) or not isinstance(meta["hparams"], dict):
        raise ArtifactError(f"{f}: method must be a name and hparams an object")
    return meta


class Session:
    def __init__(
        self,
        folder: str | Path,
        handle: ModelHandle,
        method: str | None = None,
        hparams: dict | None = None,
        prune: float | None = None,
    ):
        """Open ``folder`` (created when missing) and apply its batches to ``handle``.

        A new session needs ``method``; an existing one refuses another model, method, overrides or
        PRUNE setting (start a new folder for those). A folder that is not a session and not empty is
        refused (loka never writes into a folder it did not create).
        """
        self.folder, self.handle = Path(folder), handle
        meta_f = self.folder / "session.json"
        want = {"method": method, "hparams": hparams or {}, "prune": prune}
        meta = read_session_meta(self.folder)
        if meta is not None:
            self.meta = meta
            if self.meta["model_hash"] != handle.model_hash:
                raise LokaError(
                    f"{folder}: session made for {self.meta['model']} ({self.meta['model_hash'][:12]}), "
                    f"not {handle.name} ({handle.model_hash[:12]}); use another folder"
                )
            for k, v in want.items():  # what is not given is taken from the session
                if v and v != self.meta[k]:
                    raise LokaError(
                        f"{folder}: session uses {k}={self.meta[k]!r}, not {v!r}; use another folder"
                    )
        else:
            if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
                raise LokaError(
                    f"{folder} exists and is not a loka session (no session.json); loka does not write into it: "
                    "choose a new folder"
                )
            if method is None:
                raise LokaError(f"{folder} is not a session yet: give a method to start one")
            self.meta = {
                "format": "loka-session",
                "model": handle.name,
                "model_hash": handle.model_hash,
                **want,
                "batches": 0,
            }
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta_f, self.meta)
        self.batches = BatchFolder(self.folder / "batches", index=self.folder / "batches.json")
        n = len(self.batches)
        self.state = (
            EditState.load(self.folder / "state") if (self.folder / "state").exists() else EditState()
        )
        if self.state.batches == n + 1:  # the state of an append whose batch was never recorded
            log.warning("%s: dropping the state of an interrupted append", folder)
            self.state.truncate(n)
            self.state.save(self.folder / "state")
            if n:
                self.batches.keep_first(n, state=self.state.content_hash())
        elif self.state.batches != n:
            raise ArtifactError(
                f"{folder}: state covers {self.state.batches} batch(es), the batch index {n}; the state was "
                "replaced or edited by hand: restore it or start a new folder"
            )
        recorded = self.batches.entries[-1].get("state") if n else None
        if recorded is not None and recorded != self.state.content_hash():
            raise ArtifactError(
                f"{folder}/state does not match the state recorded after batch {n - 1}: it was replaced or "
                "edited by hand; restore it or start a new folder"
            )
        if self.meta.get("batches") != n:
            self.meta["batches"] = n
            atomic_write_json(meta_f, self.meta)
        self.applied: list[Artifact] = []
        try:
            for k in range(n):
                self.applied.append(self.batches.load(k).apply(handle))
        except Exception:
            self.close()
            raise

    def _batch(self, k: int) -> Path:
        return self.batches.path(k)

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def append(self, requests, progress: bool = True) -> Artifact:
        """Edit ``requests`` as the next batch on top of the earlier ones; saved before returning."""
        k = self.n_batches
        art = edit(
            self.handle,
            requests,
            self.meta["method"],
            self.meta["hparams"] or None,
            progress=progress,
            state=self.state,
            prune=self.meta["prune"],
        )
        self.applied.append(art)
        try:
            self.batches.append(
                art,
                before_index=lambda: self.state.save(self.folder / "state"),
                state=self.state.content_hash(),
            )
            self.meta["batches"] = k + 1
            atomic_write_json(self.folder / "session.json", self.meta)
        except BaseException:  # nothing half-done: the batch is undone in memory and on disk
            self.applied.pop().revert(self.handle)
            self.state.truncate(k)
            if len(self.batches) > k:
                self.batches.keep_first(k)
            else:
                import shutil

                shutil.rmtree(self._batch(k), ignore_errors=True)
            if (self.folder / "state").exists():
                self.state.save(self.folder / "state")
            self.meta["batches"] = k
            atomic_write_json(self.folder / "session.json", self.meta)
            raise
        return art

    def rollback_last(self, n: int = 1) -> None:
        """Revert and remove the last ``n`` batches (bit-exact weights; state truncated to match)."""
        if not 0 < n <= self.n_batches:
            raise LokaError(
                f"cannot remove the last {n} batch(es) (--rollback-last): the session has {self.n_batches}"
            )
        self.keep_first(self.n_batches - n)

    def keep_first(self, n: int) -> None:
        """Keep the first ``n`` batches: revert and remove the rest."""
        if not 0 <= n <= self.n_batches:
            raise LokaError(
                f"cannot keep the first {n} batch(es) (--keep-first): the session has {self.n_batches}"
            )
        while len(self.applied) > n:
            self.applied.pop().revert(self.handle)
        self.state.truncate(n)
        self.state.save(self.folder / "state")
        self.batches.keep_first(n, state=self.state.content_hash())
        self.meta["batches"] = n
        atomic_write_json(self.folder / "session.json", self.meta)

    def rollback(self, n: int = 1) -> None:
        """The same as :meth:`rollback_last` (remove the last ``n`` batches)."""
        self.rollback_last(n)

    def summary(self) -> dict:
        batches = []
        for k, a in enumerate(self.applied):
            batches.append(
                {
                    "batch": k,
                    "id": a.id,
                    "requests": len(a.manifest["requests"]),
                    "seconds": a.manifest.get("extra", {}).get("seconds"),
                }
            )
        return {
            **{k: v for k, v in self.meta.items() if k != "format"},
            "edits": sum(b["requests"] for b in batches),
            "batch_list": batches,
        }

    def close(self) -> None:
        """Revert every batch this session applied (the model is as it was before opening)."""
        while self.applied:
            self.applied.pop().revert(self.handle)
