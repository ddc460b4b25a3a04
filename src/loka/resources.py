"""Files shipped inside the package: the read-only inputs of loka's own commands.

Everything loka reads at run time (the guard's texts, the KnowledgeGraph sources and graphs, the TOFU
splits, the known facts and MQuAKE-hard, relation templates, the refusal strings) lives under
``loka/data`` and installs with the wheel, so an installed loka works outside a clone of its
repository. The repository's top-level ``data/`` holds only what benchmarks and docs use.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import LokaError


def data_dir() -> Path:
    """The package's data folder (``loka/data`` inside the installed package)."""
    return Path(str(resources.files("loka").joinpath("data")))


def data_path(*parts: str) -> Path:
    """``loka/data/<parts...>``, which must exist (else the installation is incomplete)."""
    p = data_dir().joinpath(*parts)
    if not p.exists():
        raise LokaError(
            f"package data {'/'.join(parts)} is missing from {data_dir()}: reinstall loka "
            "(pip install --force-reinstall loka)"
        )
    return p
