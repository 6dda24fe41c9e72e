"""Run a sweep: prepare data once, start (or join) Ray, run the Tuner, write the results."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cifar_dist.config.load import config_to_dict
from cifar_dist.config.schema import Config
from cifar_dist.tune import results, space
from cifar_dist.tune.config import SweepConfig, SweepError
from cifar_dist.tune.trainable import TrialContext, run_distributed_trial, run_trial

# A distributed trial's Tune actor only waits on its Ray Train workers, so it holds no CPU
# (on a 2-CPU machine a 2-worker trial could not start otherwise). Ray refuses an empty
# request, so it reserves this much of the `memory` resource instead.
DRIVER_MEMORY_BYTES = 256 * 2**20

TrialFn = Callable[[dict[str, Any], TrialContext], None]


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[results.TrialRow]
    best: results.TrialRow | None
    best_yaml: Path | None
    csv: Path
    plots: list[Path]


def sweep_dir_for(sweep: SweepConfig, sweep_file: Path | None) -> Path:
    name = (
        sweep.name or f"{sweep_file.stem if sweep_file else 'sweep'}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    return (Path(sweep.dir).expanduser() / name).resolve()


def prepare_base(base: Config) -> dict[str, Any]:
    """The run config every trial starts from, with absolute paths (Tune runs each trial in its
    own working directory, maybe on another node) and the data store built once here rather
    than raced by concurrent trials."""
    from cifar_dist.data import prepare_store, resolve_data_dir
    from cifar_dist.train.fit import ensure_synthetic

    data = dataclasses.replace(base.data, dir=str(resolve_data_dir(base.data).resolve()))
    if data.source:
        data = dataclasses.replace(data, source=str(Path(data.source).expanduser().resolve()))
    resolved = dataclasses.replace(base, data=data)
    ensure_synthetic(resolved)
    prepare_store(resolved.data)
    return config_to_dict(resolved)


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _require_ray(sweep: SweepConfig) -> None:
    try:
        import ray.tune  # noqa: F401

        if sweep.trial.workers > 1:
            import ray.train.torch  # noqa: F401
        if sweep.search.algo == "bayes":
            import optuna  # noqa: F401
    except ImportError as e:
        raise SweepError(f"{e}; install the sweep extra: pip install 'cifar-dist[tune]'") from None


def _start_ray(sweep: SweepConfig) -> bool:
    """Start or join Ray unless this process already has; True when we must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if sweep.ray.address:
        ray.init(address=sweep.ray.address)
    else:
        ray.init(
            num_cpus=sweep.ray.num_cpus or None,
            num_gpus=None if sweep.ray.num_gpus < 0 else sweep.ray.num_gpus,
            include_dashboard=False,
        )
    return True


def build_tuner(
    sweep: SweepConfig,
    ctx: TrialContext,
    epochs: int,
    sweep_dir: Path,
    trial_fn: TrialFn | None = None,
) -> Any:
    from ray import tune

    if sweep.trial.workers > 1:
        trainable = tune.with_resources(
            tune.with_parameters(trial_fn or run_distributed_trial, ctx=ctx),
            {"memory": DRIVER_MEMORY_BYTES},
        )
    else:
        trainable = tune.with_resources(
            tune.with_parameters(trial_fn or run_trial, ctx=ctx),
            {"cpu": sweep.trial.cpus_per_worker, "gpu": sweep.trial.gpus_per_worker},
        )
    s = sweep.search
    return tune.Tuner(
        trainable,
        param_space=space.param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=space.search_algorithm(sweep),
            scheduler=space.scheduler(sweep, epochs),
            num_samples=space.num_samples(sweep),
            # concurrency: in the search algorithm (ConcurrencyLimiter / variant generator)
            trial_dirname_creator=_trial_dirname,
            reuse_actors=True,  # trials share a process: no torch import per trial
        ),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=sweep.trial.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.trial.keep_checkpoints),
            verbose=1,
        ),
    )


