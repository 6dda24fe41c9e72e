"""The DeepSpeed JSON, generated from the project config (the one source of truth).

Which project key becomes which DeepSpeed key (`OWNED`), and back (`project_view`): the user
JSON of `deepspeed.config` may add or change anything else (ZeRO tuning, communication, offload,
logging), but not these, so the data loader, the schedule and the JSON can never disagree.

Schedules with deepspeed.scheduler=deepspeed (DeepSpeed's runtime/lr_schedules.py):
  constant  -> WarmupLR (linear warm-up from lr/(W+1); with no warm-up min = max = lr)
  cosine    -> WarmupCosineLR (linear warm-up; cos_min_ratio = schedule.min_lr_ratio)
  onecycle  -> OneCycle (same start lr/25, peak lr and peak step as torch's OneCycleLR, but
               linear instead of cosine ramps, ending at lr/25 instead of ~0; momentum cycles
               0.95 -> 0.85 -> 0.95 for AdamW's beta1 only: DeepSpeed cannot cycle SGD momentum)
  multistep -> none (refused at config load)
DeepSpeed's warm-ups start one step later than torch's LinearLR (its first step() is step 0;
WarmupCosineLR runs the very first optimiser step at lr 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.utils.lr import scaled_lr

# DeepSpeed key path -> the project key that sets it.
OWNED: dict[str, str] = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size / (dp * train.grad_accum)",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.clip_norm",
    "bf16.enabled": "train.amp",
    "fp16.enabled": "train.amp",
    "torch_autocast.enabled": "train.amp",
    "zero_optimization.stage": "deepspeed.zero_stage",
}


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The same warm-up length optim.build_scheduler uses."""
    total = max(1, steps_per_epoch * cfg.train.epochs)
    return min(int(round(cfg.schedule.warmup_epochs * steps_per_epoch)), total - 1)


