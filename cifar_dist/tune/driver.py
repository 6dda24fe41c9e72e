"""Run a sweep: prepare data once, start (or join) Ray, run the Tuner, write the results."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cifar_dist.config.load import config_to_dict
from cifar_dist.config.schema import Config
from cifar_dist.tune import results, space, summary
from cifar_dist.tune.config import SweepConfig, SweepError
from cifar_dist.tune.trainable import TrialContext, run_distributed_trial, run_trial

# A distributed trial's Tune actor only waits on its Ray Train workers, so it holds no CPU
# (on a 2-CPU machine a 2-worker trial could not start otherwise). Ray refuses an empty
# request, so it reserves this much of the `memory` resource instead.
DRIVER_MEMORY_BYTES = 256 * 2**20
PBT_MIN_CHECKPOINTS = 4
EXPERIMENT = "ray"  # Tune's experiment directory inside the sweep directory

TrialFn = Callable[[dict[str, Any], TrialContext], None]


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[results.TrialRow]
    best: results.TrialRow | None
    best_yaml: Path | None
    csv: Path
    plots: list[Path]
    interrupted: bool = False
    """Stopped by a signal before every trial ended: `cifar-dist tune --resume` continues it."""
    wandb_dir: Path | None = None
    """The offline/online W&B summary run's directory (None when W&B is off)."""


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


def reuse_actors(sweep: SweepConfig, base: Config) -> bool:
    """Reuse a trial's process for the next trial (no torch import per trial) unless a trial may
    run DeepSpeed in it: DeepSpeed keeps process-wide state, one run per process
    (docs/deepspeed.md). Ray Train workers (trial.workers > 1) are fresh processes per trial."""
    spec = sweep.space.get("parallel.engine")
    deepspeed = base.parallel.engine == "deepspeed" or bool(spec and "deepspeed" in spec.values)
    return not (deepspeed and sweep.trial.workers == 1)


def checkpoints_kept(sweep: SweepConfig) -> int:
    """PBT restores a trial from another's checkpoint some time after choosing it, while that
    trial goes on training; with 1-2 kept it may be gone by then (Tune warns at <= 2)."""
    keep = sweep.trial.keep_checkpoints
    return max(keep, PBT_MIN_CHECKPOINTS) if sweep.scheduler == "pbt" else keep


def make_trainable(sweep: SweepConfig, ctx: TrialContext, trial_fn: TrialFn | None) -> Any:
    from ray import tune

    if sweep.trial.workers > 1:
        return tune.with_resources(
            tune.with_parameters(trial_fn or run_distributed_trial, ctx=ctx),
            {"memory": DRIVER_MEMORY_BYTES},
        )
    return tune.with_resources(
        tune.with_parameters(trial_fn or run_trial, ctx=ctx),
        {"cpu": sweep.trial.cpus_per_worker, "gpu": sweep.trial.gpus_per_worker},
    )


def build_tuner(
    sweep: SweepConfig,
    ctx: TrialContext,
    base: Config,
    sweep_dir: Path,
    trial_fn: TrialFn | None = None,
) -> Any:
    from ray import tune

    from cifar_dist.tune.ended import EndedTrials

    s = sweep.search
    return tune.Tuner(
        make_trainable(sweep, ctx, trial_fn),
        param_space=space.param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=space.search_algorithm(sweep),
            scheduler=space.scheduler(sweep, base.train.epochs),
            num_samples=space.num_samples(sweep),
            # concurrency: in the search algorithm (ConcurrencyLimiter / variant generator)
            trial_dirname_creator=_trial_dirname,
            reuse_actors=reuse_actors(sweep, base),
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=sweep.trial.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_kept(sweep)),
            callbacks=[EndedTrials(sweep_dir)],
            verbose=1,
        ),
    )


def _write_inputs(sweep: SweepConfig, base_tree: dict[str, Any], sweep_dir: Path) -> None:
    (sweep_dir / "sweep.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False)
    )
    (sweep_dir / "base_config.yaml").write_text(yaml.safe_dump(base_tree, sort_keys=False))


def _context(
    sweep: SweepConfig, base: Config, base_tree: dict[str, Any], sweep_dir: Path
) -> TrialContext:
    return TrialContext(
        base=base_tree,
        trials_dir=str(sweep_dir / "trials"),
        group=sweep.name,
        tags=[*base.log.wandb.tags, "sweep", sweep.search.algo],
        metric=sweep.search.metric,
        mode=sweep.search.mode,
        workers=sweep.trial.workers,
        cpus_per_worker=sweep.trial.cpus_per_worker,
        gpus_per_worker=sweep.trial.gpus_per_worker,
        train_storage=str(sweep_dir / "ray_train"),
        keep_checkpoints=sweep.trial.keep_checkpoints,
        pbt=sweep.scheduler == "pbt",
    )


