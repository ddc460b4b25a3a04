from .arch import SPECS, ArchSpec, spec_for
from .loader import KNOWN_MODELS, ModelHandle, list_models, load_model

__all__ = ["SPECS", "ArchSpec", "spec_for", "KNOWN_MODELS", "ModelHandle", "list_models", "load_model"]
