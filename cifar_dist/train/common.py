"""Pieces every trainer shares: model construction, batch arithmetic, step results, errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.models import create_model

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradient norms."""


@dataclass
class StepResult:
    """What one optimiser step reports back to the epoch loop (this rank's view)."""

    lr: float
    losses: list[float] = field(default_factory=list)
    """Mean loss of each micro-batch."""
    loss_sum: float = 0.0
    """Sum over samples of the loss (for the epoch mean)."""
    correct: float = 0.0
    seen: int = 0
    grad_norm: float = 0.0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.losses.append(loss)
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n


class Preempted(RuntimeError):
    """A SIGTERM/SIGUSR1 stopped the run after a checkpoint; resume with --train.resume=auto."""


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    m = cfg.model
    model = create_model(
        m.name,
        num_classes=cfg.data.num_classes,
        norm=m.norm,
        groups=m.groups,
        se=m.se,
        dropout=m.dropout,
        drop_path=m.drop_path,
    )
    from cifar_dist.train.model_init import apply_model_options

    apply_model_options(model, m)  # norm momentum/eps/frozen scale, dirac init (recipe options)
    fmt = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    return model.to(device=device, dtype=dtype, memory_format=fmt)


def micro_batch_size(cfg: Config, dp: int) -> int:
    per_step = dp * cfg.train.grad_accum
    if cfg.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by dp*grad_accum = {per_step}"
        )
    return cfg.data.batch_size // per_step
