"""Apply parallelisms in torchtitan's fixed order: TP, compile, then data parallel over dp."""

from __future__ import annotations

import torch
from torch import nn

from cifar_dist.config.schema import Config
from cifar_dist.parallel.ddp import apply_ddp
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.parallel.sync_norm import convert_sync_batchnorm


def parallelize(
    model: nn.Module, dims: ParallelDims, cfg: Config, device: torch.device
) -> nn.Module:
    """Return the module the training loop calls; `model` itself stays the plain module
    (TP and FSDP2 change it in place, so its state_dict holds DTensors then).

    With pp > 1 this is applied to each pipeline stage's module rather than the whole model.
    """
    if cfg.model.norm == "sync_batch" and dims.dp_enabled:
        # Statistics over the dp group only: tp/pp peers see the same images (or none).
        # Converts in place (the root of our models is never a norm layer), so `model` stays valid.
        assert convert_sync_batchnorm(model, device, dims.group("dp")) is model
    if dims.tp > 1:
        from cifar_dist.parallel.tensor import apply_tp

        apply_tp(model, dims.mesh["tp"], cfg.parallel.sequence_parallel)
    wrapped: nn.Module = model
    if dims.dp_enabled and dims.dp_mode == "fsdp":
        from cifar_dist.parallel.fsdp import apply_fsdp

        apply_fsdp(model, dims.mesh["dp"])
    if cfg.train.compile:
        # DDP(compile(model)), not compile(DDP(model)): the latter silently runs eager.
        wrapped = torch.compile(wrapped)
    if dims.dp_enabled and dims.dp_mode == "ddp":
        wrapped = apply_ddp(wrapped, cfg.parallel, device, dims.group("dp"))
    return wrapped
