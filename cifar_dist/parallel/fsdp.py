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
    _make_params_contiguous(model)
    if isinstance(model, PipelineModel):
        for layer in model.pipeline_layers():
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def _make_params_contiguous(model: nn.Module) -> None:
    """fully_shard refuses non-contiguous parameters, and train.channels_last makes conv weights
    channels_last. Weights go back to the standard layout (tp-sharded DTensors too: their global
    strides are what FSDP checks); images stay channels_last and a convolution follows its
    input's memory format, so the fast kernels are kept. Runs before the optimiser exists."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_contiguous():
                fresh = nn.Parameter(param.detach().contiguous(), param.requires_grad)
                setattr(module, name, fresh)
