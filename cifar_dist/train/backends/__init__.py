"""Training backends by name, chosen once from (parallel.engine, pp > 1).

The one Trainer owns the loop, the callbacks, logging and the checkpoint contents; a backend
owns what differs per layout (base.py lists the hooks): `torch` (plain, DDP, FSDP2, TP and
TP + FSDP2), `pipeline` (torch.distributed.pipelining over pp, with dp or tp) and `deepspeed`
(ZeRO 0-3, or its pipeline engine with pp > 1). A new layout is one Backend subclass and one
registered factory here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cifar_dist.train.callbacks import backend_name
from cifar_dist.utils.registry import Registry

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.train.backends.base import Backend

BackendFactory = Callable[["ParallelDims"], "type[Backend]"]

BACKENDS: Registry[BackendFactory] = Registry("backend", "parallel.engine")
register_backend = BACKENDS.register
list_backends = BACKENDS.names


def backend_for(cfg: Config, dims: ParallelDims) -> type[Backend]:
    """The backend class of the config's layout (imports only that backend's modules)."""
    return BACKENDS.get(backend_name(cfg))(dims)


@register_backend("torch")
def _torch(dims: ParallelDims) -> type[Backend]:
    """Plain, DDP, FSDP2, TP and TP + FSDP2 (a DeviceMesh whenever parameters are DTensors)."""
    from cifar_dist.train.backends.torch_native import TorchBackend

    return TorchBackend


@register_backend("pipeline")
def _pipeline(dims: ParallelDims) -> type[Backend]:
    """torch.distributed.pipelining over pp, with dp (DDP) or tp on the 3-D mesh."""
    from cifar_dist.train.backends.pipeline import PipelineBackend

    return PipelineBackend


@register_backend("deepspeed")
def _deepspeed(dims: ParallelDims) -> type[Backend]:
    """ZeRO 0-3, or DeepSpeed's pipeline engine with pp > 1."""
    if dims.pp > 1:
        from cifar_dist.deepspeed.pipe_backend import DeepSpeedPipeBackend

        return DeepSpeedPipeBackend
    from cifar_dist.deepspeed.backend import DeepSpeedBackend

    return DeepSpeedBackend