def optimizer_section(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's AdamW (FusedAdam on GPU) with the project's hyperparameters."""
    o = cfg.optim
    return {
        "type": "AdamW",
        "params": {
            "lr": scaled_lr(o, cfg.data.batch_size),
            "betas": [o.momentum, o.beta2],
            "eps": 1e-8,  # torch.optim.AdamW's default, so both optimisers agree
            "weight_decay": o.weight_decay,
        },
    }


def scheduler_section(cfg: Config, steps_per_epoch: int) -> dict[str, Any]:
    """The DeepSpeed schedule closest to schedule.* (mapping in the module docstring)."""
    s, lr = cfg.schedule, scaled_lr(cfg.optim, cfg.data.batch_size)
    total = max(1, steps_per_epoch * cfg.train.epochs)
    warm = warmup_steps(cfg, steps_per_epoch)
    if s.name == "constant":
        start = lr / (warm + 1) if warm else lr  # warm == 0: min == max, a constant lr
        params = {"warmup_min_lr": start, "warmup_max_lr": lr, "warmup_num_steps": max(warm, 1)}
        return {"type": "WarmupLR", "params": {**params, "warmup_type": "linear"}}
    if s.name == "cosine":
        params = {
            "total_num_steps": total,
            # DeepSpeed always warms up for >= 2 steps: with none wanted, start at ratio 1.
            "warmup_min_ratio": 1.0 / (warm + 1) if warm else 1.0,
            "warmup_num_steps": max(warm, 1),
            "cos_min_ratio": s.min_lr_ratio,
            "warmup_type": "linear",
        }
        return {"type": "WarmupCosineLR", "params": params}
    if s.name == "onecycle":
        up = max(1, int(round(s.pct_start * total)))
        adam = cfg.optim.name == "adamw"
        params = {
            "cycle_min_lr": lr / 25.0,  # torch OneCycleLR: initial lr = max_lr / div_factor (25)
            "cycle_max_lr": lr,
            "cycle_first_step_size": up,
            "cycle_second_step_size": max(1, total - up),
            "decay_lr_rate": 0.0,
            "cycle_momentum": adam,
        }
        if adam:
            params.update(cycle_min_mom=0.85, cycle_max_mom=0.95)
        return {"type": "OneCycle", "params": params}
    raise ConfigError(f"deepspeed.scheduler: no DeepSpeed schedule for schedule.name={s.name}")


def generate(cfg: Config, dp: int, steps_per_epoch: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this project config and data-parallel degree."""
    t = cfg.train
    accum = t.grad_accum
    if cfg.data.batch_size % (dp * accum):
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by dp*grad_accum = {dp * accum}"
        )
    bucket = int(cfg.parallel.bucket_cap_mb * 2**20 / 4)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // (dp * accum),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.clip_norm,  # 0 = off, as in the project config
        "bf16": {"enabled": t.amp == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0), DeepSpeed's standard GPU setting.
        "fp16": {"enabled": t.amp == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # DeepSpeed (>= 0.19) casts parameters only; BatchNorm's running statistics would stay
        # fp32 and batch_norm refuses bf16 weights with fp32 statistics. Cast buffers too.
        **({"data_types": {"buffer_dtype": t.amp}} if t.amp != "none" else {}),
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            # parallel.bucket_cap_mb in fp32 elements. DeepSpeed's default (5e8 elements, 2 GB)
            # is allocated afresh every micro-step: ~0.7 s a step on CPU for a 2M-param model.
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        # We log through our sinks; DeepSpeed's own progress lines would repeat them per rank.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.optimizer == "torch":
        # ZeRO refuses optimisers it has not been tested with (torch SGD) unless told to.
        ds["zero_allow_untested_optimizer"] = True
    else:
        ds["optimizer"] = optimizer_section(cfg)
    if cfg.deepspeed.scheduler == "deepspeed":
        ds["scheduler"] = scheduler_section(cfg, steps_per_epoch)
    return ds


def _get(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def project_view(ds: dict[str, Any]) -> dict[str, Any]:
    """The project settings a DeepSpeed JSON encodes (the inverse of `generate`)."""
    amp = "bf16" if _get(ds, "bf16.enabled") else "fp16" if _get(ds, "fp16.enabled") else "none"
    return {
        "data.batch_size": ds["train_batch_size"],
        "micro_batch": ds["train_micro_batch_size_per_gpu"],
        "train.grad_accum": ds["gradient_accumulation_steps"],
        "train.clip_norm": float(ds.get("gradient_clipping", 0.0)),
        "train.amp": amp,
        "deepspeed.zero_stage": _get(ds, "zero_optimization.stage") or 0,
    }


def read_user_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: {p} not found")
    try:
        tree = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"deepspeed.config: {p} must hold a JSON object")
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v) if both else v
    return out


def merge_user(generated: dict[str, Any], user: dict[str, Any], source: str) -> dict[str, Any]:
    """`user` over `generated`; a user value for a project-owned key must agree with ours."""
    for path, project_key in OWNED.items():
        mine, theirs = _get(generated, path), _get(user, path)
        if theirs is not None and theirs != (mine if mine is not None else False):
            raise ConfigError(
                f"deepspeed.config: {source} sets {path}={theirs!r} but the project config gives "
                f"{mine!r}; set {project_key} instead"
            )
    for section, key in (
        ("optimizer", "deepspeed.optimizer"),
        ("scheduler", "deepspeed.scheduler"),
    ):
        if section in user and section not in generated:
            raise ConfigError(
                f"deepspeed.config: {source} has an '{section}' section but {key}=torch "
                f"(the project's); set {key}=deepspeed to use DeepSpeed's"
            )
    return _merge(generated, user)


def build(cfg: Config, dp: int, steps_per_epoch: int) -> dict[str, Any]:
    """The generated JSON with `deepspeed.config` (if any) merged over it."""
    ds = generate(cfg, dp, steps_per_epoch)
    if cfg.deepspeed.config:
        ds = merge_user(ds, read_user_json(cfg.deepspeed.config), cfg.deepspeed.config)
    return ds
