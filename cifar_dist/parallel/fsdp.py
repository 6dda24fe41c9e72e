"""Sharded data parallelism: FSDP2 (`fully_shard`) over the dp mesh dimension.

Used with tensor parallelism, where DDP cannot replicate DTensor parameters: FSDP2 shards each
(already tp-sharded) parameter again along dp, giving 2-D (dp, tp) DTensors, as in torchtitan.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from cifar_dist.models.registry import PipelineModel


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place: each pipeline layer is its own FSDP unit (its parameters are
    gathered just before it runs and freed after), the root takes whatever is left."""
    if isinstance(model, PipelineModel):
        for layer in model.pipeline_layers():
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model
