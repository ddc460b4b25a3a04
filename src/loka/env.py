"""Process-wide settings decided in one place: offline mode, cache root, device, dtypes and threads.

Importing this module imports neither torch nor transformers (``loka --help`` starts in a fraction of
torch's import time); the dtypes and :func:`device` import torch when first used."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Never reach a model hub: without this a hub look-up hangs ~30 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("loka")

#: dtype names for the model's forward passes (CPU: float32 is both the fastest and the exact choice)
#: and for every linear solve (covariances, least squares: float64, never an explicit inverse).
_DTYPES = {"MODEL_DTYPE": "float32", "SOLVE_DTYPE": "float64"}


def __getattr__(name: str):
    """``MODEL_DTYPE`` and ``SOLVE_DTYPE`` as torch dtypes, importing torch on first use."""
    if name in _DTYPES:
        import torch

        return getattr(torch, _DTYPES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def loka_home() -> Path:
    """Root of loka's caches: ``$LOKA_HOME`` or ``~/.cache/loka``."""
    root = Path(os.environ.get("LOKA_HOME") or Path.home() / ".cache" / "loka")
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    """A sub-folder of the cache root (``models``, ``stats``, ``corpora``, ``templates``)."""
    d = loka_home() / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def device(want: str | torch.device | None = None) -> torch.device:
    """The compute device (a ``torch.device``), decided here and nowhere else: ``want`` (``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or a ``torch.device``), else ``$LOKA_DEVICE``, else CUDA when present,
    else CPU. ``"auto"`` and ``None`` leave the choice to the next rule. Asking for a CUDA device that
    torch cannot see raises :class:`~loka.errors.ConfigError`."""
    import torch

    from .errors import ConfigError

    src = "device" if want is not None and str(want).strip().lower() != "auto" else "LOKA_DEVICE"
    raw = str(want) if src == "device" else os.environ.get("LOKA_DEVICE", "")
    name = raw.strip().lower()
    shown = f"device={raw!r} (--device {raw})" if src == "device" else f"LOKA_DEVICE={raw!r}"
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{shown} is not a device: give cpu, cuda, cuda:N or auto")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{shown}: torch sees no CUDA GPU here; use cpu or auto (or a CUDA build of torch)")
    n = torch.cuda.device_count()
    if index and int(index) >= n:
        raise ConfigError(f"{shown}: torch sees {n} CUDA GPU(s); give cuda:0..cuda:{n - 1}")
    return torch.device(name)


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, read from the environment at each call: ``$HF_HUB_CACHE``,
    else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


# -- threads -------------------------------------------------------------------------------------
_threads_set: int | None = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cpus(samples: int = 5, interval: float = 0.01) -> int:
    """CPUs that other processes keep busy right now: the fewest runnable tasks seen in ``samples``
    reads of ``/proc/loadavg`` (this process, which is running while it reads, not counted). The
    minimum over a few reads ignores tasks that run for a moment; 0 where the file does not exist."""
    import time

    seen = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        seen.append(running - 1)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(seen))


def auto_threads() -> int:
    """The default intra-op thread count: the CPUs no other process keeps busy (at least 1).

    With every core already taken, OpenMP threads that spin-wait for each other are descheduled in
    turn and a forward slows by 5–10x (``benchmarks/threads.py``); one thread per idle core keeps the
    single-process speed on a quiet machine and avoids that collapse on a shared one."""
    return max(1, available_cpus() - busy_cpus())


def requested_threads(value: int | str | None = None) -> int:
    """Resolve a thread setting: ``value`` (an int, or "auto"), else ``$LOKA_THREADS``, else "auto"."""
    from .errors import ConfigError

    raw = value if value is not None else (os.environ.get("LOKA_THREADS") or "auto")
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return auto_threads()
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        src = "--threads" if value is not None else "LOKA_THREADS"
        raise ConfigError(f"{src} must be a positive integer or 'auto', got {raw!r}")
    return n


def set_threads(value: int | str | None = None) -> int:
    """Set torch's intra-op threads — the one place loka does — and return the count.

    ``value``: a positive int, or "auto" (:func:`auto_threads`); ``None`` reads ``$LOKA_THREADS``
    (default "auto")."""
    global _threads_set
    n = requested_threads(value)
    import torch

    torch.set_num_threads(n)
    _threads_set = n
    log.debug("intra-op threads: %d (of %d CPUs)", n, available_cpus())
    return n


def ensure_threads() -> int:
    """Apply the thread setting once per process (called by model loading); later calls keep it."""
    return _threads_set if _threads_set is not None else set_threads()


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """loka's log lines on stderr: INFO by default, DEBUG with ``verbose``, only warnings and errors
    with ``quiet`` (which also turns progress off: ``LOKA_QUIET=1``)."""
    if quiet:
        os.environ["LOKA_QUIET"] = "1"
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # transformers is chatty about GGUF conversion and generation defaults
    logging.getLogger("transformers").setLevel(logging.ERROR)
