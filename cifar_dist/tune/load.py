"""Read a sweep file (+ CLI overrides) into a SweepConfig checked against the run config.

`cifar-dist tune -c SWEEP [--search.num_samples=16] [--data.dir=/data]`: an override whose first
part is a run-config section (data, model, optim, ...) goes to `run`, the rest to the sweep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_type_hints

from cifar_dist.config.inherit import resolve_relative
from cifar_dist.config.load import (
    _build,  # the run config's strict dataclass builder: same types, same messages
    _coerce,
    load_config,
    merge_trees,
    parse_overrides,
    read_yaml,
)
from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.tune.config import ParamSpec, SweepConfig, sections

RUN_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
SPEC_KEYS = {f.name for f in dataclasses.fields(ParamSpec)}


def flatten(tree: dict[str, Any], prefix: str = "", stop: set[str] | None = None) -> dict[str, Any]:
    """{'train': {'epochs': 3}, 'optim.lr': 1} -> {'train.epochs': 3, 'optim.lr': 1}.

    With `stop`, a mapping that has any of those keys is a leaf (a ParamSpec), not a section.
    """
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and not (stop and stop & set(v)):
            out.update(flatten(v, key, stop))
        else:
            out[key] = v
    return out


def _normalise(tree: dict[str, Any]) -> dict[str, Any]:
    """Flatten `run` and `space` so YAML (dotted keys) and CLI (nested) forms merge per key."""
    tree = dict(tree)
    for name, stop in (("run", None), ("space", SPEC_KEYS)):
        part = tree.get(name) or {}
        if not isinstance(part, dict):
            raise ConfigError(f"{name}: expected a mapping, got {part!r}")
        tree[name] = flatten(part, stop=stop)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = merge_trees(base, {k: v for k, v in over.items() if k not in ("run", "space")})
    out["run"] = {**base["run"], **over["run"]}
    space = dict(base["space"])
    for k, v in over["space"].items():
        old = space.get(k)
        space[k] = {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v
    out["space"] = space
    return out


def split_overrides(args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLI overrides -> (sweep tree, run tree)."""
    tree = parse_overrides(args)
    run = {k: v for k, v in tree.items() if k in RUN_SECTIONS}
    sweep = {k: v for k, v in tree.items() if k not in RUN_SECTIONS}
    sweep["run"] = merge_trees(sweep.get("run") or {}, run)
    return sweep, run


def build_sweep(tree: dict[str, Any]) -> SweepConfig:
    """A normalised tree -> SweepConfig (strict: unknown keys and wrong types name the key)."""
    known = sections()
    for k in tree:
        if k not in known:
            raise ConfigError(f"{k}: unknown key (known: {', '.join(sorted(known))})")
    hints = get_type_hints(SweepConfig)
    kwargs: dict[str, Any] = {}
    for name in known:
        if name not in tree:
            continue
        value = tree[name]
        if name == "run":
            kwargs[name] = dict(value)
        elif name == "space":
            kwargs[name] = {
                k: _build(ParamSpec, v if isinstance(v, dict) else {"values": v}, f"space.{k}")
                for k, v in value.items()
            }
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, name)
        else:
            kwargs[name] = _coerce(value, hints[name], name)
    return SweepConfig(**kwargs)


def resolve_base(base: str, sweep_file: Path | None) -> Path | None:
    """`base` relative to the sweep file's directory (like an include), else to the cwd."""
    return resolve_relative(base, sweep_file) if base else None


def check_against_run_config(sweep: SweepConfig, base_path: Path | None) -> Config:
    """The base config with `run` applied (returned), and every searched value accepted by it."""
    try:
        base = load_config(base_path, dict(sweep.run))
    except ConfigError as e:
        raise ConfigError(f"run: {e}") from None
    fields = set(flatten(dataclasses.asdict(base)))
    for key, spec in sweep.space.items():
        if key not in fields:
            raise ConfigError(f"space.{key}: not a run-config key (e.g. optim.lr, data.batch_size)")
        for value in spec.endpoints():
            try:
                load_config(base_path, {**sweep.run, key: value})
            except ConfigError as e:
                raise ConfigError(f"space.{key}: {value!r} is refused ({e})") from None
    if sweep.scheduler == "pbt":
        _check_pbt_base(sweep, base)
    if base.train.device == "cuda" and sweep.trial.gpus_per_worker == 0:
        raise ConfigError("trial.gpus_per_worker: 0, but the run config asks for train.device=cuda")
    if sweep.search.metric.startswith("val_"):
        if base.data.val_size <= 0:
            raise ConfigError(f"search.metric: {sweep.search.metric} needs data.val_size > 0")
        if base.train.eval_every != 1:  # Tune wants the metric in every per-epoch report
            raise ConfigError(
                f"train.eval_every: must be 1 when search.metric is {sweep.search.metric}"
            )
    return base


def _check_pbt_base(sweep: SweepConfig, base: Config) -> None:
    """PBT changes optim.lr between epochs itself, on top of the trial's LR schedule: only a
    constant schedule (after a warmup that ends before the first exploit) leaves it in charge."""
    if base.schedule.name != "constant":
        raise ConfigError(
            f"schedule.name: {base.schedule.name}; search.scheduler=pbt needs constant "
            "(PBT itself changes optim.lr between epochs)"
        )
    first = max(sweep.pbt.interval, sweep.pbt.burn_in)
    if base.schedule.warmup_epochs > first:
        raise ConfigError(
            f"schedule.warmup_epochs: must end before PBT's first exploit (epoch {first})"
        )


def load_sweep(
    path: str | Path | None, overrides: list[str] | None = None
) -> tuple[SweepConfig, Config, Path | None]:
    """(sweep, its base run config with `run` applied, the base config's path)."""
    sweep_file = Path(path) if path else None
    tree = _normalise(read_yaml(sweep_file) if sweep_file else {})
    if overrides:
        over, _ = split_overrides(overrides)
        tree = _merge(tree, _normalise(over))
    sweep = build_sweep(tree)
    base_path = resolve_base(sweep.base, sweep_file)
    if base_path is not None and not base_path.is_file():
        raise ConfigError(f"base: run config {sweep.base} not found")
    return sweep, check_against_run_config(sweep, base_path), base_path