@contextmanager
def _sigterm_stops_gracefully() -> Iterator[None]:
    """Tune stops a sweep gracefully (final experiment snapshot, resumable) on SIGINT/SIGUSR1;
    SIGTERM (Slurm pre-emption, `scancel`, docker stop) would kill it mid-write: forward it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run_tuner(sweep: SweepConfig, make: Callable[[], Any]) -> Any:
    # num_to_keep forces a state snapshot per checkpoint; Tune warns about that every few
    # seconds with trials this short. The snapshots are wanted (resumable sweeps), the warning not.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = _start_ray(sweep)
    try:
        with _sigterm_stops_gracefully():
            return make().fit()
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def run_sweep(
    sweep: SweepConfig,
    base: Config,
    sweep_file: Path | None,
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
    ctx = _context(sweep, base, base_tree, sweep_dir)
    grid = _run_tuner(sweep, lambda: build_tuner(sweep, ctx, base, sweep_dir, trial_fn))
    return write_results(grid, sweep, base, base_tree, sweep_dir)


def resume_sweep(
    sweep_dir: Path, trial_fn: TrialFn | None = None, overrides: list[str] | None = None
) -> tuple[SweepConfig, SweepOutcome]:
    """Continue an interrupted sweep from <sweep_dir>/ray (Tune's experiment state): finished
    trials are kept, unfinished and errored ones continue from their last checkpoints, trials
    not yet started start. The sweep and base config are the ones the sweep was started with;
    `overrides` may change only where Ray runs (`--ray.address=...`: a requeued Slurm job's new
    cluster)."""
    from cifar_dist.config.load import load_config, merge_trees, parse_overrides, read_yaml
    from cifar_dist.tune.load import _normalise, build_sweep

    sweep_dir = sweep_dir.expanduser().resolve()
    for name in ("sweep.yaml", "base_config.yaml"):
        if not (sweep_dir / name).is_file():
            raise SweepError(f"{sweep_dir}: no {name}; --resume takes a sweep directory")
    over = parse_overrides(overrides or [])
    if set(over) - {"ray"}:
        raise SweepError(
            f"--resume: only ray.* may change; the rest is fixed by {sweep_dir / 'sweep.yaml'}"
        )
    sweep = build_sweep(merge_trees(_normalise(read_yaml(sweep_dir / "sweep.yaml")), over))
    _require_ray(sweep)
    base_tree = read_yaml(sweep_dir / "base_config.yaml")
    base = load_config(None, base_tree)
    ctx = _context(sweep, base, base_tree, sweep_dir)

    def restore() -> Any:
        from ray import tune

        path = str(sweep_dir / EXPERIMENT)
        if not tune.Tuner.can_restore(path):
            raise SweepError(f"{path}: no Ray Tune experiment state to resume from")
        return tune.Tuner.restore(
            path,
            trainable=make_trainable(sweep, ctx, trial_fn),
            resume_unfinished=True,
            resume_errored=True,  # from their last checkpoints (restart_errored: from scratch)
        )

    grid = _run_tuner(sweep, restore)
    return sweep, write_results(grid, sweep, base, base_tree, sweep_dir)


def write_results(
    grid: Any, sweep: SweepConfig, base: Config, base_tree: dict[str, Any], sweep_dir: Path
) -> SweepOutcome:
    rows = [results.row_from_result(r, sweep, base, sweep_dir / "trials") for r in grid]
    from cifar_dist.tune.ended import ended_trials

    # Tune returns normally after a SIGINT/SIGUSR1 stop (tune/ended.py tells the trials apart).
    ended = ended_trials(sweep_dir)
    for row in rows:
        if row.trial_id not in ended:
            row.status = "unfinished"
    interrupted = len(rows) < space.num_trials(sweep) or any(r.status == "unfinished" for r in rows)
    # Trial ids end in a creation counter (<experiment>_00003): the x axis of "best so far".
    rows.sort(key=lambda r: r.trial_id)
    csv_path = sweep_dir / "sweep_results.csv"
    results.write_csv(rows, sweep, csv_path)
    plots = results.plot_all(rows, sweep, sweep_dir)
    best = results.best_row(rows, sweep.search.mode)
    best_yaml = None
    if best is not None:
        best_yaml = sweep_dir / "best_config.yaml"
        results.write_best_yaml(results.best_config(base_tree, best), best, sweep, best_yaml)
    outcome = SweepOutcome(sweep_dir, rows, best, best_yaml, csv_path, plots, interrupted)
    outcome.wandb_dir = summary.log_summary_run(outcome, sweep, base)
    return outcome
