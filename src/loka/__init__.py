"""loka: edit, unlearn and measure what a language model knows."""

__version__ = "0.1.0"

from . import env  # noqa: F401,E402  (sets HF_HUB_OFFLINE before transformers is imported)
from .api import edit, unlearn, update, validate_requests  # noqa: E402
from .artifact import Artifact, bundle_artifacts, load_artifact, preserved_weights, stack_artifacts  # noqa: E402
from .bench.kg import KnowledgeGraph, build_curated, build_derived, load_graph  # noqa: E402
from .bench.probes import generate_probes  # noqa: E402
from .codebook import LokaModel  # noqa: E402
from .errors import ArtifactError, CacheError, ConfigError, LokaError, ModelError, RequestError  # noqa: E402
from .eval.html_report import write_report  # noqa: E402
from .eval.kg_runner import run_kg  # noqa: E402
from .methods import REGISTRY as METHODS  # noqa: E402
from .methods import default_hparams, get_method  # noqa: E402
from .methods.loka import CodebookFolder, state_from_artifact  # noqa: E402
from .models import KNOWN_MODELS, ArchSpec, ModelHandle, list_models, load_model  # noqa: E402
from .requests import EditRequest, ForgetRequest, RetainRequest, read_requests, request_from_record  # noqa: E402
from .scoring import generate, target_logprobs  # noqa: E402
from .session import Session  # noqa: E402
from .state import EditState  # noqa: E402
from .stats import second_moments  # noqa: E402
from .trace import add_at_positions, capture  # noqa: E402

__all__ = [
    "__version__", "edit", "unlearn", "update", "validate_requests", "Artifact", "load_artifact", "preserved_weights", "stack_artifacts",
    "bundle_artifacts",
    "ArtifactError", "CacheError", "ConfigError", "LokaError", "ModelError", "RequestError", "METHODS", "default_hparams",
    "get_method", "KNOWN_MODELS", "ArchSpec", "ModelHandle", "list_models", "load_model", "EditRequest",
    "read_requests", "request_from_record", "ForgetRequest", "RetainRequest", "generate", "target_logprobs", "second_moments",
    "add_at_positions", "capture", "Session", "EditState", "LokaModel", "CodebookFolder", "state_from_artifact",
    "KnowledgeGraph", "build_curated", "build_derived", "load_graph", "generate_probes", "run_kg", "write_report",
]
