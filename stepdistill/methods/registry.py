"""Name → method class, found without a hand-kept list.

A method registers itself with ``@register`` in its own module. ``get_method`` and ``all_methods`` first
discover the methods: every public module of the ``stepdistill.methods`` package is imported (a new file
there is enough), then every entry point of the group ``stepdistill.methods`` that an installed
distribution declares is loaded, e.g. in a plugin's ``pyproject.toml``::

    [project.entry-points."stepdistill.methods"]
    tcm = "my_plugin.tcm"          # a module whose classes use @register
    # or: tcm = "my_plugin.tcm:TCM"  (a DistillMethod subclass, registered here)
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
from importlib import metadata

from stepdistill.methods.base import DistillMethod

ENTRY_POINT_GROUP = "stepdistill.methods"
METHODS: dict[str, type] = {}
# Modules of the package that define no method (importing them would be harmless, but is not needed).
_NOT_METHODS = frozenset({"base", "registry"})
_discovered_for: tuple | None = None  # sys.path at the last discovery (a changed path is searched again)


def register(cls):
    """Class decorator: make ``cls`` (a ``DistillMethod`` with a ``name``) available as ``method.name``.

    Registering the same class again is a no-op (discovery may meet it twice); another class under a
    name that is taken is an error.
    """
    if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
        raise TypeError(f"@register expects a DistillMethod subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no method name: set the class attribute `name`")
    known = METHODS.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"method {name!r} registered twice: {_where(known)} and {_where(cls)}")
    METHODS[name] = cls
    return cls


def _where(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_package_modules() -> None:
    package = sys.modules[__package__]
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_METHODS:
            continue
        importlib.import_module(f"{__package__}.{info.name}")  # runs the module's @register decorators


def _load_entry_point(ep) -> None:
    dist = getattr(ep, "dist", None)
    package = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"
    try:
        loaded = ep.load()
        if isinstance(loaded, type):
            register(loaded)
        elif not isinstance(loaded, types.ModuleType):
            raise TypeError(f"it loads {loaded!r}, neither a module nor a DistillMethod class")
    except Exception as e:
        raise RuntimeError(
            f"the {ENTRY_POINT_GROUP!r} entry point {ep.name!r} = {ep.value!r} of package {package} failed to "
            f"load: {type(e).__name__}: {e}. Fix or uninstall that package (pip uninstall)"
        ) from e


def discover() -> None:
    """Import the package's method modules and load the plugins' entry points (again when sys.path changed)."""
    global _discovered_for
    key = tuple(sys.path)
    if _discovered_for == key:
        return
    _import_package_modules()
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        _load_entry_point(ep)
    _discovered_for = key


def get_method(name: str) -> type:
    discover()
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not a known method; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods() -> dict[str, type]:
    discover()
    return dict(METHODS)
