"""Training backends by name, chosen once from (parallel.engine, pp > 1).

A backend owns what differs per layout: preparing the model, which data shard a rank reads,
the step, checkpoint state and the module to evaluate. Today each is still a Trainer subclass
overriding those hooks (the loop, callbacks and logging are the base Trainer's); the registry
is the one place that maps a config to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cifar_dist.train.callbacks import backend_name
from cifar_dist.utils.registry import Registry

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.train.trainer import Trainer

BackendFactory = Callable[["ParallelDims"], "type[Trainer]"]

BACKENDS: Registry[BackendFactory] = Registry("backend", "parallel.engine")
register_backend = BACKENDS.register
list_backends = BACKENDS.names


def trainer_for(cfg: Config, dims: ParallelDims) -> type[Trainer]:
    """The trainer of the config's backend (imports only that backend's modules)."""
    return BACKENDS.get(backend_name(cfg))(dims)


@register_backend("torch")
def _torch(dims: ParallelDims) -> type[Trainer]:
    """Plain, DDP, FSDP2, TP and TP + FSDP2 (a DeviceMesh whenever parameters are DTensors)."""
    if dims.uses_mesh:
        from cifar_dist.train.mesh_trainer import MeshTrainer

        return MeshTrainer
    from cifar_dist.train.trainer import Trainer

    return Trainer


@register_backend("pipeline")
def _pipeline(dims: ParallelDims) -> type[Trainer]:
    """torch.distributed.pipelining over pp, with dp (DDP) or tp on the 3-D mesh."""
    from cifar_dist.train.pipeline_trainer import PipelineTrainer

    return PipelineTrainer


@register_backend("deepspeed")
def _deepspeed(dims: ParallelDims) -> type[Trainer]:
    """ZeRO 0-3, or DeepSpeed's pipeline engine with pp > 1."""
    from cifar_dist.deepspeed.trainer import deepspeed_trainer_class

    return deepspeed_trainer_class(dims)
