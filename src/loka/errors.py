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


class InputError(LokaError, ValueError):
    """A file or folder given as input cannot be read as asked (missing, not a regular file, too large,
    not UTF-8, not valid JSON)."""


class OutputError(LokaError):
    """An output path that loka must not or cannot write (a folder it did not write, a file in the way,
    a read-only or full disk)."""


class DivergenceError(LokaError):
    """A method's loss or result became non-finite or exploded: the update is refused, weights untouched."""
