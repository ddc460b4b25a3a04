"""The server's artifact store: a folder holding one verified artifact folder per id.

``<store>/<id>/`` is written by :meth:`Artifact.save` (atomic); ``<store>/<id>.serve.json`` beside it
records what the store knows beyond the manifest (which request was an edit, a forget or a retain, and
the before/after report of the run that made it). The index is derived from the folders at each look
(no database): a folder that does not verify (:func:`loka.artifact.load_artifact`: files, manifest,
tensors, content id) is skipped with one logged warning and never deleted. Only folders the store
wrote (named by their id, holding exactly an artifact's two files) are ever removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import methods  # noqa: F401  (memory and context artifacts install through their method)
from ..artifact import FILES, Artifact, is_artifact_dir, load_artifact
from ..errors import ArtifactError, InputError, LokaError
from ..utils.io import (
    atomic_write_json,
    check_writable,
    clean_stale_tmp,
    read_json,
    tmp_sibling,
)

log = logging.getLogger(__name__)

SetName = Literal["edit", "forget", "retain"]

#: the marker of the store's sidecar files (``<id>.serve.json``)
META_FORMAT = "loka-serve-meta"
META_SUFFIX = ".serve.json"
#: an uploaded artifact tar larger than this is refused
MAX_UPLOAD_BYTES = 4 * 1024**3
#: verified artifacts kept in memory (their tensors); others are re-read (and re-verified) when needed
CACHE_SIZE = 32


class NotFoundError(LokaError):
    """An id or path the server does not have (HTTP 404)."""


class ConflictError(LokaError):
    """A request that clashes with the server's state: applying an applied artifact, deleting an applied
    one, an artifact made for other weights (HTTP 409)."""


@dataclass
class Entry:
    """One artifact of the store: its verified manifest, folder and what the store recorded about it."""

    id: str
    path: Path
    manifest: dict[str, Any]
    key: tuple[int, int, int]  # (inode, mtime_ns, size) of the manifest when it was verified
    meta: dict[str, Any] = field(default_factory=dict)

    def sets(self) -> list[SetName]:
        """Per request of the manifest: edit, forget or retain (recorded at creation; otherwise a
        request without a new answer is a forget and every other one an edit)."""
        reqs = self.manifest.get("requests") or []
        rec = self.meta.get("sets")
        if isinstance(rec, list) and len(rec) == len(reqs) and all(s in SET_NAMES for s in rec):
            return list(rec)
        return ["forget" if isinstance(r, dict) and r.get("target_new") is None else "edit" for r in reqs]

    def summary(self) -> dict[str, Any]:
        """The row of ``GET /v1/artifacts`` (without ``applied``, which the engine knows)."""
        reqs = [r for r in self.manifest.get("requests") or [] if isinstance(r, dict)]
        sets = self.sets()
        counts = {s: sets.count(s) for s in SET_NAMES}
        model = self.manifest.get("model") or {}
        return {
            "id": self.id,
            "method": self.manifest.get("method"),
            "kind": self.manifest.get("kind"),
            "created": self.manifest.get("created"),
            "requests": counts,
            "targets": [target_line(r, s) for r, s in zip(reqs, sets)],
            "model": model.get("name"),
            "model_hash": (model.get("hash") or "")[:16],
        }


SET_NAMES: tuple[SetName, ...] = ("edit", "forget", "retain")


def target_line(req: dict, which: SetName) -> str:
    """A request in a few words: ``Eiffel Tower → Rome`` (edit), ``forget Danielle Darrieux → French``,
    ``keep Eiffel Tower → Paris`` (retain)."""
    subject = str(req.get("subject") or "?")
    if which == "forget":
        return f"forget {subject} → {req.get('target_true')}"
    line = f"{subject} → {req.get('target_new')}"
    return f"keep {line}" if which == "retain" else line


def _manifest_key(folder: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(folder / "manifest.json", follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ArtifactStore:
    """A folder of artifacts, indexed by id from the folders themselves; thread-safe."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--store {self.root} is a file; give a folder (created if missing)")
        check_writable(self.root)
        clean_stale_tmp(self.root / "scratch")  # scratch folders of servers that were killed
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._by_name: dict[str, tuple[tuple[int, int, int], str | None]] = {}  # name -> (key, id or None)
        self._loaded: OrderedDict[str, Artifact] = OrderedDict()
        self.scan()

    # -- the index ----------------------------------------------------------------------------------
    def scan(self) -> dict[str, Entry]:
        """Bring the index up to date with the folder: verify new or changed folders, drop vanished ones."""
        with self._lock:
            seen: set[str] = set()
            try:
                names = sorted(os.listdir(self.root))
            except OSError as e:
                raise InputError(f"the store {self.root} cannot be read ({e.strerror})") from None
            for name in names:
                folder = self.root / name
                if name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                    continue
                seen.add(name)
                key = _manifest_key(folder)
                known = self._by_name.get(name)
                if known is not None and key is not None and known[0] == key:
                    continue  # unchanged since it was verified (or refused)
                self._drop_name(name)
                try:
                    art = load_artifact(folder)
                except LokaError as e:
                    log.warning("store: skipping %s: %s", folder, e)
                    self._by_name[name] = (key or (0, 0, 0), None)
                    continue
                if art.id in self._entries and self._entries[art.id].path != folder:
                    log.warning(
                        "store: skipping %s: it holds artifact %s, which %s holds too",
                        folder,
                        art.id,
                        self._entries[art.id].path,
                    )
                    self._by_name[name] = (key or (0, 0, 0), None)
                    continue
                entry = Entry(art.id, folder, art.manifest, key or (0, 0, 0), self._read_meta(art.id))
                self._entries[art.id] = entry
                self._by_name[name] = (entry.key, art.id)
                self._remember(art)
            for name in set(self._by_name) - seen:
                self._drop_name(name)
                del self._by_name[name]
            return dict(self._entries)

    def _drop_name(self, name: str) -> None:
        known = self._by_name.get(name)
        if known is not None and known[1] is not None:
            self._entries.pop(known[1], None)
            self._loaded.pop(known[1], None)

    def _remember(self, art: Artifact) -> None:
        self._loaded[art.id] = art
        self._loaded.move_to_end(art.id)
        while len(self._loaded) > CACHE_SIZE:
            self._loaded.popitem(last=False)

    def _read_meta(self, art_id: str) -> dict[str, Any]:
        path = self.root / f"{art_id}{META_SUFFIX}"
        if not path.exists():
            return {}
        try:
            meta = read_json(path, 64 * 1024 * 1024)
        except LokaError as e:
            log.warning("store: ignoring %s: %s", path, e)
            return {}
        return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else {}

    def entries(self) -> list[Entry]:
        """Every verified artifact, newest first."""
        return sorted(
            self.scan().values(), key=lambda e: (e.manifest.get("created") or "", e.id), reverse=True
        )

    def entry(self, art_id: str) -> Entry:
        entry = self.scan().get(art_id)
        if entry is None:
            raise NotFoundError(f"artifact {art_id!r} is not in the store (GET /v1/artifacts lists them)")
        return entry

    def get(self, art_id: str) -> Artifact:
        """The artifact ``art_id``, verified (from memory, or read again from its folder)."""
        entry = self.entry(art_id)
        with self._lock:
            art = self._loaded.get(art_id)
            if art is not None:
                self._loaded.move_to_end(art_id)
                return art
        art = load_artifact(entry.path)
        if art.id != art_id:
            raise ArtifactError(f"{entry.path} changed while the server ran (it now holds {art.id})")
        with self._lock:
            self._remember(art)
        return art

    def __contains__(self, art_id: str) -> bool:
        return art_id in self.scan()

    # -- writing ----------------------------------------------------------------------------------
    def add(self, art: Artifact, meta: dict[str, Any] | None = None) -> Entry:
        """Save ``art`` as ``<store>/<id>/`` (an artifact already there, with the same content id, is kept)
        and ``meta`` beside it."""
        path = self.root / art.id
        new = art.id not in self.scan()
        if new:
            art.save(path)  # refuses a folder in the way that loka did not write
        if meta:
            atomic_write_json(self.root / f"{art.id}{META_SUFFIX}", {"format": META_FORMAT, **meta})
        entry = self.scan().get(art.id)  # a new folder is verified (and its meta read) here
        if entry is None:
            raise ArtifactError(f"{path} was written but does not verify; the store's disk may be failing")
        if meta and not new:
            entry.meta = self._read_meta(art.id)
        with self._lock:
            self._remember(art)
        return entry

    def remove(self, art_id: str) -> None:
        """Delete ``<store>/<id>/`` (and its sidecar): only a folder the store wrote, moved aside in one
        step first so that no reader sees it half deleted."""
        entry = self.entry(art_id)
        if entry.path.name != art_id or not is_artifact_dir(entry.path):
            raise ConflictError(
                f"{entry.path} was not written by this store (a store folder is named by its artifact's id and "
                "holds only manifest.json and deltas.safetensors); remove it by hand if you mean to"
            )
        gone = self.root / tmp_sibling(entry.path)
        os.rename(entry.path, gone)
        shutil.rmtree(gone, ignore_errors=True)
        side = self.root / f"{art_id}{META_SUFFIX}"
        if side.is_file() and not side.is_symlink() and self._read_meta(art_id):
            side.unlink(missing_ok=True)
        self.scan()

    # -- scratch space, tar in and out ------------------------------------------------------------
    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary folder inside the store, removed afterwards (a killed server's are removed at the
        next start)."""
        tmp = self.root / tmp_sibling(self.root / "scratch")
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def new_scratch(self) -> Path:
        """A temporary folder inside the store that the caller removes (:meth:`drop_scratch`)."""
        tmp = self.root / tmp_sibling(self.root / "scratch")
        tmp.mkdir()
        return tmp

    def drop_scratch(self, tmp: Path) -> None:
        if tmp.parent == self.root and tmp.name.startswith(".scratch.loka-tmp-"):
            shutil.rmtree(tmp, ignore_errors=True)

    def write_tar(self, art_id: str, out: Path) -> Path:
        """``out``: a tar holding ``<id>.loka/manifest.json`` and ``<id>.loka/deltas.safetensors``, read from
        the artifact's folder (regular files only) and verified again afterwards."""
        entry = self.entry(art_id)
        with tarfile.open(out, "w") as tar:
            for name in FILES:
                fd = os.open(entry.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        raise ArtifactError(f"{entry.path / name} is not a regular file")
                    info = tarfile.TarInfo(f"{art_id}.loka/{name}")
                    info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
                    tar.addfile(info, f)
        return out

    def read_tar(self, data: Path, scratch: Path) -> Artifact:
        """The artifact inside the tar file ``data``, extracted into ``scratch`` and verified by loka's
        loader (files, manifest, tensors, content id). The tar may hold the two files at its top or in
        one folder, and nothing else."""
        dest = scratch / "artifact.loka"
        dest.mkdir()
        try:
            tar = tarfile.open(data, "r:*")
        except (tarfile.TarError, OSError) as e:
            raise InputError(
                f"the upload is not a tar archive ({e}); send the file GET .../download gives"
            ) from None
        with tar:
            seen: set[str] = set()
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if m.isdir() and len(parts) <= 1 and ".." not in parts:
                    continue
                name = parts[-1] if parts else ""
                if (
                    not m.isreg()
                    or len(parts) > 2
                    or ".." in parts
                    or m.name.startswith("/")
                    or name not in FILES
                    or name in seen
                ):
                    raise InputError(
                        f"the upload holds {m.name!r}; an artifact tar holds only manifest.json and "
                        "deltas.safetensors (regular files, at its top or in one folder)"
                    )
                if m.size > MAX_UPLOAD_BYTES:
                    raise InputError(f"the upload's {name} has {m.size} bytes, more than an artifact holds")
                seen.add(name)
                src = tar.extractfile(m)
                assert src is not None
                with open(dest / name, "xb") as f:
                    shutil.copyfileobj(src, f)
        return load_artifact(dest)
