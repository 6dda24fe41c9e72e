"""`base:` inheritance of run-config YAML files: a file names the file it starts from.

    # configs/ds_zero3.yaml
    base: ds_zero2.yaml      # relative to this file's directory (else the current directory)
    deepspeed:
      zero_stage: 3

The including file's keys are merged over its base's (nested sections key by key; lists and
scalars replace). Bases may have bases; a cycle stops with one ConfigError line naming the chain.
Sweep files use the same path rule for their `base` (the run config they start from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar_dist.config.schema import ConfigError

BASE_KEY = "base"


def resolve_relative(name: str, including: Path | None) -> Path:
    """`name` relative to the including file's directory (like an include), else to the cwd."""
    p = Path(name).expanduser()
    if p.is_absolute() or including is None:
        return p
    beside = including.parent / p
    return beside if beside.is_file() else p


def read_config_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML tree of a run config with its `base:` chain merged in (the file wins)."""
    from cifar_dist.config.load import merge_trees, read_yaml

    here = Path(path)
    key = here.resolve()
    if key in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, key))
        raise ConfigError(f"config file {here}: base: inheritance cycle ({cycle})")
    tree = read_yaml(here)
    base = tree.pop(BASE_KEY, None)
    if base is None or base == "":
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {here}: base: expected a file name, got {base!r}")
    base_path = resolve_relative(base, here)
    if not base_path.is_file():
        raise ConfigError(f"config file {here}: base: {base} not found")
    return merge_trees(read_config_tree(base_path, (*_chain, key)), tree)
