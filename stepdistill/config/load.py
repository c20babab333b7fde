"""Config machinery: YAML files (+ ``base:`` inheritance), ``key=value`` overrides, merging onto the
schema dataclasses and the one-line errors, all without knowing any method.

``stepdistill.runconfig.load_config`` composes these with the method registry (the ``method`` section
is typed by the chosen method's own ``Config``, the ``roles`` come from its ``default_roles``). That
function lives above ``methods/`` because it needs the registry; this module is the floor and imports
nothing else of the package but the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from stepdistill.config.schema import Config

__all__ = [
    "CONFIGS_DIR",
    "configs_dir",
    "list_configs",
    "resolve_config_path",
    "parse_overrides",
    "load_with_bases",
    "merge_checked",
    "to_object",
    "to_dataclass",
    "validate_out_dir",
]

logger = logging.getLogger("stepdistill")

# The configs/ folder of the repository (stepdistill/config/load.py → <repo>/configs).
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
_YAML_SUFFIXES = (".yaml", ".yml")
DEFAULT_METHOD = "dmd2"
_BASE_KEY = "base"


def configs_dir() -> Path:
    """The folder bare config names are looked up in: ``$STEPDISTILL_CONFIGS`` or ``<repo>/configs``."""
    env = os.environ.get("STEPDISTILL_CONFIGS")
    return Path(env).expanduser() if env else CONFIGS_DIR


def list_configs(root: Path | None = None) -> list[str]:
    """Names of every config under ``root`` (default: the configs dir), e.g. ``dmd2_sdxl``, ``tests/tiny_dmd2``."""
    root = configs_dir() if root is None else root
    if not root.is_dir():
        return []
    names = {p.relative_to(root).with_suffix("").as_posix() for s in _YAML_SUFFIXES for p in root.rglob(f"*{s}")}
    return sorted(names)


def _strip_yaml_suffix(name: str) -> str:
    for suffix in _YAML_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_config_path(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Find a config file from a path or a bare name.

    Tried in order: ``path`` as given (and relative to ``relative_to``, used for ``base:`` of a file);
    ``<configs>/<path>`` (so ``configs/tests/x.yaml`` works from any working directory);
    ``<configs>/<name>.yaml`` / ``.yml``; finally ``<configs>/**/<name>.yaml`` when exactly one matches.
    """
    raw = str(path)
    given = Path(raw).expanduser()
    root = configs_dir()
    candidates = [given]
    if relative_to is not None and not given.is_absolute():
        candidates.insert(0, relative_to / given)
    if not given.is_absolute():
        candidates.append(root / given)
        # "configs/x.yaml" written relative to the repository root.
        candidates.append(root.parent / given)
        stem = _strip_yaml_suffix(raw)
        candidates.extend(root / f"{stem}{suffix}" for suffix in _YAML_SUFFIXES)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.is_dir() and candidate == given:
            raise ValueError(f"config {raw!r} is a directory; give a YAML file or a config name")

    # A bare name anywhere below configs/ (e.g. "tiny_dmd2" → configs/tests/tiny_dmd2.yaml).
    name = Path(_strip_yaml_suffix(raw)).name
    matches = sorted({p for s in _YAML_SUFFIXES for p in root.rglob(f"{name}{s}")}) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        listed = ", ".join(str(m.relative_to(root)) for m in matches)
        raise ValueError(f"config name {raw!r} is ambiguous in {root}: {listed}; give the path instead")

    known = list_configs(root)
    near = difflib.get_close_matches(_strip_yaml_suffix(raw), known, n=5, cutoff=0.4)
    near += [k for k in difflib.get_close_matches(name, [Path(k).name for k in known], n=5, cutoff=0.4)
             if k not in near]
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    available = ", ".join(known) if known else "(none)"
    raise ValueError(
        f"config {raw!r} not found: no such file, and no config of that name in {root}.{hint}"
        f" Available configs: {available}"
    )


