"""TensorBoard sink: every scalar record into <run_dir>/tensorboard via torch's SummaryWriter.

Per-step records go in under their own names (step/loss...) against the optimiser step; epoch
records are written against the optimiser step too, so both share one x-axis, and a resumed run
appends to the same directory (TensorBoard merges event files of one directory).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cifar_dist.logging.sinks import Sink


class TensorBoardSink(Sink):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"final/{k}", v, global_step=0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tensorboard_sink(run_dir: Path) -> TensorBoardSink | None:
    try:
        import tensorboard  # noqa: F401 - SummaryWriter needs it
    except ImportError:
        tqdm.write(
            "tensorboard: not installed (pip install 'cifar-dist[tensorboard]'); "
            "skipping the TensorBoard sink"
        )
        return None
    return TensorBoardSink(run_dir)
