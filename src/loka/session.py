"""Sequential editing that survives restarts: a folder of batches plus the state they built.

``DIR/session.json`` (model identity, method, hyperparameter overrides, PRUNE base, batch count),
``DIR/batches/batch_00000.loka …`` (one artifact per batch, in order) and ``DIR/state/`` (the
:class:`~loka.state.EditState`: AlphaEdit's per-batch keys, PRUNE's original matrices). Opening a
session applies its batches to the model in order; :meth:`Session.append` edits one more batch on
top and saves artifact, state and manifest (each atomically, artifact first);
:meth:`Session.rollback` reverts and deletes the last batches and truncates the state to match.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .api import edit
from .artifact import Artifact, load_artifact
from .errors import ArtifactError, LokaError
from .state import EditState
from .utils.io import atomic_write_json

log = logging.getLogger(__name__)


class Session:
    def __init__(
        self,
        folder: str | Path,
        handle,
        method: str | None = None,
        hparams: dict | None = None,
        prune: float | None = None,
    ):
        """Open ``folder`` (created when missing) and apply its batches to ``handle``.

        A new session needs ``method``; an existing one refuses another model, method, overrides or
        PRUNE setting (start a new folder for those).
        """
        self.folder, self.handle = Path(folder), handle
        meta_f = self.folder / "session.json"
        want = {"method": method, "hparams": hparams or {}, "prune": prune}
        if meta_f.exists():
            self.meta = json.loads(meta_f.read_text())
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
        self.state = (
            EditState.load(self.folder / "state") if (self.folder / "state").exists() else EditState()
        )
        n = self.meta["batches"]
        if self.state.batches != n:
            raise ArtifactError(
                f"{folder}: state covers {self.state.batches} batch(es), session.json {n}; "
                f"the last append was interrupted: delete batches/batch_{n:05d}.loka if present"
            )
        self.applied: list[Artifact] = []
        try:
            for k in range(n):
                self.applied.append(load_artifact(self._batch(k)).apply(handle))
        except Exception:
            self.close()
            raise

    def _batch(self, k: int) -> Path:
        return self.folder / "batches" / f"batch_{k:05d}.loka"

    @property
    def n_batches(self) -> int:
        return self.meta["batches"]

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
            art.save(self._batch(k))
            self.state.save(self.folder / "state")
            self.meta["batches"] = k + 1
            atomic_write_json(self.folder / "session.json", self.meta)
        except BaseException:  # nothing half-done: the batch is undone in memory and on disk
            self.applied.pop().revert(self.handle)
            self.state.truncate(k)
            self.meta["batches"] = k
            shutil.rmtree(self._batch(k), ignore_errors=True)
            if (self.folder / "state").exists():
                self.state.save(self.folder / "state")
            atomic_write_json(self.folder / "session.json", self.meta)
            raise
        return art

    def rollback(self, n: int = 1) -> None:
        """Revert and delete the last ``n`` batches (bit-exact weights; state truncated to match)."""
        if not 0 < n <= self.n_batches:
            raise LokaError(f"cannot roll back {n} batch(es): the session has {self.n_batches}")
        keep = self.n_batches - n
        for _ in range(n):
            self.applied.pop().revert(self.handle)
        self.state.truncate(keep)
        self.state.save(self.folder / "state")
        self.meta["batches"] = keep
        atomic_write_json(self.folder / "session.json", self.meta)
        for k in range(keep, keep + n):
            shutil.rmtree(self._batch(k), ignore_errors=True)

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
