"""PBT's exploit step on our checkpoints: continue from another trial's weights with new values.

When Tune's PopulationBasedTraining exploits a trial, it restarts it with the better trial's
checkpoint and a perturbed config. Our checkpoint holds the optimiser's param_groups and the LR
scheduler's state, and loading them (Trainer.load_state_dict) would bring back the *donor's*
lr / momentum / weight decay: the perturbation would be silently lost. Tune's own examples set
`param_group["lr"]` by hand after loading for the same reason. Here the hyperparameters are
rebuilt from the trial's new config with the project's build_optimizer (so lr units, batch
scaling and per-group multipliers stay right) and written into a copy of the checkpoint, which
the trial then resumes from. Each adoption is logged to <run dir>/pbt.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cifar_dist.config.load import config_from_dict
from cifar_dist.config.schema import Config
from cifar_dist.train.checkpoint import atomic_save
from cifar_dist.tune.config import PBT_KEYS

LOG_NAME = "pbt.jsonl"


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _fresh_groups(cfg: Config, global_batch: int) -> dict[str, dict[str, Any]]:
    """{group kind: hyperparameters} of the optimiser the new config builds."""
    from cifar_dist.train.common import build_model
    from cifar_dist.train.optim import build_optimizer

    model = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.optim, global_batch)
    return {g["kind"]: {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups}


def _set_scheduler_lrs(state: dict[str, Any], lrs: list[float]) -> None:
    """A constant schedule keeps the current lr; its recorded base/last lrs follow the new one."""
    for key in ("base_lrs", "_last_lr"):
        if key in state:
            state[key] = list(lrs)
    for sub in state.get("_schedulers", []):  # SequentialLR (warmup + constant)
        _set_scheduler_lrs(sub, lrs)


def adopt(ckpt_path: str, cfg: Config, trial_id: str, run_dir: Path) -> str:
    """The checkpoint this trial should resume from: `ckpt_path` itself when it is the trial's
    own with the same values, else a copy with the optimiser set to `cfg`'s values."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    old = config_from_dict(ckpt["config"])
    changed = {k: [_get(old, k), _get(cfg, k)] for k in PBT_KEYS if _get(old, k) != _get(cfg, k)}
    donor = old.log.name
    if not changed and donor == trial_id:
        return ckpt_path
    batch = old.data.batch_size if isinstance(old.data.batch_size, int) else 128
    fresh = _fresh_groups(cfg, batch)
    groups = ckpt["optimizer"]["param_groups"]
    for group in groups:
        new = fresh.get(group.get("kind", ""))
        if new is None:  # a group the new config would not build: leave it as it was
            continue
        group.update(new)
        if "initial_lr" in group:
            group["initial_lr"] = new["lr"]
    _set_scheduler_lrs(ckpt["scheduler"], [g["lr"] for g in groups])
    state = ckpt.get("train_state") or {}
    out = run_dir / "pbt" / f"adopted-{donor}-step{state.get('step', 0)}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, out)
    jsonl = run_dir / "metrics.jsonl"  # where in this trial's epoch log it continues
    at = len(jsonl.read_text().splitlines()) if jsonl.is_file() else 0
    record = {"epoch": state.get("epoch"), "donor": donor, "changed": changed, "at_record": at}
    with (run_dir / LOG_NAME).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return str(out)


def adoptions(run_dir: Path) -> list[dict[str, Any]]:
    """The pbt.jsonl records of a trial (empty when it was never exploited)."""
    path = run_dir / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
