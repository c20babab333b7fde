"""Distillation methods, registered by name (``method.name`` in a config)."""

from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.registry import METHODS, all_methods, get_method, register

__all__ = ["DistillMethod", "MethodContext", "METHODS", "all_methods", "get_method", "register"]
