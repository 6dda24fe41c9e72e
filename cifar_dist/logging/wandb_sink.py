"""Weights & Biases sink. Offline unless an API key is configured, so a run never waits on a network."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
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


def _epoch_val_accs(run_dir: Path) -> list[float]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [float(r["val_acc"]) for r in rows if isinstance(r.get("val_acc"), (int, float))]


class WandbSink(Sink):
    def __init__(self, run: Any, run_dir: Path, log_checkpoints: bool = True) -> None:
        self.run = run
        self.run_dir = run_dir
        self.log_checkpoints = log_checkpoints

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(
            {k.removeprefix("step/"): v for k, v in metrics.items()}
            if is_step_record(metrics)
            else metrics,
            step=step,
        )

    def summary(self, metrics: dict[str, Any]) -> None:
        import wandb

        # Under final/: a plain "val_acc" would overwrite the best-epoch value that
        # define_metric(summary="max") keeps in the run summary (the dashboard's column).
        for k, v in metrics.items():
            self.run.summary[f"final/{k}"] = v
        images = {p.stem: wandb.Image(str(p)) for p in sorted(self.run_dir.glob("*.png"))}
        if images:
            self.run.log({f"plots/{k}": v for k, v in images.items()})
        if self.log_checkpoints:
            self._log_checkpoint_artifact()

    def _log_checkpoint_artifact(self) -> None:
        """last.pt as a model artifact; aliased "best" too when its val_acc is the best seen
        (the trainer keeps only last.pt, so the final checkpoint is the only one to upload)."""
        import wandb

        last = self.run_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            return
        art = wandb.Artifact(f"model-{self.run.id}", type="model")
        art.add_file(str(last))
        aliases = ["last", "latest"]
        history = _epoch_val_accs(self.run_dir)
        if history and history[-1] >= max(history):
            aliases.append("best")
        self.run.log_artifact(art, aliases=aliases)

    def confusion(self, counts: Any, class_names: list[str]) -> None:
        """An interactive W&B confusion matrix. wandb.plot.confusion_matrix wants per-sample
        predictions, but the trainer only has the (all-reduced) counts, so this builds the same
        table and vega spec that wandb.plot.confusion_matrix builds from them."""
        import wandb

        rows = [
            [class_names[i], class_names[j], int(counts[i][j])]
            for i in range(len(class_names))
            for j in range(len(class_names))
        ]
        table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
        fields = {k: k for k in ("Actual", "Predicted", "nPredictions")}
        chart = wandb.plot_table(
            "wandb/confusion_matrix/v1", table, fields, {"title": "Confusion matrix"}
        )
        self.run.log({"confusion_matrix": chart})

    def worst_images(self, rows: list[dict[str, Any]], class_names: list[str]) -> None:
        """A table of the highest-loss validation images with their predictions."""
        import wandb

        columns = ["image", "true", "predicted", "confidence", "true_class_prob", "loss"]
        data = [
            [
                wandb.Image(
                    r["image"], caption=f"{class_names[r['true']]} -> {class_names[r['pred']]}"
                ),
                class_names[r["true"]],
                class_names[r["pred"]],
                r["confidence"],
                r["true_prob"],
                r["loss"],
            ]
            for r in rows
        ]
        # commit=False: into the last step, which the confusion chart then commits; a step of
        # its own would be one past the last, and a resumed run would log that step again.
        table = wandb.Table(columns=columns, data=data)
        self.run.log({"worst_val_images": table}, commit=False)

    def close(self) -> None:
        mode = self.run.settings.mode
        path = self.run.dir
        self.run.finish()
        if mode == "offline":
            offline_dir = Path(path).parent
            tqdm.write(
                f"wandb: offline run in {offline_dir}; upload with: wandb sync {offline_dir}"
            )


def resolve_settings(wcfg: Any, env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """mode/project/entity: an explicit config value > $WANDB_MODE/$WANDB_PROJECT/$WANDB_ENTITY
    > built-in default. Passing mode=/project= to wandb.init would silently override the
    environment, so the config leaves them empty ("unset") unless the user sets them."""
    env = os.environ if env is None else env
    return {
        "mode": wcfg.mode or env.get("WANDB_MODE") or "offline",
        "project": wcfg.project or env.get("WANDB_PROJECT") or "cifar-dist",
        "entity": wcfg.entity or env.get("WANDB_ENTITY") or None,
    }


RUN_ID_FILE = "wandb_run_id"


def run_id_for(run_dir: Path, resume: bool) -> tuple[str, bool]:
    """(id, resuming): a resumed job (train.resume=auto or a path: a Slurm requeue, a retried
    Tune trial, whose run dir is stable) continues the W&B run stored in its run directory; a
    fresh run (no resume) in an existing run directory starts, and stores, a new W&B run."""
    path = run_dir / RUN_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip(), True
    run_id = secrets.token_hex(6)  # W&B ids: lowercase letters/digits; same length class
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id, False


def _define_metrics(run: Any) -> None:
    """Epoch metrics plot against `epoch`; the summary keeps the best val_acc / val_loss."""
    run.define_metric("epoch")
    for key in ("train_loss", "train_acc", "val_acc", "val_loss", "lr"):
        run.define_metric(key, step_metric="epoch")
    run.define_metric("val_acc", step_metric="epoch", summary="max")
    run.define_metric("val_loss", step_metric="epoch", summary="min")


def make_wandb_sink(cfg: Any, run_dir: Path, config_dict: dict[str, Any]) -> WandbSink | None:
    try:
        import wandb
    except ImportError:
        tqdm.write("wandb: not installed (pip install 'cifar-dist[wandb]'); skipping the W&B sink")
        return None
    from cifar_dist.utils.gitinfo import git_sha

    settings = resolve_settings(cfg.log.wandb)
    mode = resolve_mode(str(settings["mode"]))
    run_id, resuming = run_id_for(run_dir, bool(cfg.train.resume))
    kwargs: dict[str, Any] = {
        "project": settings["project"],
        "entity": settings["entity"],
        "job_type": cfg.log.wandb.job_type or None,
        "id": run_id,
        "resume": "allow",
        "name": run_dir.name,
        "group": cfg.log.wandb.group or None,
        "tags": list(cfg.log.wandb.tags) or None,
        "config": {**config_dict, "git_sha": git_sha()},
        "dir": str(run_dir),
        "reinit": "finish_previous",
    }
    if resuming:
        tqdm.write(f"wandb: resuming W&B run {run_id} (from {run_dir / RUN_ID_FILE})")
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # wandb raises CommError, UsageError, timeouts... for a bad network/key
        if mode != "online":
            raise
        # A key but no reachable server (or a rejected key): keep training, log locally.
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        tqdm.write(f"wandb: online init failed ({why}); logging offline instead")
        run = wandb.init(mode="offline", **kwargs)
    _define_metrics(run)
    return WandbSink(run, run_dir, log_checkpoints=cfg.log.wandb.log_checkpoints)
