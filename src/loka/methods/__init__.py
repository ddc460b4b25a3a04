"""Editing and unlearning methods, behind one interface and a registry."""

from . import alphaedit, grace, loka, lora, lyaplock, memit, rome, scr, train, wise  # noqa: F401  (registration)
from .base import REGISTRY, HParams, Method, default_hparams, get_method, register

__all__ = ["REGISTRY", "HParams", "Method", "default_hparams", "get_method", "register"]
