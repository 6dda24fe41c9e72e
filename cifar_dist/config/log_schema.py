"""The `log` section (and its `wandb` part) of the run config (schema.py assembles the sections)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cifar_dist.config.errors import check


@dataclass
class WandbConfig:
    mode: Literal["", "offline", "online", "disabled"] = ""
    """offline writes a local run to sync later; online needs WANDB_API_KEY; disabled logs nothing.
    Empty = $WANDB_MODE if set, else offline (an explicit value wins over the environment)."""
    project: str = ""
    """W&B project. Empty = $WANDB_PROJECT if set, else cifar-dist."""
    entity: str = ""
    """W&B entity (user or team). Empty = $WANDB_ENTITY if set, else wandb's default."""
    job_type: str = "train"
    """W&B job_type (filters runs in the UI)."""
    log_checkpoints: bool = True
    """Upload last.pt (aliases last/latest) as a model artifact at the end of training."""
    worst_images: int = 32
    """Log a table of this many highest-loss validation images (image, true and predicted
    class, confidence, loss) at the end of training (0 = off; only when W&B is on)."""
    group: str = ""
    """W&B group (sweeps put their trials in one group)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class LogConfig:
    name: str = ""
    """Run name; the run directory is <dir>/<name>/ (empty = a timestamped name)."""
    dir: str = "runs"
    """Parent directory of run directories."""
    every_steps: int = 50
    """Log training loss / lr / grad norm every N optimiser steps."""
    plots: bool = True
    """Write PNG plots (curves, LR schedule, confusion matrix) at the end."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases sink (skipped with a note when wandb is not installed)."""
    tensorboard: bool = False
    """Also write scalars to <run_dir>/tensorboard (needs the tensorboard extra)."""

    def __post_init__(self) -> None:
        check(self.every_steps >= 1, "log.every_steps", "must be >= 1")
        check("/" not in self.name, "log.name", "must not contain '/'")
        check(self.wandb.worst_images >= 0, "log.wandb.worst_images", "must be >= 0")
