"""Distillation methods, registered by name (``method.name`` in a config)."""

from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.registry import METHODS, get_method, register

__all__ = ["DistillMethod", "MethodContext", "METHODS", "get_method", "register"]

from stepdistill.methods import sid  # noqa: E402,F401,I001  (SiD)
from stepdistill.methods import vsd  # noqa: E402,F401  (VSD / SwiftBrush)