# ---------------------------------------------------------------------------------------------------
# YAML loading with ``base:`` inheritance
# ---------------------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, not a parser traceback
        raise ValueError(f"could not parse config file {path}: {e}") from None
    if not isinstance(loaded, DictConfig):  # an empty file loads as {}
        raise ValueError(f"config file {path} must hold a mapping of sections (run:, model:, ...), "
                         f"not a {type(loaded).__name__}")
    # An empty section (`train:` or `roles: {critic: }` with nothing under it) sets nothing; left as
    # null it would wipe the same section of a `base:` config in the merge.
    for key in [k for k in loaded if loaded._get_node(k)._is_none()]:
        del loaded[key]
    if isinstance(loaded.get("roles"), DictConfig):
        for name in [k for k in loaded.roles if loaded.roles._get_node(k)._is_none()]:
            del loaded.roles[name]
    return loaded


def load_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """The file's content merged on top of its ``base:`` config (recursively). ``base`` is removed."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ValueError(f"config inheritance cycle through 'base:': {cycle}")
    data = _load_yaml(path)
    if _BASE_KEY not in data:
        return data
    base_name = data[_BASE_KEY]
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{path}: 'base:' must be the name or path of another config, got {base_name!r}")
    try:
        base_path = resolve_config_path(base_name, relative_to=path.parent)
    except ValueError as e:
        raise ValueError(f"{path}: base: {e}") from None
    base = load_with_bases(base_path, (*chain, path))
    del data[_BASE_KEY]
    return OmegaConf.merge(base, data)  # untyped merge; the schema checks the result


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``["train.max_steps=7", "roles.critic.lr=1e-6"]`` → a DictConfig (values parsed as YAML)."""
    merged = OmegaConf.create({})
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith("-") or " " in key:
            raise ValueError(
                f"override {item!r} is not of the form key=value (e.g. train.max_steps=100, "
                f"roles.critic.lr=1e-6, run.trackers=[none])"
            )
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ValueError(f"could not parse override {item!r}: {_first_line(e)}") from None
    return merged


# ---------------------------------------------------------------------------------------------------
# Error formatting
# ---------------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _type_name(tp: Any) -> str:
    """A readable name for a dataclass field type: int, float, 'list of float', 'str or null'."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in inner)
        return f"{name} or null" if len(inner) < len(args) else name
    if origin in (list, tuple, Sequence):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}" if len(args) == 2 else "mapping"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"a section ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _field_type(cls: Any, key: str) -> Any | None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    try:
        return typing.get_type_hints(cls).get(key)
    except Exception:  # unresolvable forward references: fall back to the omegaconf message
        return None


def _list_field_of(cls: Any, item_type: Any, prefix: str = "") -> str | None:
    """Dotted name of the list field of dataclass ``cls`` whose entries are ``item_type`` dataclasses."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or item_type is None:
        return None
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return None
    for name, hint in hints.items():
        if typing.get_origin(hint) is list and typing.get_args(hint) == (item_type,):
            return prefix + name
        found = _list_field_of(hint, item_type, f"{prefix}{name}.")
        if found:
            return found
    return None


def valid_keys(cls: Any) -> list[str]:
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []


