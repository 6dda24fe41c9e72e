"""The Tune trainables: each trial is one call of the project's `fit` with sampled overrides.

trial.workers == 1: `run_trial` trains inside its Tune actor.
trial.workers > 1: `run_distributed_trial` is only a driver: it starts a Ray Train TorchTrainer
whose workers each call `fit` (Ray Train sets up the process group and RANK/WORLD_SIZE/
LOCAL_RANK, which utils.dist picks up), and TuneReportCallback forwards rank 0's reports to
Tune. This is Ray's current Train-inside-Tune pattern (Train V2); `Tuner(TorchTrainer)` is
deprecated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_dist.config.load import load_config
from cifar_dist.config.schema import Config
from cifar_dist.train.common import NonFiniteError
from cifar_dist.train.fit import fit
from cifar_dist.tune.report import CKPT_NAME, ReportSink


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (pickled once into Ray's object store)."""

    base: dict[str, Any]
    """Resolved run config (base file + `run` overrides) with absolute paths."""
    trials_dir: str
    """log.dir of every trial: trial <id> writes <trials_dir>/<id>/."""
    group: str
    """W&B group (the sweep name)."""
    tags: list[str]
    metric: str
    mode: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    train_storage: str = ""
    """Ray Train storage path of distributed trials."""
    keep_checkpoints: int = 1
    pbt: bool = False
    """search.scheduler=pbt: a restored checkpoint may be another trial's, with new values."""


def trial_config(ctx: TrialContext, sampled: dict[str, Any], trial_id: str, resume: str) -> Config:
    """Base config + the sampled {dotted key: value} + what the sweep owns (run dir, W&B group)."""
    device = "cuda" if ctx.gpus_per_worker > 0 else "cpu"  # follow the resources Ray reserved
    overrides: dict[str, Any] = {
        **ctx.base,
        **sampled,
        "log.dir": ctx.trials_dir,
        "log.name": trial_id,
        "log.wandb.group": ctx.group,
        "log.wandb.tags": list(ctx.tags),
        "log.wandb.job_type": "tune-trial",
        "train.progress": False,
        "train.device": device,
        "train.resume": resume,
    }
    return load_config(None, overrides)


@contextmanager
def restored(checkpoint: Any) -> Iterator[str]:
    """Path of the checkpoint file Tune/Train hands a restarted trial ('' for a fresh one)."""
    if checkpoint is None:
        yield ""
        return
    with checkpoint.as_directory() as d:
        path = Path(d) / CKPT_NAME
        yield str(path) if path.is_file() else ""


def drop_records_after_checkpoint(ckpt_path: str, trial_id: str, run_dir: Path) -> None:
    """A trial restored from its own checkpoint (retry, --resume, PBT pause) trains again from
    that step; records the run logged after it (an epoch whose report Tune never received
    before the stop) would be logged twice, so they are dropped from metrics.jsonl/steps.jsonl.
    A checkpoint from another trial (PBT) branches the history instead: nothing is dropped, nor
    after such a branch (steps then count from the donor's start, not in file order)."""
    import json

    import torch

    from cifar_dist.tune.pbt import LOG_NAME

    if (run_dir / LOG_NAME).is_file():
        return
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    if ckpt.get("config", {}).get("log", {}).get("name") != trial_id:
        return
    step = int(ckpt["train_state"]["step"])
    for name in ("metrics.jsonl", "steps.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) < len(lines):
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)


def fit_and_report(cfg: Config, sink: ReportSink, ctx: TrialContext) -> None:
    try:
        fit(cfg, sinks=[sink])
    except NonFiniteError as e:
        # Divergence is a property of the sampled values, not a crash: retrying would diverge
        # again, and an errored trial teaches the searcher nothing. End it with a worst score.
        sink.diverged(str(e), ctx.metric, ctx.mode)


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one trial, in this process."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    sink = ReportSink(tune.report, tune.Checkpoint)
    with restored(tune.get_checkpoint()) as resume:
        if resume:
            drop_records_after_checkpoint(resume, trial_id, Path(ctx.trials_dir) / trial_id)
        if resume and ctx.pbt:
            from cifar_dist.tune.pbt import adopt

            cfg = trial_config(ctx, config, trial_id, "")
            resume = adopt(resume, cfg, trial_id, Path(ctx.trials_dir) / trial_id)
        fit_and_report(trial_config(ctx, config, trial_id, resume), sink, ctx)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function: one rank of a distributed trial."""
    import ray.train

    ctx: TrialContext = loop_config["ctx"]
    sink = ReportSink(ray.train.report, ray.train.Checkpoint)
    with restored(ray.train.get_checkpoint()) as resume:
        trial_id = loop_config["trial_id"]
        if resume and ray.train.get_context().get_world_rank() == 0:  # rank 0 writes the logs
            drop_records_after_checkpoint(resume, trial_id, Path(ctx.trials_dir) / trial_id)
        cfg = trial_config(ctx, loop_config["sampled"], trial_id, resume)
        fit_and_report(cfg, sink, ctx)


def run_distributed_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable that drives a Ray Train run of `ctx.workers` workers."""
    import ray.train
    import ray.train.torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    resources = {"CPU": ctx.cpus_per_worker}
    if ctx.gpus_per_worker > 0:
        resources["GPU"] = ctx.gpus_per_worker
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"ctx": ctx, "sampled": dict(config), "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx.workers,
            use_gpu=ctx.gpus_per_worker > 0,  # TorchConfig then picks nccl, else gloo
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            # A fixed name per trial: a retried trial (Tune FailureConfig) restores this Train
            # run's latest checkpoint instead of starting over.
            name=f"train-{trial_id}",
            storage_path=ctx.train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ctx.keep_checkpoints),
        ),
    )
    trainer.fit()
