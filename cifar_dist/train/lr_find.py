"""`cifar-dist lr-find`: the LR range test (Smith 2017, "Cyclical Learning Rates", section 3.3).

Train from the run's initial state while the learning rate grows exponentially from `start` to
`end` over `steps` optimiser steps, record the (EMA-smoothed, bias-corrected) training loss at
each step, and stop early once it is non-finite or above `diverge` x its minimum. The suggested
LR is where the smoothed loss falls fastest (steepest negative slope against log LR); the LR of
the minimum loss / 10 is reported too. Both are in the units of `optim.lr` (so with
lr_units=per_1024 they are per-1024-example LRs): the sweep multiplies every parameter group's
configured LR by the same factor, keeping the recipe's ratios (e.g. the 64x on norm biases).

The model, data, augmentation and optimiser are exactly the training run's (the same Trainer,
whitening stem included); only the LR schedule is replaced. Writes lr_find.json and
lr_find.png into the run directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.logging.sinks import Sink
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.train.callbacks.ema import EMA
from cifar_dist.train.callbacks.recipe import LookaheadAveraging
from cifar_dist.train.common import NonFiniteError, resolve_amp
from cifar_dist.train.optim import build_optimizer
from cifar_dist.train.trainer import Trainer
from cifar_dist.utils.dist import distributed_session


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]
    """EMA-smoothed, bias-corrected training loss after each step."""
    suggestion: float
    min_loss_lr: float


def exp_lrs(start: float, end: float, steps: int) -> list[float]:
    """`steps` LRs growing geometrically from start to end (inclusive)."""
    if not 0 < start < end or steps < 2:
        raise ConfigError(
            f"lr-find: need 0 < start < end and steps >= 2 (got {start}, {end}, {steps})"
        )
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(raw: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (fast.ai's lr_find smoothing)."""
    avg, out = 0.0, []
    for i, v in enumerate(raw, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(LR of the steepest descent of loss vs log LR, LR of the minimum loss / 10)."""
    if len(lrs) < 3:
        raise ConfigError("lr-find: fewer than 3 finite steps; lower --start")
    logs = [math.log(x) for x in lrs]
    slopes = [
        (losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1])
        for i in range(1, len(lrs) - 1)
    ]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    return steepest, lrs[min(range(len(losses)), key=losses.__getitem__)] / 10


def _batches(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:  # as many epochs as the sweep needs
        trainer.train_loader.set_epoch(epoch)
        yield from trainer.train_loader
        epoch += 1


def range_test(
    trainer: Trainer,
    cfg_lr: float,
    start: float,
    end: float,
    steps: int,
    beta: float,
    diverge: float,
) -> RangeTest:
    """Run the sweep on a freshly built `trainer` (it is trained in place)."""
    lrs = exp_lrs(start, end, steps)
    # Weight averaging (Lookahead, EMA) would blur the loss-vs-LR curve.
    averaging = (EMA, LookaheadAveraging)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, averaging)]
    trainer.optimizer = build_optimizer(
        trainer.model, trainer.cfg.optim, trainer.cfg.data.batch_size
    )
    trainer.scheduler = LambdaLR(trainer.optimizer, lambda i: lrs[min(i, steps - 1)] / cfg_lr)
    trainer.train_model.train()
    batches, raw, seen = _batches(trainer), [], []
    best = math.inf
    for lr in lrs:
        try:
            out = trainer.train_step(batches)
        except NonFiniteError:
            break
        loss = sum(out.losses) / len(out.losses)
        if not math.isfinite(loss):
            break
        raw.append(loss)
        seen.append(lr)
        current = smooth(raw, beta)[-1]
        best = min(best, current)
        if current > diverge * best:
            break
    losses = smooth(raw, beta)
    steepest, min_lr = suggest(seen, losses)
    return RangeTest(seen, losses, steepest, min_lr)


def plot(result: RangeTest, out: Path) -> None:
    from cifar_dist.logging.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="C1", ls="--", label=f"steepest: {result.suggestion:.3g}")
    ax.axvline(result.min_loss_lr, color="C2", ls=":", label=f"min/10: {result.min_loss_lr:.3g}")
    ax.set(
        xscale="log", xlabel="optim.lr", ylabel="training loss (smoothed)", title="LR range test"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def lr_find(
    cfg: Config, start: float, end: float, steps: int, beta: float = 0.9, diverge: float = 4.0
) -> dict[str, Any]:
    """Build the run's trainer, sweep, write lr_find.{json,png}; returns the JSON record."""
    from cifar_dist.train.fit import build_data, resolve_run_dir

    with distributed_session(cfg.train.device, cfg.parallel.backend) as info:
        if info.distributed:
            raise ConfigError("lr-find: run it as a single process (not under torchrun)")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        dims = ParallelDims.from_config(cfg.parallel, 1)
        cfg = resolve_amp(cfg, info.device)
        if cfg.data.batch_size == "auto":
            from cifar_dist.train.auto_batch import resolve_auto_batch

            cfg = resolve_auto_batch(cfg, info, dims)
        run_dir = resolve_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        loaders = build_data(cfg, 0, 1, info.device)[:2]
        trainer = Trainer(cfg, info, dims, loaders, run_dir, Sink())
        result = range_test(trainer, cfg.optim.lr, start, end, steps, beta, diverge)
    record = {
        "suggested_lr": result.suggestion,
        "min_loss_lr_div10": result.min_loss_lr,
        "lr_units": cfg.optim.lr_units,
        "lrs": result.lrs,
        "losses": result.losses,
        "png": str(run_dir / "lr_find.png"),
    }
    (run_dir / "lr_find.json").write_text(json.dumps(record, indent=2))
    plot(result, run_dir / "lr_find.png")
    return record
