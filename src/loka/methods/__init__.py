"""Editing and unlearning methods, behind one interface and a registry.

Every module of this package is imported here, so a method registers itself by being a file in it
(``@register`` on its class): adding a method is one file plus its config folder.
"""

import importlib
import pkgutil

from .base import REGISTRY, HParams, Method, default_hparams, get_method, methods_for, register

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["REGISTRY", "HParams", "Method", "default_hparams", "get_method", "methods_for", "register"]
