"""A finished sweep -> sweep_results.csv, PNG plots and the best config as a ready YAML."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_dist.config.load import config_to_dict, load_config
from cifar_dist.config.schema import Config
from cifar_dist.tune.config import SweepConfig
from cifar_dist.tune.pbt import adoptions

EXTRA_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


@dataclass
class TrialRow:
    trial_id: str
    status: str
    """completed | stopped (early: ASHA or train.early_stopping) | diverged | error |
    unfinished (the sweep was interrupted; `cifar-dist tune --resume` continues it)."""
    params: dict[str, Any]
    value: float
    """The search metric's last reported value (nan when none)."""
    best: float
    """Its best value over the trial's epochs."""
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    time_s: float = 0.0
    error: str = ""
    run_dir: str = ""
    donors: list[str] = field(default_factory=list)
    """PBT: the trials whose checkpoints this one continued from, in order."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def row_from_result(result: Any, sweep: SweepConfig, base: Config, trials_dir: Path) -> TrialRow:
    """One Ray Tune `Result` -> TrialRow (Tune names trial directories by trial id)."""
    metric, mode = sweep.search.metric, sweep.search.mode
    last = dict(result.metrics or {})
    # The trial directory, not the last result: a PBT trial restored from another trial's
    # checkpoint can carry that trial's last result (id and config) until it reports again.
    trial_id = Path(result.path).name if result.path else str(last.get("trial_id"))
    params = {k: (result.config or {}).get(k) for k in sweep.space}
    history = result.metrics_dataframe
    values: list[float] = []
    if history is not None and metric in history:
        values = [float(v) for v in history[metric].tolist() if _finite(v)]
    best = (max(values) if mode == "max" else min(values)) if values else math.nan
    value = float(last[metric]) if isinstance(last.get(metric), (int, float)) else math.nan
    epochs = int(last.get("epoch", 0) or 0)
    planned = int(params.get("train.epochs") or base.train.epochs)
    if result.error is not None:
        status, error = "error", str(result.error).strip().splitlines()[-1][:300]
    elif last.get("diverged"):
        status, error = "diverged", str(last.get("error", ""))
    else:
        status, error = ("stopped" if epochs < planned else "completed"), ""
    return TrialRow(
        trial_id=trial_id,
        status=status,
        params=params,
        value=value,
        best=best,
        epochs=epochs,
        metrics={k: float(last[k]) for k in EXTRA_METRICS if _finite(last.get(k))},
        time_s=float(last.get("time_total_s", 0.0) or 0.0),
        error=error,
        run_dir=str(trials_dir / trial_id),
        donors=[a["donor"] for a in adoptions(trials_dir / trial_id)],
    )


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Best final value among completed trials (a stopped trial's value is from a shorter run,
    so its config would not reproduce it); any finished trial if none completed."""
    for pool in (
        [r for r in rows if r.status == "completed" and _finite(r.value)],
        [r for r in rows if r.status in ("completed", "stopped") and _finite(r.value)],
    ):
        if pool:
            return max(pool, key=lambda r: r.value if mode == "max" else -r.value)
    return None


def write_csv(rows: list[TrialRow], sweep: SweepConfig, path: Path) -> None:
    metric = sweep.search.metric
    extras = [k for k in EXTRA_METRICS if k != metric]
    header = ["trial_id", "status", *sweep.space, metric, f"best_{metric}", "epochs", *extras]
    header += ["time_s", "run_dir", "error"]
    pbt = sweep.scheduler == "pbt"
    header += ["pbt_donors"] if pbt else []
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(
                [r.trial_id, r.status, *(r.params.get(k) for k in sweep.space), r.value, r.best]
                + [r.epochs, *(r.metrics.get(k, "") for k in extras)]
                + [round(r.time_s, 2), r.run_dir, r.error]
                + ([" ".join(r.donors)] if pbt else [])
            )


def best_config(base_tree: dict[str, Any], row: TrialRow) -> Config:
    """The base run config with the best trial's values: what `cifar-dist train -c` should run."""
    return load_config(None, {**base_tree, **row.params})


def write_best_yaml(cfg: Config, row: TrialRow, sweep: SweepConfig, path: Path) -> None:
    head = (
        f"# Best trial {row.trial_id} of sweep {sweep.name}: {sweep.search.metric}={row.value:.6g}"
        f" ({row.status}, {row.epochs} epochs)\n"
        f"# values: {', '.join(f'{k}={v}' for k, v in row.params.items())}\n"
        f"# reproduce: cifar-dist train -c {path}\n"
    )
    path.write_text(head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def plot_all(rows: list[TrialRow], sweep: SweepConfig, out_dir: Path) -> list[Path]:
    """<metric>_vs_<param>.png for each numeric searched key, and best_so_far.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = sweep.search.metric, sweep.search.mode
    written: list[Path] = []
    colours = {"completed": "tab:blue", "stopped": "tab:orange", "diverged": "tab:red"}
    for key, spec in sweep.space.items():
        pts = [(r.params[key], r.value, r.status) for r in rows if _finite(r.value)]
        pts = [p for p in pts if _finite(p[0])]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for status, colour in colours.items():
            sel = [(x, y) for x, y, s in pts if s == status]
            if sel:
                ax.scatter(*zip(*sel, strict=True), c=colour, label=status)
        if spec.log or (spec.values and min(p[0] for p in pts) > 0 and key.endswith("lr")):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
        ax.grid(alpha=0.3)
        ax.legend()
        out = out_dir / f"{metric}_vs_{key.split('.')[-1]}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    best, curve = math.nan, []
    for r in rows:  # creation order
        if _finite(r.value) and r.status != "diverged":
            better = r.value > best if mode == "max" else r.value < best
            best = r.value if math.isnan(best) or better else best
        curve.append(best)
    if any(_finite(v) for v in curve):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(curve) + 1), curve, marker="o", drawstyle="steps-post")
        ax.set(xlabel="trial (in start order)", ylabel=f"best {metric} so far", title="best so far")
        ax.grid(alpha=0.3)
        out = out_dir / "best_so_far.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
