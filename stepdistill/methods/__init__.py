"""Distillation methods, registered by name (``method.name`` in a config)."""

from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.registry import METHODS, get_method, register

__all__ = ["DistillMethod", "MethodContext", "METHODS", "get_method", "register"]
from stepdistill.methods import consistency  # noqa: E402, F401  (registers lcm, pcm, scm)
