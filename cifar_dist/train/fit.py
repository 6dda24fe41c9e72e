"""fit(cfg) -> metrics: the one entry point the CLI, the tests and the sweeps call."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cifar_dist.config.load import config_to_dict, dump_config
from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.logging.sinks import MultiSink, Sink, build_sinks
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.parallel.report import finish_report, start_report
from cifar_dist.train.backends import backend_for
from cifar_dist.train.common import Preempted, build_model, micro_batch_size, resolve_amp
from cifar_dist.train.preemption import clear_markers, write_markers
from cifar_dist.train.trainer import Trainer
from cifar_dist.utils.dist import (
    DistInfo,
    barrier,
    broadcast_object,
    distributed_session,
    get_rank,
)
from cifar_dist.utils.faults import maybe_inject_fault
from cifar_dist.utils.gitinfo import git_sha
from cifar_dist.utils.seed import seed_everything


def resolve_run_dir(cfg: Config) -> Path:
    """<log.dir>/<log.name>; rank 0 picks a timestamped name when none is given and shares it."""
    name = cfg.log.name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.name}"
    name = str(broadcast_object(name))
    return Path(cfg.log.dir) / name


def ensure_synthetic(cfg: Config) -> None:
    """data.synthetic > 0: write canonical-format synthetic files if the data dir has no dataset."""
    if cfg.data.synthetic <= 0:
        return
    from cifar_dist.data import resolve_data_dir, write_synthetic
    from cifar_dist.data.cifar import canonical_dir

    root = resolve_data_dir(cfg.data)
    # Rank 0 alone looks and writes; every rank waits at the barrier. (A rank that looked for
    # itself could see rank 0's half-written directory, skip the barrier and read missing files.)
    have = (root / cfg.data.dataset).exists() or canonical_dir(root, cfg.data.dataset).exists()
    if get_rank() == 0 and not have:
        n = cfg.data.synthetic
        try:
            write_synthetic(
                root, cfg.data.dataset, n_train=n, n_test=max(n // 5, 1), seed=cfg.data.split_seed
            )
        except OSError as e:
            from cifar_dist.data.errors import DataError

            raise DataError(f"data.dir {root}: cannot write synthetic data there ({e})") from None
    barrier()


def build_data(
    cfg: Config, dp_rank: int, dp: int, device: torch.device | None = None
) -> tuple[Any, dict[str, Any], list[str]]:
    """(train loader, {split: eval loader}, class names) for this data-parallel rank."""
    from cifar_dist.data import load_splits, registry

    ensure_synthetic(cfg)
    splits = load_splits(cfg.data)
    classes = list(getattr(splits, "classes", []) or [])
    kwargs: dict[str, Any] = {
        "micro_batch": micro_batch_size(cfg, dp),
        "eval_batch": max(1, cfg.data.eval_batch_size // dp),
        "rank": dp_rank,
        "world_size": dp,
        "seed": cfg.train.seed,
        "num_classes": cfg.data.num_classes,
    }
    train, evals = registry.build(
        cfg.data.loader,
        cfg.data,
        splits,
        device=device or torch.device("cpu"),
        dtype=torch.float64 if cfg.train.dtype == "float64" else torch.float32,
        channels_last=cfg.train.channels_last,
        **kwargs,
    )
    return train, evals, classes


def _finish(
    trainer: Trainer,
    cfg: Config,
    run_dir: Path,
    classes: list[str],
    wall0: float,
    sha: str,
    start_step: int = 0,
) -> dict[str, Any]:
    st = trainer.state
    summary: dict[str, Any] = {}
    splits = [s for s in ("val", "test") if s in trainer.eval_loaders]
    confusion = None
    for split in splits:
        res = trainer.evaluate_split(split, confusion=split == splits[-1])
        confusion = res.pop("confusion", confusion)
        summary.update({f"{split}_{k}": v for k, v in res.items()})
    from cifar_dist.logging import worst_images as worst

    worst_rows = worst.collect_worst(trainer, cfg) if worst.wanted(trainer, cfg) else []
    summary.update(
        {
            "epochs": st.epoch,
            "steps": st.step,
            # Where this call started (the resumed step; 0 for a fresh run) and what it ran.
            "start_step": start_step,
            "steps_this_run": st.step - start_step,
            "skipped_steps": st.skipped_steps,
            "train_s": st.train_time_s,
            "wall_s": time.perf_counter() - wall0,
            # Every optimiser step consumes one global batch (loaders drop incomplete batches).
            "samples_per_s": st.step * cfg.data.batch_size / max(st.train_time_s, 1e-9),
            # ds_numel: the full size of a parameter that DeepSpeed ZeRO-3 partitioned.
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters()),
            "world_size": trainer.info.world_size,
            "device": str(trainer.device),
            "git_sha": sha,
        }
    )
    if trainer.info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
        if cfg.log.plots:
            from cifar_dist.logging import plots

            plots.plot_curves(st.history, run_dir / "curves.png")
            plots.plot_lr(
                list(range(1, len(st.lr_trace) + 1)), st.lr_trace, run_dir / "lr_schedule.png"
            )
            if confusion is not None:
                names = classes or [str(i) for i in range(cfg.data.num_classes)]
                plots.plot_confusion(confusion, names, run_dir / "confusion_matrix.png")
        if worst_rows:  # before confusion(): W&B logs both at the last step
            names = classes or [str(i) for i in range(cfg.data.num_classes)]
            trainer.sink.worst_images(worst_rows, names)
        if confusion is not None:
            names = classes or [str(i) for i in range(cfg.data.num_classes)]
            trainer.sink.confusion(confusion.tolist(), names)
        trainer.sink.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary


@contextmanager
def preemption_handlers() -> Iterator[list[Any]]:
    """SIGTERM (torchrun, schedulers) and SIGUSR1 (Slurm --signal) ask for a checkpoint and a
    clean stop. Installed before set-up (data preparation can take minutes, and the default
    action would kill the process without a checkpoint or the pre-emption exit code); yields the
    objects whose `signal_received` the handler sets: a placeholder until the caller appends the
    trainer (which then also takes over a signal that came during set-up)."""
    targets: list[Any] = [SimpleNamespace(signal_received=None)]
    if threading.current_thread() is not threading.main_thread():
        yield targets
        return

    def handler(signum: int, _frame: object) -> None:
        for t in targets:
            t.signal_received = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield targets
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_training(cfg: Config, info: DistInfo, sinks: Sequence[Sink] = ()) -> dict[str, Any]:
    with preemption_handlers() as signal_targets:
        return _run_training(cfg, info, sinks, signal_targets)


def _run_training(
    cfg: Config, info: DistInfo, sinks: Sequence[Sink], signal_targets: list[Any]
) -> dict[str, Any]:
    wall0 = time.perf_counter()
    sha = git_sha()  # at the start: the code that ran, even if the checkout moves meanwhile
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    dims = ParallelDims.from_config(cfg.parallel, info.world_size, info.device.type)
    cfg = resolve_amp(cfg, info.device)  # train.amp=auto -> bf16 / none (saved in config.yaml)
    if cfg.data.batch_size == "auto":
        from cifar_dist.train.auto_batch import resolve_auto_batch

        cfg = resolve_auto_batch(cfg, info, dims)  # an int from here on (saved in config.yaml)
    run_dir = resolve_run_dir(cfg)
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
        except OSError as e:
            raise ConfigError(f"log.dir: cannot write the run directory {run_dir} ({e})") from None
    clear_markers(run_dir, info.rank, info.local_rank)  # a stale marker must not mean "pre-empted"
    barrier()
    backend_cls = backend_for(cfg, dims)  # the layout's backend (train/backends/)
    # tp and pp peers of one data-parallel replica must read the same batches.
    data_rank = backend_cls.data_rank(info.rank, dims)
    maybe_inject_fault(0, info.rank)  # step 0 = during set-up (tests: a signal before training)
    train_loader, eval_loaders, classes = build_data(cfg, data_rank, dims.dp, info.device)
    sink = build_sinks(cfg, run_dir, info.is_main, config_to_dict(cfg))
    # Caller-supplied sinks get every call on every rank (Ray Train's report is collective).
    if sinks:
        sink = MultiSink([sink, *sinks])
    try:
        loaders = (train_loader, eval_loaders)
        trainer = Trainer(cfg, info, dims, loaders, run_dir, sink, backend_cls)
        signal_targets.append(trainer)  # first, then take over a signal that came during set-up
        trainer.signal_received = trainer.signal_received or signal_targets[0].signal_received
        resumed = trainer.resume(cfg.train.resume)  # collective for some trainers: every rank
        if resumed and info.is_main:
            print(
                f"resumed at epoch {trainer.state.epoch + 1}, step {trainer.state.step}",
                flush=True,
            )
        start_step = trainer.state.step
        # parallel.json: mesh, per-rank shards, comm (collective); the unsplit model, shapes only
        start_report(trainer, run_dir, build_model(cfg, torch.device("meta")))
        try:
            trainer.run()
        except Preempted:  # tell the launcher scripts, whose launcher reports 1 (preemption.py)
            write_markers(run_dir, info.rank, info.local_rank, trainer.state.step)
            raise
        finish_report(trainer, run_dir)  # + peak memory per rank (collective)
        return _finish(trainer, cfg, run_dir, classes, wall0, sha, start_step)
    finally:
        sink.close()


def fit(cfg: Config, sinks: Sequence[Sink] = ()) -> dict[str, float]:
    """Train (single process, or one rank of a torchrun / Ray Train job) and return the final metrics.

    `sinks` are extra logging sinks (e.g. the Ray Tune reporter), added on every rank and closed
    with the run's own sinks; the training loop knows nothing about who listens.
    """
    with distributed_session(cfg.train.device, cfg.parallel.backend) as info:
        summary = run_training(cfg, info, sinks)
    return {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
