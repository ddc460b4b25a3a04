"""The sequential engine: a folder of batch artifacts, numbered by a stored counter.

Sessions (``loka edit --state``), LOKA's sequential codebooks (``loka update --state``) and
sequential evaluation runs all keep their batches in a :class:`BatchFolder`::

    DIR/batches.json          {"format": "loka-batches", "next": 3, "batches": [{"n": 0, "id": …}, …]}
    DIR/batch_00000.loka      one artifact per batch, in order
    DIR/batch_00001.loka
    DIR/batch_00002.loka

The index is the truth: a batch is named by the stored counter ``next`` (never by counting folders),
every listed batch must exist and load with the id recorded for it, and the numbers must run 0, 1, 2, …
without a gap — a folder that breaks any of this is refused with what to do. Appending writes the
artifact first and the index second; removing writes the index first and deletes second, so a crash at
any point leaves at most an unlisted batch folder above the counter, which the next open removes.

Rollback has one meaning everywhere: :meth:`BatchFolder.drop_last` removes the last ``n`` batches
(``--rollback-last N``), :meth:`BatchFolder.keep_first` keeps the first ``n`` (``--keep-first N``).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifact import Artifact, is_artifact_dir, load_artifact
from .errors import ArtifactError, ConfigError
from .utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

INDEX = "batches.json"
FORMAT = "loka-batches"
_NAME = re.compile(r"^batch_(\d{5,})\.loka$")


def batch_name(n: int) -> str:
    return f"batch_{n:05d}.loka"


@dataclass
class BatchFolder:
    """The batches of one sequential run (see the module docstring)."""

    folder: Path

    def __init__(self, folder: str | Path, *, create: bool = True, index: str | Path | None = None):
        """Open ``folder`` (created, empty, when missing and ``create``), verifying its index
        (``index``, default ``folder/batches.json``); a folder of batches written before the index
        existed is adopted if its numbering has no gap."""
        self.folder = Path(folder)
        self.index_path = Path(index) if index is not None else self.folder / INDEX
        if self.folder.exists() and not self.folder.is_dir():
            raise ArtifactError(f"{self.folder} is a file, not a folder of batches: choose another path")
        if not self.folder.exists():
            if not create:
                raise ArtifactError(f"{self.folder} does not exist")
            self.folder.mkdir(parents=True)
        index = self.index_path
        self.entries: list[dict] = []
        if index.exists():
            self._read_index(index)
        else:
            self._adopt()
        self._check()

    # -- the index ---------------------------------------------------------------------------------
    def _read_index(self, index: Path) -> None:
        d = read_json(index, 16 * 1024 * 1024)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ArtifactError(f"{index} is not a loka batch index; it was edited by hand or is not loka's")
        entries, nxt = d.get("batches"), d.get("next")
        if not isinstance(entries, list) or not isinstance(nxt, int) or isinstance(nxt, bool):
            raise ArtifactError(f"{index} is malformed (needs 'next' and 'batches'); it was edited by hand")
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("n"), int) and isinstance(e.get("id"), str)):
                raise ArtifactError(f"{index}: batch entry {e!r} is malformed; it was edited by hand")
        if nxt != len(entries):
            raise ArtifactError(
                f"{index}: counter next={nxt} but {len(entries)} batch(es) are listed; it was edited by hand"
            )
        self.entries = entries

    def _write_index(self) -> None:
        atomic_write_json(
            self.index_path, {"format": FORMAT, "next": len(self.entries), "batches": self.entries}
        )

    def _on_disk(self) -> dict[int, Path]:
        out = {}
        for p in self.folder.iterdir():
            m = _NAME.match(p.name)
            if m:
                out[int(m.group(1))] = p
        return out

    def _adopt(self) -> None:
        found = self._on_disk()
        others = sorted(p.name for p in self.folder.iterdir() if not _NAME.match(p.name))
        if self.index_path.parent == self.folder and others:
            raise ArtifactError(
                f"{self.folder} holds files loka did not write as batches ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); loka does not write into it: choose a new folder"
            )
        if not found:
            return
        numbers = sorted(found)
        if numbers != list(range(len(numbers))):
            gap = next(i for i in range(len(numbers) + 1) if i not in found)
            raise ArtifactError(
                f"{self.folder} has batches {numbers} with batch {gap} missing: a gap means batches were "
                "deleted by hand; restore the missing batch or start a new folder"
            )
        self.entries = [{"n": n, "id": load_artifact(found[n]).id} for n in numbers]
        self._write_index()
        log.info("%s: indexed %d existing batch(es)", self.folder, len(numbers))

    def _check(self) -> None:
        for i, e in enumerate(self.entries):
            if e["n"] != i:
                raise ArtifactError(
                    f"{self.index_path}: batch numbers must run 0, 1, 2, …; entry {i} is batch {e['n']} "
                    "(a gap): restore the missing batch or start a new folder"
                )
        on_disk = self._on_disk()
        for e in self.entries:
            if e["n"] not in on_disk:
                raise ArtifactError(
                    f"{self.folder}: batch {batch_name(e['n'])} is listed but missing; restore it or start a new folder"
                )
        for n, p in sorted(on_disk.items()):
            if n < len(self.entries):
                continue
            if not is_artifact_dir(p):
                raise ArtifactError(f"{p} is not a loka artifact but sits among the batches; move it away")
            log.warning("removing %s: an append was interrupted before it was recorded", p)
            shutil.rmtree(p)

    # -- access ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def path(self, n: int) -> Path:
        return self.folder / batch_name(n)

    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def load(self, n: int) -> Artifact:
        """Batch ``n``, verified: it must be the artifact recorded for it (same content id)."""
        if not 0 <= n < len(self.entries):
            raise ArtifactError(f"{self.folder} has no batch {n} (it has {len(self.entries)})")
        art = load_artifact(self.path(n))
        if art.id != self.entries[n]["id"]:
            raise ArtifactError(
                f"{self.path(n)} is artifact {art.id}, but batch {n} was recorded as {self.entries[n]['id']}: the "
                "folder was replaced by hand; restore the original or start a new folder"
            )
        return art

    def artifacts(self) -> list[Artifact]:
        return [self.load(n) for n in range(len(self.entries))]

    def latest(self) -> Artifact | None:
        return self.load(len(self.entries) - 1) if self.entries else None

    # -- changes -----------------------------------------------------------------------------------
    def append(self, artifact: Artifact, before_index=None, **record) -> Path:
        """Save ``artifact`` as the next batch: the artifact first, then ``before_index()`` (e.g. saving
        the state the batch built), then the index entry ``{"n", "id", **record}``."""
        n = len(self.entries)
        path = artifact.save(self.path(n))
        if before_index is not None:
            before_index()
        self.entries.append({"n": n, "id": artifact.id, **record})
        self._write_index()
        return path

    def drop_last(self, n: int) -> list[str]:
        """Remove the last ``n`` batches (index first, then the folders); returns their ids."""
        if not 0 <= n <= len(self.entries):
            raise ConfigError(
                f"cannot remove the last {n} batch(es) (--rollback-last): {self.folder} has {len(self.entries)}"
            )
        return self.keep_first(len(self.entries) - n)

    def keep_first(self, n: int, **record) -> list[str]:
        """Keep the first ``n`` batches and remove the rest; returns the removed ids. ``record`` updates
        the entry of the batch that is now the last (e.g. the hash of the state truncated to it)."""
        if not 0 <= n <= len(self.entries):
            raise ConfigError(
                f"cannot keep the first {n} batch(es) (--keep-first): {self.folder} has {len(self.entries)}"
            )
        gone = self.entries[n:]
        self.entries = self.entries[:n]
        if record and self.entries:
            self.entries[-1] = {**self.entries[-1], **record}
        self._write_index()
        for e in gone:
            shutil.rmtree(self.path(e["n"]), ignore_errors=True)
        return [e["id"] for e in gone]
