"""Provenance for benchmark results: every result JSON records how and where it was made.

``stamp()`` returns the command line, the commit (and whether the code differed from it: uncommitted
changes outside the result files and the docs, which runs write or which do not run), the
package versions, the CPU model and count, the intra-op threads, the load average (what else was
running) and the date. ``write_result(path, payload)`` adds it under ``"provenance"`` and writes the
file atomically. A script that collects rows from several runs into one file stamps each row it adds
(``merge_rows``), so that the file's own stamp (its last writer's) never stands for an older row.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from loka.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loka", "torch", "transformers", "peft", "accelerate", "numpy", "tokenizers", "safetensors")


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def uncommitted_code(root: Path = ROOT) -> bool | None:
    """Whether tracked files differ from the commit, not counting result files (runs write them, often a
    parallel run) and the docs: neither changes what is measured. None outside a git checkout."""
    dirty = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!benchmarks/results",
        ":!docs",
        root=root,
    )
    return bool(dirty) if dirty is not None else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def stamp(threads: int | None = None) -> dict:
    if threads is None and "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": uncommitted_code(),
        "python": platform.python_version(),
        "packages": versions(),
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_result(
    path: str | Path, payload: dict, threads: int | None = None, provenance: dict | None = None
) -> Path:
    """Write ``payload`` with its provenance: ``provenance`` when the caller stamped the run at its start
    (the commit it ran, not the one present when it ended), else a stamp taken now."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**payload, "provenance": provenance or stamp(threads)})
    return path


def merge_rows(old: Mapping[str, dict] | None, new: Mapping[str, dict], provenance: dict) -> dict[str, dict]:
    """``old`` rows (from the file an earlier run wrote) updated with ``new`` ones, each new row carrying
    ``provenance`` (the stamp of the run that measured it) under ``"provenance"``. A kept row keeps its
    own stamp, or none; a row measured again takes its old place in the order."""
    return {**(old or {}), **{k: {**row, "provenance": provenance} for k, row in new.items()}}
