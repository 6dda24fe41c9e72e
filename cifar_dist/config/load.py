"""Build a Config from defaults < YAML file < dotted CLI overrides, with strict type checks."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from cifar_dist.config.extras import check_extras
from cifar_dist.config.schema import Config, ConfigError


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return `value` checked (and minimally coerced: int -> float) against a type hint."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a (possibly partial) nested dict."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, values[name] or {}, key)
        else:
            kwargs[name] = _coerce(values[name], hint, key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # should not happen after the checks above
        raise ConfigError(f"{prefix}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--optim.lr=0.1', '--train.amp', 'bf16'] -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"{arg}: expected --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            key, raw = body, "true"
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
        i += 1
    return tree


def merge_trees(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """defaults < YAML at `path` (with its `base:` chain) < overrides (CLI strings or a
    nested/dotted dict)."""
    from cifar_dist.config.inherit import read_config_tree

    tree: dict[str, Any] = read_config_tree(path) if path else {}
    if isinstance(overrides, list):
        tree = merge_trees(tree, parse_overrides(overrides))
    elif overrides:
        for k, v in overrides.items():
            if isinstance(v, dict):
                tree = merge_trees(tree, {k: v})
            else:
                nested: dict[str, Any] = {}
                _set_dotted(nested, k, v)
                tree = merge_trees(tree, nested)
    cfg = _build(Config, tree, "")
    check_model_name(cfg)
    check_extras(cfg)
    return cfg


def check_model_name(cfg: Config) -> None:
    """An unknown model.name fails here, before any data is prepared, naming the valid ones."""
    from cifar_dist.models import list_models  # importing the zoo registers every model

    if cfg.model.name not in list_models():
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r} (known: {', '.join(list_models())})"
        )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, "")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
]
