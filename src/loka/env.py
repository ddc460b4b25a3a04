"""Process-wide settings decided in one place: offline mode, cache root, device and dtypes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Never reach a model hub: without this a hub look-up hangs ~30 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

log = logging.getLogger("loka")

#: dtype for the model's forward passes (CPU: float32 is both the fastest and the exact choice).
MODEL_DTYPE = torch.float32
#: dtype for every linear solve (covariances, least squares): float64, never an explicit inverse.
SOLVE_DTYPE = torch.float64


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


def device() -> torch.device:
    """The compute device: ``$LOKA_DEVICE`` if set, else CUDA when present, else CPU."""
    want = os.environ.get("LOKA_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # transformers is chatty about GGUF conversion and generation defaults
    logging.getLogger("transformers").setLevel(logging.ERROR)
