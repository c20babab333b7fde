"""Load a run configuration: YAML file (+ ``base:`` inheritance) + ``key=value`` overrides -> typed config.

The result is an OmegaConf ``DictConfig`` backed by the dataclasses of ``config/schema.py`` and the
chosen method's own ``Config`` dataclass, so an unknown key or a value of the wrong type fails here,
before any model is loaded, with one ``ValueError`` that names the full key, where it came from and
what would be valid.

Order of precedence (later wins)::

    schema defaults  <  method's default roles  <  base config(s)  <  YAML file  <  command-line overrides

The ``roles`` section is special: its defaults come from the method (``default_roles``), e.g. DMD2's
teacher is frozen while its critic trains, so a user's ``roles.critic.lr=...`` overrides the method's
critic rather than a blank ``RoleConfig``. The returned config lists every role fully resolved.

This module sits above ``methods/`` (it needs the method registry) and below the harness; the
method-free machinery (files, overrides, merging, error messages) is ``config/load.py``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepdistill.config.load import (
    DEFAULT_METHOD,
    format_error,
    load_with_bases,
    merge_checked,
    parse_overrides,
    resolve_config_path,
    to_object,
    valid_keys,
)
from stepdistill.config.schema import Config, RoleConfig
from stepdistill.methods import get_method

__all__ = ["load_config"]


def _method_name(*sources: DictConfig) -> Any:
    """``method.name`` from the last source that sets it (overrides before the file), default dmd2."""
    for src in sources:
        method = src.get("method") if isinstance(src, DictConfig) else None
        if isinstance(method, DictConfig) and "name" in method:
            return method["name"]
        if method is not None and not isinstance(method, DictConfig):
            raise ValueError(f"'method' must be a section with at least 'name:', got {method!r}")
    return DEFAULT_METHOD


def _pop_roles(src: DictConfig, origin: str) -> DictConfig:
    if "roles" not in src:
        return OmegaConf.create({})
    roles = src["roles"]
    del src["roles"]
    if roles is None:
        return OmegaConf.create({})
    if not isinstance(roles, DictConfig):
        raise ValueError(f"'roles' in {origin} must map role names to settings (e.g. roles.critic.lr: 1e-6), "
                         f"got {roles!r}")
    for name, value in roles.items():
        if value is not None and not isinstance(value, DictConfig):
            raise ValueError(f"roles.{name} in {origin} must be a section of role settings "
                             f"(keys: {', '.join(valid_keys(RoleConfig))}), got {value!r}")
    return roles


def _build_roles(method_cls: type, method_obj: Any, user_roles: list[tuple[DictConfig, str]]) -> dict:
    """Method default roles merged with the user's overrides, each checked against RoleConfig."""
    try:
        defaults = method_cls.default_roles(method_obj)
    except NotImplementedError:
        raise ValueError(f"method {method_cls.name!r} does not declare its roles (default_roles) yet") from None
    declared = list(defaults)
    for roles, origin in user_roles:
        for name in roles:
            if name not in defaults:
                close = difflib.get_close_matches(str(name), declared, n=1)
                hint = f" (did you mean roles.{close[0]}?)" if close else ""
                raise ValueError(f"unknown role roles.{name} in {origin}{hint}; method {method_cls.name!r} "
                                 f"has roles: {', '.join(declared)}")
    built = {}
    for name, default in defaults.items():
        if not isinstance(default, RoleConfig):
            raise TypeError(f"{method_cls.__name__}.default_roles() must return RoleConfig values, "
                            f"got {type(default).__name__} for {name!r}")
        node = OmegaConf.structured(default)
        for roles, origin in user_roles:
            if name in roles and roles[name] is not None:
                try:
                    node = OmegaConf.merge(node, roles[name])
                except OmegaConfBaseException as e:
                    raise format_error(e, origin, node, prefix=f"roles.{name}.") from None
        built[name] = node
    return built


def _check_roles(cfg: DictConfig, user_roles: list[tuple[DictConfig, str]]) -> None:
    """RoleConfig.__post_init__ checks, per role, so errors name the role (``roles.critic.lora_rank``)."""
    for name in cfg.roles:
        try:
            OmegaConf.to_object(cfg.roles[name])
        except OmegaConfBaseException as e:
            raise format_error(e, "roles") from None
        except (ValueError, TypeError) as e:
            where = ", ".join(o for r, o in user_roles if name in r) or "the method's default roles"
            raise ValueError(f"{str(e).replace('roles.*.', f'roles.{name}.')} ({where})") from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, merge, type-check and validate a run config. Raises ValueError on any user error.

    ``path`` is a YAML file or a bare config name (see ``resolve_config_path``); ``None`` builds the
    config from the overrides alone. The result is a typed DictConfig with interpolations resolved.
    """
    if path is not None:
        file = resolve_config_path(path)
        raw = load_with_bases(file)
        file_origin = f"config file {file}"
    else:
        raw = OmegaConf.create({})
        file_origin = "config"
    dot = parse_overrides(list(overrides))
    dot_origin = "command-line overrides"
    # Errors found after merging (dataclass checks) cannot tell which source set the value.
    if path is None:
        both_origin = dot_origin
    else:
        both_origin = f"{file_origin} + {dot_origin}" if overrides else file_origin

    name = _method_name(dot, raw)
    if not isinstance(name, str):
        raise ValueError(f"method.name must be a string, got {name!r}")
    method_cls = get_method(name)  # unknown name → ValueError listing the registered methods

    user_roles = [(_pop_roles(raw, file_origin), file_origin), (_pop_roles(dot, dot_origin), dot_origin)]

    # Typed schema: the base dataclasses, with `method` typed by the chosen method's Config.
    schema = OmegaConf.structured(Config())
    schema.method = OmegaConf.structured(method_cls.Config)
    cfg = merge_checked(schema, raw, file_origin)
    cfg = merge_checked(cfg, dot, dot_origin)

    method_obj = to_object(cfg.method, both_origin)
    cfg.roles = _build_roles(method_cls, method_obj, user_roles)

    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise format_error(e, both_origin) from None
    _check_roles(cfg, user_roles)
    # Full dataclass validation (every section's __post_init__, mandatory values).
    to_object(cfg, both_origin)
    return cfg
