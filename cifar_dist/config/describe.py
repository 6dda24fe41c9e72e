"""Every config key with its type, default and docstring, read from the schema dataclasses.

The field docstrings (a string literal right after each field, as in schema.py) are not kept by
Python at run time, so they are read from the source with `ast`; the types and defaults come from
the dataclasses themselves. `cifar-dist train --help` and `tune --help` print this list.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class KeyDoc:
    key: str
    """Dotted key, as on the command line (`optim.lr`)."""
    type: str
    default: Any
    doc: str


@cache
def _module_docs(module_name: str) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} for every class in a module's source."""
    tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    out: dict[str, dict[str, str]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        for field, nxt in zip(node.body, node.body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[field.target.id] = inspect.cleandoc(nxt.value.value)
        out[node.name] = docs
    return out


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a dataclass ('' where a field has none)."""
    return _module_docs(cls.__module__).get(cls.__name__, {})


def type_name(hint: Any) -> str:
    """A short readable type: float, int|auto, sgd|adamw|muon, list[float]."""
    origin = get_origin(hint)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return "|".join(type_name(a) for a in get_args(hint))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(hint))}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """One KeyDoc per leaf field of dataclass `cls`, nested sections flattened to dotted keys."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(describe_keys(hint, f"{key}."))
        else:
            out.append(KeyDoc(key, type_name(hint), _default(f), docs.get(f.name, "")))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def format_keys(keys: list[KeyDoc], width: int = 100) -> str:
    """optim.lr: float = 0.1
    Peak learning rate at `base_batch_size` ..."""
    lines: list[str] = []
    for k in keys:
        lines.append(f"  --{k.key}  ({k.type}, default {_shown(k.default)})")
        doc = " ".join(k.doc.split())
        if doc:
            lines.extend(
                textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(lines)


RUN_HEAD = (
    "config keys: YAML sections, or --section.key=value on the command line\n"
    "(defaults < YAML file and its `base:` chain < command line):"
)


def run_config_help(head: str = RUN_HEAD) -> str:
    """The `train --help` epilog: every run-config key."""
    from cifar_dist.config.schema import Config

    return head + "\n" + format_keys(describe_keys(Config))


def sweep_help() -> str:
    """The `tune --help` epilog: every sweep-file key, then every run-config key."""
    from cifar_dist.tune.config import ParamSpec, SweepConfig

    keys = [k for k in describe_keys(SweepConfig) if k.key != "space"]
    space = describe_keys(ParamSpec, "space.<run-config key>.")
    return (
        "sweep file keys (or --section.key=value on the command line):\n"
        + format_keys(keys + space)
        + "\n\n"
        + run_config_help("run config keys (--section.key=value: a fixed value for every trial):")
    )
