"""Apply parallelisms in torchtitan's fixed order: (TP), compile, then data parallel."""

from __future__ import annotations

import torch
from torch import nn

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.parallel.ddp import apply_ddp
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.parallel.sync_norm import convert_sync_batchnorm


def parallelize(
    model: nn.Module, dims: ParallelDims, cfg: Config, device: torch.device
) -> nn.Module:
    """Return the module the training loop calls; `model` itself stays the plain module."""
    if dims.tp > 1 or dims.pp > 1:
        raise ConfigError("parallel: tp/pp > 1 are not available in this version (use dp only)")
    if cfg.model.norm == "sync_batch" and dims.dp_enabled:
        # Converts in place (the root of our models is never a norm layer), so `model` stays valid.
        assert convert_sync_batchnorm(model, device) is model
    wrapped: nn.Module = model
    if cfg.train.compile:
        # DDP(compile(model)), not compile(DDP(model)): the latter silently runs eager.
        wrapped = torch.compile(wrapped)
    if dims.dp_enabled:
        wrapped = apply_ddp(wrapped, cfg.parallel, device)
    return wrapped