def format_error(
    e: OmegaConfBaseException, origin: str, schema: DictConfig | None = None, prefix: str = ""
) -> ValueError:
    """One readable ValueError from an omegaconf exception: key, value, source and the fix.

    ``schema`` is the node the failing merge targeted (to look up list element types); ``prefix`` is
    prepended to the reported key when that node is not the root (e.g. ``roles.critic.``).
    """
    rel_key = getattr(e, "full_key", None) or ""
    full_key = prefix + rel_key
    object_type = getattr(e, "object_type", None)
    key = getattr(e, "key", None)
    if isinstance(e, ConfigKeyError) and rel_key:
        valid = valid_keys(object_type)
        section = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        owner = _list_field_of(Config, object_type)
        if owner and "." not in full_key:  # omegaconf names keys inside list entries from the entry only
            section, full_key = f"{owner}[]", f"{owner}[].{rel_key}"
        where = f"valid keys of {section}" if section else "valid top-level sections"
        valid_txt = f"; {where}: {', '.join(valid)}" if valid else ""
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
        return ValueError(f"unknown config key {full_key!r} in {origin}{hint}{valid_txt}")
    if isinstance(e, MissingMandatoryValue) and rel_key:
        return ValueError(f"{full_key} is required but not set ({origin}); set it in the config file or "
                          f"pass {full_key}=...")
    if isinstance(e, InterpolationResolutionError):
        return ValueError(f"could not resolve an interpolation in {full_key or 'the config'} ({origin}): "
                          f"{_first_line(e)}")
    if isinstance(e, ValidationError) and rel_key:
        expected = _field_type(object_type, str(key)) if key is not None else None
        if expected is None and schema is not None:
            expected = _list_item_type(schema, rel_key)
        value = _bad_value(e)
        want = f"expected {_type_name(expected)}" if expected is not None else _first_line(e)
        shown = f"={value}" if value is not None else ""
        return ValueError(f"invalid value {full_key}{shown} in {origin}: {want}")
    where = f" [key: {full_key}]" if rel_key else ""
    return ValueError(f"invalid config ({origin}): {_first_line(e)}{where}")


def _list_item_type(schema: DictConfig, key: str) -> Any | None:
    """For list items (``train.sample_prompts[0]``): the element type of the declared list field."""
    if "[" not in key:
        return None
    parent_key = key.split("[", 1)[0]
    owner_path, _, field_name = parent_key.rpartition(".")
    owner = OmegaConf.select(schema, owner_path) if owner_path else schema
    tp = _field_type(OmegaConf.get_type(owner), field_name) if isinstance(owner, DictConfig) else None
    args = typing.get_args(tp) if tp is not None else ()
    return args[0] if args else None


def _bad_value(e: OmegaConfBaseException) -> str | None:
    msg = str(e)
    if msg.startswith("Value '"):
        # "Value 'abc' of type 'str' could not be converted to Integer"
        return repr(msg[len("Value '"):].split("' of type", 1)[0])
    return None


# ---------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------


def _check_sections(target: DictConfig, src: DictConfig, origin: str, prefix: str = "") -> None:
    """Where the schema has a section: drop an empty one (``train:`` with nothing under it) and reject
    a scalar or list (``train=5``) with the section's keys. Recurses into nested sections."""
    for key in list(src):
        node = target._get_node(key) if key in target else None
        if not isinstance(node, DictConfig) or node._is_none():
            continue
        value = src._get_node(key)
        if isinstance(value, DictConfig) and not value._is_none():
            _check_sections(node, value, origin, f"{prefix}{key}.")
        elif value._is_none():
            del src[key]
        else:
            cls = OmegaConf.get_type(node)
            keys = valid_keys(cls) or [str(k) for k in node]
            raise ValueError(f"{prefix}{key} in {origin} must be a section with keys "
                             f"({', '.join(keys)}), got {OmegaConf.to_container(src)[key]!r}")


def merge_checked(target: DictConfig, src: DictConfig, origin: str) -> DictConfig:
    _check_sections(target, src, origin)
    try:
        return OmegaConf.merge(target, src)
    except OmegaConfBaseException as e:
        raise format_error(e, origin, target) from None


def to_object(node: Any, origin: str) -> Any:
    """Instantiate dataclasses (runs their ``__post_init__`` checks), errors as one ValueError."""
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise format_error(e, origin) from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{e} ({origin})") from None


def to_dataclass(cfg: DictConfig) -> Config:
    """The typed ``Config`` object (dataclasses all the way down; ``method`` is the method's Config)."""
    return to_object(cfg, "config")


def validate_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder a command can create or write: not a file, not below a file, writable (a probe)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is an existing file, not a folder; give a folder path")
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {existing} is a file, so no folder can be made below it; give "
                         "another folder path")
    probe = existing / f".tmp-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r} is not writable ({e.strerror} at {existing}); give a folder you "
                         "can write") from None
    return out
