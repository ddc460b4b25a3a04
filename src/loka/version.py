"""loka's version (one place: the package, artifacts and exports read it from here)."""

__version__ = "0.1.0"
