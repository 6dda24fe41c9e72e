"""Weights & Biases sink. Offline unless an API key is configured, so a run never waits on a network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cifar_dist.logging.sinks import Sink, is_step_record


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(requested: str) -> str:
    """online without a key would fail at init; fall back to offline and say so."""
    if requested == "online" and not _has_api_key():
        tqdm.write("wandb: no API key configured; logging offline instead")
        return "offline"
    return requested


class WandbSink(Sink):
    def __init__(self, run: Any, run_dir: Path) -> None:
        self.run = run
        self.run_dir = run_dir

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(
            {k.removeprefix("step/"): v for k, v in metrics.items()}
            if is_step_record(metrics)
            else metrics,
            step=step,
        )

    def summary(self, metrics: dict[str, Any]) -> None:
        import wandb

        for k, v in metrics.items():
            self.run.summary[k] = v
        images = {p.stem: wandb.Image(str(p)) for p in sorted(self.run_dir.glob("*.png"))}
        if images:
            self.run.log({f"plots/{k}": v for k, v in images.items()})

    def close(self) -> None:
        mode = self.run.settings.mode
        path = self.run.dir
        self.run.finish()
        if mode == "offline":
            offline_dir = Path(path).parent
            tqdm.write(
                f"wandb: offline run in {offline_dir}; upload with: wandb sync {offline_dir}"
            )


def make_wandb_sink(cfg: Any, run_dir: Path, config_dict: dict[str, Any]) -> WandbSink | None:
    try:
        import wandb
    except ImportError:
        tqdm.write("wandb: not installed (pip install 'cifar-dist[wandb]'); skipping the W&B sink")
        return None
    from cifar_dist.utils.gitinfo import git_sha

    mode = resolve_mode(cfg.log.wandb.mode)
    kwargs: dict[str, Any] = {
        "project": cfg.log.wandb.project,
        "name": run_dir.name,
        "group": cfg.log.wandb.group or None,
        "tags": list(cfg.log.wandb.tags) or None,
        "config": {**config_dict, "git_sha": git_sha()},
        "dir": str(run_dir),
        "reinit": "finish_previous",
    }
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # wandb raises CommError, UsageError, timeouts... for a bad network/key
        if mode != "online":
            raise
        # A key but no reachable server (or a rejected key): keep training, log locally.
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        tqdm.write(f"wandb: online init failed ({why}); logging offline instead")
        run = wandb.init(mode="offline", **kwargs)
    return WandbSink(run, run_dir)
