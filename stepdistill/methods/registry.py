"""Name → method class. A new method registers itself with ``@register`` in its own file."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(cls):
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def _import_all() -> None:
    # Importing the method modules runs their @register decorators.
    from stepdistill.methods import adversarial, consistency, dmd, guidance, phased_dmd, sid, vsd  # noqa: F401


def get_method(name: str) -> type:
    _import_all()
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not a known method; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods() -> dict[str, type]:
    _import_all()
    return dict(METHODS)
