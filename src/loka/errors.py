"""Exceptions that carry a message a user can act on (what is wrong, and the fix)."""


class LokaError(Exception):
    """Base class: every loka error names the field at fault and how to fix it."""


class RequestError(LokaError, ValueError):
    """A malformed edit/forget request or dataset record."""


class ModelError(LokaError, ValueError):
    """Unknown model name, unsupported architecture, layer out of range."""


class ArtifactError(LokaError, ValueError):
    """A corrupt, mismatched or unreadable artifact."""


class ConfigError(LokaError, ValueError):
    """A run's settings are invalid or clash with an earlier run's (resume)."""


class CacheError(LokaError):
    """A cache entry failed its content-hash check."""
