"""Data parallelism: torch DDP configured from ParallelConfig."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cifar_dist.config.schema import ParallelConfig


def apply_ddp(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=cfg.broadcast_buffers,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
    )
