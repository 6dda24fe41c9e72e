"""Cross-section checks for parallel.engine=deepspeed, run by Config.__post_init__.

Kept out of schema.py so the schema stays one screen per section; every message names the key
the user has to change and says why DeepSpeed cannot do what was asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar_dist.config.schema import ConfigError

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config


def check_deepspeed(cfg: Config) -> None:
    ds, par, train = cfg.deepspeed, cfg.parallel, cfg.train
    if par.pp > 1 and ds.zero_stage > 1:
        raise ConfigError(
            f"deepspeed.zero_stage: DeepSpeed's pipeline engine (parallel.pp={par.pp}) supports "
            f"ZeRO stage 0 or 1 only, got {ds.zero_stage} (ZeRO-2/3 shard gradients/parameters "
            "that the pipeline schedule accumulates across micro-batches)"
        )
    if par.pp > 1 and par.pp_split is not None:
        raise ConfigError(
            "parallel.pp_split: engine=deepspeed cuts its pipeline by deepspeed.partition; "
            "pp_split is for engine=torch"
        )
    if train.dtype == "float64" and (ds.zero_stage not in (1, 2) or par.pp > 1):
        # Measured with deepspeed 0.19: stage 0 asserts "unsupported grad type: torch.float64",
        # ZeRO-3 allows only half/bfloat16/float, the pipeline engine is untested with float64.
        raise ConfigError(
            "train.dtype: float64 with DeepSpeed works only with deepspeed.zero_stage=1 or 2 "
            "and no pipeline; use float32"
        )
    if train.amp in ("bf16", "fp16") and train.dtype == "float64":
        raise ConfigError("train.amp: mixed precision and train.dtype=float64 exclude each other")
    if train.compile:
        raise ConfigError("train.compile: not available with engine=deepspeed in this version")
    if par.pp > 1 and cfg.model.norm == "sync_batch":
        raise ConfigError(
            "model.norm: sync_batch cannot run in DeepSpeed's pipeline engine (each stage sees "
            "different micro-batches at different times); use group"
        )
    if ds.optimizer == "deepspeed" and cfg.optim.name != "adamw":
        raise ConfigError(
            f"deepspeed.optimizer: DeepSpeed has no {cfg.optim.name} optimizer; use "
            "deepspeed.optimizer=torch (the project's optimiser) or optim.name=adamw"
        )
    if ds.scheduler == "deepspeed" and cfg.schedule.name == "multistep":
        raise ConfigError(
            "deepspeed.scheduler: DeepSpeed has no multistep schedule; use "
            "deepspeed.scheduler=torch (the project's schedule)"
        )
