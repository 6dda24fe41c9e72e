"""The end of a sweep for people: the lines `cifar-dist tune` prints, and one W&B summary run.

The summary run (job_type `sweep-summary`, in the sweep's W&B group next to the trial runs)
holds a `trials` table, one row per trial: trial id, status, the searched values as plain
columns named by their dotted keys (ready for a parallel-coordinates chart), the final and best
metric and the other final metrics; its summary names the best trial (id, run directory, W&B
run id, value, values). The per-trial runs stay the project's own W&B sink (each trial is an
ordinary run); this run only adds the sweep-level view that Ray's WandbLoggerCallback would not.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_dist.config.schema import Config
from cifar_dist.tune.config import SweepConfig
from cifar_dist.tune.results import EXTRA_METRICS, TrialRow

if TYPE_CHECKING:
    from cifar_dist.tune.driver import SweepOutcome


def _cell(v: Any) -> Any:
    """JSON-safe table cell: non-finite floats become empty (W&B tables reject NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def table_rows(rows: list[TrialRow], sweep: SweepConfig) -> tuple[list[str], list[list[Any]]]:
    metric = sweep.search.metric
    extras = [k for k in EXTRA_METRICS if k != metric]
    columns = ["trial_id", "status", *sweep.space, metric, f"best_{metric}", "epochs", *extras]
    columns += ["time_s", "run_dir"]
    data = [
        [r.trial_id, r.status, *(r.params.get(k) for k in sweep.space), r.value, r.best, r.epochs]
        + [r.metrics.get(k) for k in extras]
        + [round(r.time_s, 2), r.run_dir]
        for r in rows
    ]
    return columns, [[_cell(v) for v in row] for row in data]


def _wandb_run_id(run_dir: str) -> str:
    """The trial's own W&B run id (offline-run-<time>-<id> / run-<time>-<id>), '' if none."""
    found = sorted(Path(run_dir).glob("wandb/*run-*"))
    return found[-1].name.rsplit("-", 1)[-1] if found else ""


def summary_values(outcome: SweepOutcome, sweep: SweepConfig) -> dict[str, Any]:
    metric = sweep.search.metric
    out: dict[str, Any] = {
        "trials": len(outcome.rows),
        "interrupted": outcome.interrupted,
        **{
            f"trials_{s}": sum(r.status == s for r in outcome.rows)
            for s in ("completed", "stopped", "diverged", "error", "unfinished")
        },
    }
    best = outcome.best
    if best is not None:
        out.update(
            {
                "best_trial_id": best.trial_id,
                "best_run_dir": best.run_dir,
                "best_wandb_run_id": _wandb_run_id(best.run_dir),
                f"best_{metric}": best.value,
                "best_config_yaml": str(outcome.best_yaml or ""),
                **{f"best/{k}": v for k, v in best.params.items()},
            }
        )
    return out


def log_summary_run(outcome: SweepOutcome, sweep: SweepConfig, base: Config) -> Path | None:
    """Write the summary run under <sweep>/summary/ (mode and project as the trials' W&B runs);
    None when W&B is disabled or not installed. Returns the run's files directory's parent."""
    w = base.log.wandb
    if w.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        return None
    from cifar_dist.logging.wandb_sink import resolve_mode

    run_dir = outcome.sweep_dir / "summary"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=w.project,
        name=f"{sweep.name}-summary",
        group=sweep.name,
        job_type="sweep-summary",
        tags=[*w.tags, "sweep-summary", sweep.search.algo],
        config={"sweep": dataclasses.asdict(sweep)},
        dir=str(run_dir),
        mode=resolve_mode(w.mode),
        reinit="finish_previous",
    )
    try:
        columns, data = table_rows(outcome.rows, sweep)
        logged: dict[str, Any] = {"trials": wandb.Table(columns=columns, data=data)}
        logged.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in outcome.plots})
        run.log(logged)
        for k, v in summary_values(outcome, sweep).items():
            run.summary[k] = _cell(v)
        path = Path(run.dir).parent
    finally:
        run.finish()
    return path


def _shown(path: Path) -> str:
    """Relative to the current directory when inside it: shorter lines, copy-pasteable."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe(outcome: SweepOutcome, sweep: SweepConfig) -> str:
    """The lines `cifar-dist tune` prints at the end."""
    metric = sweep.search.metric
    lines = [f"sweep {outcome.sweep_dir.name}: {len(outcome.rows)} trials"]
    for r in outcome.rows:
        vals = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        note = f"  ({r.error})" if r.error else ""
        note += f"  (pbt: continued from {', '.join(r.donors)})" if r.donors else ""
        lines.append(
            f"  {r.trial_id} {r.status:9s} {metric}={r.value:.4g} epochs={r.epochs} {vals}{note}"
        )
    lines.append(f"results: {_shown(outcome.csv)}")
    if outcome.best is not None and outcome.best_yaml is not None:
        lines.append(f"best: {outcome.best.trial_id} {metric}={outcome.best.value:.4g}")
        best = _shown(outcome.best_yaml)
        lines.append(f"best config: {best} (cifar-dist train -c {best})")
    offline = [p for r in outcome.rows for p in Path(r.run_dir).glob("wandb/offline-run-*")]
    if offline:
        lines.append(
            f"wandb: {len(offline)} offline runs (group {outcome.sweep_dir.name}); upload with: "
            f"wandb sync {_shown(outcome.sweep_dir)}/trials/*/wandb/offline-run-*"
        )
    if outcome.wandb_dir is not None:
        lines.append(f"wandb summary run (trials table, best trial): {_shown(outcome.wandb_dir)}")
    if outcome.interrupted:
        lines.append(
            f"interrupted: resume with: cifar-dist tune --resume {_shown(outcome.sweep_dir)}"
        )
    return "\n".join(lines)
