"""What a checkpoint holds besides tensors: counters, partial-epoch sums, history."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainState:
    epoch: int = 0
    """Epoch in progress (0-based)."""
    step: int = 0
    """Optimiser steps taken (skipped non-finite steps included: they consumed data)."""
    step_in_epoch: int = 0
    """Optimiser steps already taken in `epoch` (where a resumed run restarts the sampler)."""
    nonfinite_run: int = 0
    """Consecutive non-finite steps so far."""
    skipped_steps: int = 0
    """Non-finite steps skipped over the whole run."""
    best_val_loss: float = math.inf
    bad_evals: int = 0
    """Evaluations since the best validation loss (early stopping)."""
    epoch_loss_sum: float = 0.0
    epoch_correct: float = 0.0
    epoch_seen: float = 0.0
    train_time_s: float = 0.0
    train_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    lr_trace: list[float] = field(default_factory=list)

    def reset_epoch_sums(self) -> None:
        self.epoch_loss_sum = self.epoch_correct = self.epoch_seen = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)
