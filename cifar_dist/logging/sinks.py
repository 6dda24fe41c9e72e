"""Logging sinks: log(metrics, step) and close(). Only rank 0 builds real sinks (nanoGPT/torchtitan).

Records whose keys all start with "step/" are per-step (loss, lr, grad norm); the others are
per-epoch. The JSONL sink writes them to steps.jsonl and metrics.jsonl respectively.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Sink:
    def log(self, metrics: dict[str, Any], step: int) -> None:  # noqa: B027 - no-op default
        pass

    def summary(self, metrics: dict[str, Any]) -> None:  # noqa: B027
        pass

    def checkpoint(self, path: Path | None, step: int) -> None:  # noqa: B027
        """A checkpoint was just written (every rank calls this; `path` is None off rank 0).

        Trainer.end_epoch logs the epoch record and then saves, so a sink that must hand an
        epoch's metrics and its checkpoint over together (Ray Tune) pairs them here.
        """

    def confusion(self, counts: Any, class_names: list[str]) -> None:  # noqa: B027
        """The final confusion matrix (rows = true class, columns = predicted), rank 0 only."""

    def worst_images(self, rows: list[dict[str, Any]], class_names: list[str]) -> None:  # noqa: B027
        """The highest-loss validation images (logging/worst_images.py), rank 0 only."""

    def close(self) -> None:  # noqa: B027
        pass


NullSink = Sink


def is_step_record(metrics: dict[str, Any]) -> bool:
    return all(k.startswith("step/") for k in metrics)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


class ConsoleSink(Sink):
    """Epoch lines on the console; tqdm.write keeps the progress bar intact."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if is_step_record(metrics):
            return
        tqdm.write(" ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def summary(self, metrics: dict[str, Any]) -> None:
        tqdm.write("final: " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))


class JsonlSink(Sink):
    """metrics.jsonl / steps.jsonl, appended to. A resumed run (`dedupe`) repeats the steps
    logged after its checkpoint, so the first record a file gets in this process drops that
    file's records at or past its step: one record per step across resumes. A fresh run
    appends as before."""

    def __init__(self, run_dir: Path, dedupe: bool = False) -> None:
        self._paths = {True: run_dir / "steps.jsonl", False: run_dir / "metrics.jsonl"}
        self._files: dict[bool, Any] = {}
        self._dedupe = dedupe
        for path in self._paths.values():  # present (maybe empty) from the start, as before
            path.touch()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        kind = is_step_record(metrics)
        if kind not in self._files:
            if self._dedupe:
                _drop_records_from(self._paths[kind], step)
            self._files[kind] = self._paths[kind].open("a")
        f = self._files[kind]
        f.write(json.dumps({"step": step, **metrics}) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _drop_records_from(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [x for x in lines if x.strip() and json.loads(x).get("step", 0) < step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


class MultiSink(Sink):
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for s in self.sinks:
            s.summary(metrics)

    def checkpoint(self, path: Path | None, step: int) -> None:
        for s in self.sinks:
            s.checkpoint(path, step)

    def confusion(self, counts: Any, class_names: list[str]) -> None:
        for s in self.sinks:
            s.confusion(counts, class_names)

    def worst_images(self, rows: list[dict[str, Any]], class_names: list[str]) -> None:
        for s in self.sinks:
            s.worst_images(rows, class_names)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_sinks(cfg: Any, run_dir: Path, is_main: bool, config_dict: dict[str, Any]) -> Sink:
    """Console + JSONL (+ W&B, TensorBoard when enabled and installed) on rank 0; a no-op sink elsewhere."""
    if not is_main:
        return NullSink()
    # A PBT trial (pbt.jsonl, cifar_dist/tune/pbt.py) that adopted another trial's checkpoint
    # branches its history (steps may go back): no dedupe there, Tune handles its own resumes.
    dedupe = bool(cfg.train.resume) and not (run_dir / "pbt.jsonl").is_file()
    sinks: list[Sink] = [ConsoleSink(), JsonlSink(run_dir, dedupe)]
    from cifar_dist.logging.wandb_sink import resolve_settings

    if resolve_settings(cfg.log.wandb)["mode"] != "disabled":
        from cifar_dist.logging.wandb_sink import make_wandb_sink

        wb = make_wandb_sink(cfg, run_dir, config_dict)
        if wb is not None:
            sinks.append(wb)
    if cfg.log.tensorboard:
        from cifar_dist.logging.tensorboard_sink import make_tensorboard_sink

        tb = make_tensorboard_sink(run_dir)
        if tb is not None:
            sinks.append(tb)
    return MultiSink(sinks)
