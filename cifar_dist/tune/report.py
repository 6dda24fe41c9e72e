"""A logging sink that reports each epoch's metrics, with that epoch's checkpoint, to Ray.

Used as `fit(cfg, sinks=[ReportSink(...)])`: the trainer logs the epoch record and then saves a
checkpoint (Sink.checkpoint), so the sink holds the record until the checkpoint arrives and
reports both together. Tune can then stop (ASHA), pause and restore (PBT, retries) a trial.
One sink per process: in a Ray Train trial every worker reports (ray.train.report is a
barrier), rank 0 with the checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_dist.logging.sinks import Sink, is_step_record
from cifar_dist.utils.dist import get_world_size

CKPT_NAME = "checkpoint.pt"


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class ReportSink(Sink):
    def __init__(self, report: Callable[..., None], checkpoint_cls: Any) -> None:
        """`report`: ray.tune.report (trial in a Tune actor) or ray.train.report (Train worker);
        `checkpoint_cls`: the matching Checkpoint class."""
        self._report = report
        self._checkpoint_cls = checkpoint_cls
        self._pending: dict[str, float] | None = None
        self._epoch = 0.0  # last epoch logged: a diverged trial's report says how far it got
        self.reports = 0

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if is_step_record(metrics):
            return
        if self._pending is not None:  # a Trainer whose save() does not call Sink.checkpoint
            self._send(self._pending, None)
        self._pending = {**_numeric(metrics), "step": float(step), "world_size": get_world_size()}
        self._epoch = self._pending.get("epoch", self._epoch)

    def checkpoint(self, path: Path | None, step: int) -> None:
        if self._pending is None:  # a mid-epoch checkpoint (ckpt_every_steps): Tune needs none
            return
        metrics, self._pending = self._pending, None
        if path is None or path.is_dir():
            # A DeepSpeed checkpoint is a tag directory of per-rank shards that a trial restart
            # cannot take as train.resume yet: report the epoch without one, as before.
            self._send(metrics, None)
            return
        # Tune copies the directory it is given into the trial's storage; give it only this
        # checkpoint (hard link when possible), not the run's whole checkpoints/ folder.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tune-") as tmp:
            target = Path(tmp) / CKPT_NAME
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
            self._send(metrics, self._checkpoint_cls.from_directory(tmp))

    def diverged(self, reason: str, metric: str, mode: str) -> None:
        """Final report of a trial that diverged: the worst value of `metric`, so the searcher
        learns that region is bad, plus the reason (the trial itself ends normally)."""
        self._pending = None
        worst = -math.inf if mode == "max" else math.inf
        final = {metric: worst, "epoch": self._epoch, "diverged": 1.0}
        self._send({**final, "world_size": get_world_size()}, None, reason)

    def close(self) -> None:
        if self._pending is not None:
            self._send(self._pending, None)
            self._pending = None

    def _send(self, metrics: dict[str, Any], checkpoint: Any, error: str = "") -> None:
        self.reports += 1
        self._report({**metrics, "error": error}, checkpoint=checkpoint)
