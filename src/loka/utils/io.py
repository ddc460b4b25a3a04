"""Atomic writes and content hashes: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (names, dtypes, shapes and bytes), order-independent."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


# -- temporary names -------------------------------------------------------------------------------
def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.loka-tmp-"


def tmp_sibling(path: Path) -> str:
    """A unique temporary name beside ``path``: ``.NAME.loka-tmp-<pid>-<random>`` (the pid lets a later
    run tell a dead writer's leftovers from a live writer's work in progress)."""
    return f"{_tmp_prefix(path)}{os.getpid()}-{os.urandom(6).hex()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


PROBE = "probe"  # the name behind check_writable's temporary files


def clean_stale_tmp(path: str | Path) -> int:
    """Delete the temporary files and folders that writers of ``path`` left behind when they were
    killed (their pid no longer runs), and the writability probes (:func:`check_writable`) of its folder;
    a live writer's are kept. Returns how many were removed."""
    path = Path(path)
    prefixes = (_tmp_prefix(path), _tmp_prefix(path.parent / PROBE))
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for e in entries:
        prefix = next((p for p in prefixes if e.name.startswith(p)), None)
        if prefix is None:
            continue
        try:
            pid = int(e.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue  # in use by this process or by a live writer
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed += 1
    return removed


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def set_default_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have (for files made by writers that create
    them private, such as safetensors' ``save_file``, 0600), so every file loka writes has the same mode."""
    os.chmod(path, default_file_mode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part: a unique temporary
    file beside it, fsync, then one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    tmp = path.parent / tmp_sibling(path)
    try:
        # 0o666 less the umask (applied by the system), as open(path, "w") would give
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def cached_json(path: str | Path, key: str, compute: Callable[[], Any], field: str = "result") -> Any:
    """``compute()``, or the value saved in ``path`` under ``field`` when the file's ``key`` equals
    ``key`` (a content hash of everything the value depends on). A file that is missing, unreadable or
    keyed otherwise is recomputed and rewritten atomically."""
    path = Path(path)
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError):
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            value = saved[field]
            log.info("reusing %s", path)
            return value
    value = compute()
    atomic_write_json(path, {"key": key, field: value})
    return value


# -- folders replaced in one step -----------------------------------------------------------------
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_prefix(path: Path) -> str:
    return f".{path.name}.loka-old-"


def recover_dir(path: str | Path) -> None:
    """Finish an interrupted replacement of folder ``path`` on a filesystem without atomic exchange:
    if ``path`` is missing but its previous version was set aside, put that back."""
    path = Path(path)
    if path.exists():
        return
    prefix = _old_prefix(path)
    with contextlib.suppress(OSError):
        olds = sorted(
            (e for e in os.scandir(path.parent) if e.name.startswith(prefix)),
            key=lambda e: e.stat(follow_symlinks=False).st_mtime,
        )
        if olds:
            os.rename(olds[-1].path, path)
            log.warning("restored %s from an interrupted replacement", path)


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``. An existing ``path`` is swapped with ``tmp`` in one
    atomic step and the old contents then deleted, so at every instant ``path`` holds the old or the
    new folder, complete; concurrent writers of the same path each succeed (the last one wins)."""
    for _ in range(100):
        if path.is_dir() and not path.is_symlink():
            if _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
                return
            old = path.parent / f"{_old_prefix(path)}{os.getpid()}-{os.urandom(4).hex()}"
            try:  # no atomic exchange here: set the old one aside (recover_dir undoes a crash in between)
                os.rename(path, old)
            except FileNotFoundError:
                continue
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, path)  # path absent (or an empty folder, which rename replaces)
            return
        except OSError as e:
            if e.errno not in (17, 39):  # EEXIST, ENOTEMPTY: another writer got there first; swap instead
                raise
    raise OSError(f"could not replace {path}: it keeps changing under concurrent writers")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (:func:`replace_dir`).
    The caller decides beforehand whether ``path`` may be replaced (:func:`check_output_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    recover_dir(path)
    tmp = path.parent / tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # what a plain mkdir gives
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- reading only what is safe to read ------------------------------------------------------------
MAX_JSON_BYTES = 256 * 1024 * 1024


def read_regular(path: str | Path, max_bytes: int, *, dir_fd: int | None = None, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device) of at most
    ``max_bytes``; ``dir_fd`` reads ``path`` relative to an open folder (one consistent snapshot of it).
    Raises :class:`~loka.errors.InputError` naming the path and what is wrong."""
    import stat

    from ..errors import InputError

    shown = path if dir_fd is None else f"{what} {path}"
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise InputError(f"{shown} does not exist") from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symbolic link
            raise InputError(f"{shown} is a symbolic link; loka reads only regular files") from None
        if e.errno == 21:
            raise InputError(f"{shown} is a folder, not a file") from None
        raise InputError(f"{shown} cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{shown} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{shown} is not a regular file (a FIFO, device or socket); loka reads only regular files"
            )
        if st.st_size > max_bytes:
            raise InputError(
                f"{shown} has {st.st_size} bytes, more than the {max_bytes} expected; it is not what loka wrote"
            )
        chunks, left = [], st.st_size
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (a full disk) raised as ``OSError``; the file
    gets the mode ``open(path, "w")`` would give (:func:`default_file_mode`), not safetensors' 0600."""
    import errno as _errno
    import re as _re

    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # safetensors wraps the OS error in its own type
        m = _re.search(r"os error (\d+)", str(e))
        if m:
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None
        if "No space left" in str(e):
            raise OSError(_errno.ENOSPC, os.strerror(_errno.ENOSPC), str(path)) from None
        raise
    set_default_mode(path)  # save_file creates the file 0600; give it a plain file's mode


@contextlib.contextmanager
def safe_open_bytes(data: bytes) -> Iterator[tuple[dict, dict]]:
    """The tensors and header metadata of a safetensors file held in memory."""
    import json as _json
    import struct

    from safetensors.torch import load

    n = struct.unpack("<Q", data[:8])[0]
    header = _json.loads(data[8 : 8 + n])
    yield load(data), header.get("__metadata__") or {}


def parse_json(data: bytes, where: str) -> Any:
    """JSON from bytes with one clear error for bad UTF-8, bad JSON or absurd nesting."""
    from ..errors import InputError

    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where} nests JSON too deeply to be a loka file") from None


MAX_TEXT_BYTES = 2 * 1024 * 1024 * 1024


def read_text(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A regular UTF-8 text file of bounded size (:func:`read_regular`), one clear error otherwise."""
    from ..errors import InputError

    data = read_regular(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def check_regular(path: str | Path) -> Path:
    """``path`` if it is a regular file (not a folder, link target aside, FIFO or device), else one clear error."""
    import stat

    from ..errors import InputError

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(f"{p} does not exist") from None
    except OSError as e:
        raise InputError(f"{p} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{p} is not a regular file (a FIFO, device or socket); loka reads only regular files"
        )
    return p


def read_json(
    path: str | Path, max_bytes: int = MAX_JSON_BYTES, *, dir_fd: int | None = None, what: str = "file"
) -> Any:
    """:func:`read_regular` + :func:`parse_json`."""
    shown = str(path) if dir_fd is None else f"{what} {path}"
    return parse_json(read_regular(path, max_bytes, dir_fd=dir_fd, what=what), shown)


# -- output paths ------------------------------------------------------------------------------------
def check_writable(folder: str | Path) -> None:
    """Fail now, before any work, if nothing can be written in ``folder`` (created if missing):
    read-only filesystem, no permission, or a file in the way."""
    from ..errors import OutputError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / tmp_sibling(folder / PROBE)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise OutputError(f"{folder} cannot be created: a file is in the way") from None
    except NotADirectoryError:
        raise OutputError(f"{folder} cannot be created: part of the path is a file") from None
    except OSError as e:
        raise OutputError(f"cannot write in {folder} ({e.strerror}); choose a writable folder") from None


def check_output_file(
    path: str | Path,
    *,
    is_ours: Callable[[Path], bool],
    what: str,
    force: bool,
    companions: tuple[Path, ...] = (),
    flag: str = "--force",
) -> Path:
    """:func:`check_output_dir` for a file (with ``companions`` written beside it, such as a sidecar): a
    missing path may be written; an existing file that ``is_ours`` (loka wrote it, it is ``what`` and is
    unchanged) only with ``force``; anything else — a folder, a link, a file loka did not write — never.
    Also checks the parent is writable."""
    from ..errors import OutputError

    path = Path(path)
    for p in (path, *companions):
        if p.is_symlink():
            raise OutputError(
                f"{p} is a symbolic link; loka does not write through links: choose another path"
            )
        if p.exists() and not p.is_file():
            raise OutputError(
                f"{p} is a folder or another non-file; loka writes {what} as a file: choose another path"
            )
    if any(p.exists() for p in (path, *companions)):
        _replace_only_ours(
            path,
            is_ours,
            f"{path} exists and loka did not write it as {what} (or it was changed since)",
            what,
            force,
            flag,
        )
    check_writable(path.parent if str(path.parent) else Path("."))
    return path


def _replace_only_ours(
    path: Path, is_ours: Callable[[Path], bool], not_ours: str, what: str, force: bool, flag: str
) -> None:
    """The rule for an existing output: never replaced unless loka wrote it, and then only with ``flag``."""
    from ..errors import OutputError

    if not is_ours(path):
        raise OutputError(f"{not_ours}; loka never replaces it, even with --force: choose another path")
    if not force:
        raise OutputError(f"{path} already holds {what}; pass {flag} to replace it")


def check_output_dir(
    path: str | Path, *, is_ours: Callable[[Path], bool], what: str, force: bool, flag: str = "--force"
) -> Path:
    """Decide, before any work, whether folder ``path`` may be written: a missing path or an empty folder
    may; an existing folder that ``is_ours`` (loka wrote it, and it is ``what``) only with ``force``;
    anything else — a file, a link, a folder loka did not write — never. Also checks the parent is writable."""
    from ..errors import OutputError

    path = Path(path)
    recover_dir(path)
    if path.is_symlink():
        raise OutputError(
            f"{path} is a symbolic link; loka does not write through links: choose another path"
        )
    if path.exists():
        if not path.is_dir():
            raise OutputError(
                f"{path} is an existing file; loka writes {what} as a folder and never replaces "
                "a file it did not write: choose another path"
            )
        entries = os.listdir(path)
        if entries:
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            not_ours = f"{path} is a folder loka did not write as {what} (it holds {shown})"
            _replace_only_ours(path, is_ours, not_ours, what, force, flag)
    check_writable(path.parent if str(path.parent) else Path("."))
    return path