def _write_inputs(sweep: SweepConfig, base_tree: dict[str, Any], sweep_dir: Path) -> None:
    (sweep_dir / "sweep.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False)
    )
    (sweep_dir / "base_config.yaml").write_text(yaml.safe_dump(base_tree, sort_keys=False))


def run_sweep(
    sweep: SweepConfig,
    base: Config,
    sweep_file: Path | None = None,
    trial_fn: TrialFn | None = None,
) -> SweepOutcome:
    """Run the sweep and write its results. `trial_fn` replaces the per-trial function (same
    signature as run_trial / run_distributed_trial), e.g. to wrap it with extra behaviour."""
    _require_ray(sweep)
    sweep_dir = sweep_dir_for(sweep, sweep_file)
    sweep = dataclasses.replace(sweep, name=sweep_dir.name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base_tree = prepare_base(base)
    _write_inputs(sweep, base_tree, sweep_dir)
    trials_dir = sweep_dir / "trials"
    ctx = TrialContext(
        base=base_tree,
        trials_dir=str(trials_dir),
        group=sweep.name,
        tags=[*base.log.wandb.tags, "sweep", sweep.search.algo],
        metric=sweep.search.metric,
        mode=sweep.search.mode,
        workers=sweep.trial.workers,
        cpus_per_worker=sweep.trial.cpus_per_worker,
        gpus_per_worker=sweep.trial.gpus_per_worker,
        train_storage=str(sweep_dir / "ray_train"),
        keep_checkpoints=sweep.trial.keep_checkpoints,
    )
    # num_to_keep forces a state snapshot per checkpoint; Tune warns about that every few
    # seconds with trials this short. The snapshots are wanted (resumable sweeps), the warning not.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = _start_ray(sweep)
    try:
        grid = build_tuner(sweep, ctx, base.train.epochs, sweep_dir, trial_fn).fit()
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    return write_results(grid, sweep, base, base_tree, sweep_dir)


def write_results(
    grid: Any, sweep: SweepConfig, base: Config, base_tree: dict[str, Any], sweep_dir: Path
) -> SweepOutcome:
    # ResultGrid lists trials in creation order: the x axis of "best so far vs trial".
    rows = [results.row_from_result(r, sweep, base, sweep_dir / "trials") for r in grid]
    csv_path = sweep_dir / "sweep_results.csv"
    results.write_csv(rows, sweep, csv_path)
    plots = results.plot_all(rows, sweep, sweep_dir)
    best = results.best_row(rows, sweep.search.mode)
    best_yaml = None
    if best is not None:
        best_yaml = sweep_dir / "best_config.yaml"
        results.write_best_yaml(results.best_config(base_tree, best), best, sweep, best_yaml)
    return SweepOutcome(sweep_dir, rows, best, best_yaml, csv_path, plots)


def _shown(path: Path) -> str:
    """Relative to the current directory when inside it: shorter lines, copy-pasteable."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe(outcome: SweepOutcome, sweep: SweepConfig) -> str:
    """The lines `cifar-dist tune` prints at the end."""
    metric = sweep.search.metric
    lines = [f"sweep {outcome.sweep_dir.name}: {len(outcome.rows)} trials"]
    for r in outcome.rows:
        vals = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        note = f"  ({r.error})" if r.error else ""
        lines.append(
            f"  {r.trial_id} {r.status:9s} {metric}={r.value:.4g} epochs={r.epochs} {vals}{note}"
        )
    lines.append(f"results: {_shown(outcome.csv)}")
    if outcome.best is not None and outcome.best_yaml is not None:
        lines.append(f"best: {outcome.best.trial_id} {metric}={outcome.best.value:.4g}")
        best = _shown(outcome.best_yaml)
        lines.append(f"best config: {best} (cifar-dist train -c {best})")
    offline = [p for r in outcome.rows for p in Path(r.run_dir).glob("wandb/offline-run-*")]
    if offline:
        lines.append(
            f"wandb: {len(offline)} offline runs (group {outcome.sweep_dir.name}); upload with: "
            f"wandb sync {_shown(outcome.sweep_dir)}/trials/*/wandb/offline-run-*"
        )
    return "\n".join(lines)
