"""Data parallelism: torch DDP configured from ParallelConfig."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cifar_dist.config.schema import ParallelConfig


def _buffer_sync_kwargs(enabled: bool) -> dict[str, bool]:
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers; older releases know only the
    # former. Both mean: rank 0's buffers (BatchNorm running stats) are broadcast every forward.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": enabled}
    return {"broadcast_buffers": enabled}


def apply_ddp(
    model: nn.Module,
    cfg: ParallelConfig,
    device: torch.device,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """DDP over `process_group` (the dp dimension of the mesh; None = all ranks)."""
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=process_group,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        **_buffer_sync_kwargs(cfg.broadcast_buffers),
    )
