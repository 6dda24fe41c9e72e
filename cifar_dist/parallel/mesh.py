"""Parallel degrees -> a validated layout (torchtitan's ParallelDims), and the DeviceMesh for it.

Ranks are laid out row-major over ("pp", "dp", "tp"): tp is the fastest-varying coordinate, so
a tensor-parallel group is made of neighbouring ranks (the same node, on GPUs), and pp the
slowest, so pipeline stages talk point-to-point across the largest distance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

from torch import nn

from cifar_dist.config.schema import ConfigError, ParallelConfig

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp", "tp")


class Coords(NamedTuple):
    """One rank's position in the mesh."""

    pp: int
    dp: int
    tp: int


def validate_tp(cfg: ParallelConfig, dp: int = -1) -> None:
    """Every layout check on parallel.tp, in one place: at config load (dp = -1 when the world
    size decides it) and again with the resolved dp. Model-dependent checks (heads, channel
    widths, GroupNorm groups) are tensor.check_tp's, on the built model."""
    tp, pp = cfg.tp, cfg.pp
    if tp == 1:
        return
    if cfg.engine == "deepspeed":
        raise ConfigError("parallel.tp: tensor parallelism is not available with engine=deepspeed")
    if pp > 1 and cfg.sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel: not available with pp > 1 (pipeline stages exchange "
            "whole activations; sequence parallelism leaves them token-sharded between layers)"
        )
    if pp > 1 and dp > 1:
        raise ConfigError(
            f"parallel.dp: {dp} replicas of a tp x pp layout are not built (tensor-parallel "
            "weights need FSDP2 over dp, which is not applied under pipeline stages here); "
            "use dp = 1 with tp and pp, or drop tp or pp"
        )
    if cfg.dp_mode == "ddp" and dp > 1:
        raise ConfigError(
            "parallel.dp_mode: ddp cannot replicate tensor-parallel (DTensor) parameters; "
            "use fsdp (or auto) with tp > 1"
        )


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int
    dp_mode: str = "ddp"
    """Resolved `parallel.dp_mode`: ddp or fsdp."""
    device_type: str = field(default="cpu", compare=False)

    @classmethod
    def from_config(
        cls, cfg: ParallelConfig, world_size: int, device_type: str = "cpu"
    ) -> ParallelDims:
        tp, pp = cfg.tp, cfg.pp
        if world_size % (tp * pp) != 0:
            raise ConfigError(
                f"parallel: tp*pp = {tp}*{pp} = {tp * pp} does not divide world size {world_size}"
            )
        dp = world_size // (tp * pp) if cfg.dp == -1 else cfg.dp
        if dp * tp * pp != world_size:
            raise ConfigError(
                f"parallel: dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} != world size {world_size}"
            )
        validate_tp(cfg, dp)
        mode = cfg.dp_mode
        if mode == "auto":
            mode = "fsdp" if tp > 1 else "ddp"
        return cls(
            dp=dp, tp=tp, pp=pp, world_size=world_size, dp_mode=mode, device_type=device_type
        )

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def uses_mesh(self) -> bool:
        """True when a DeviceMesh is needed (tensor or pipeline parallel, or FSDP)."""
        return self.world_size > 1 and (self.tp > 1 or self.pp > 1 or self.dp_mode == "fsdp")

    def coords(self, rank: int) -> Coords:
        """(pp, dp, tp) coordinates of a global rank; the same layout as `mesh`."""
        return Coords(
            pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp
        )

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    @cached_property
    def mesh(self) -> DeviceMesh:
        """The 3-D ("pp", "dp", "tp") DeviceMesh (built on first use: every rank must ask)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            self.device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIMS
        )

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along one mesh dimension (None = the whole world, when 1-D)."""
        if not self.uses_mesh:
            return None
        return self.mesh[dim].get_group()

    def check_model(self, model: nn.Module, cfg: ParallelConfig) -> None:
        """Model-dependent checks; the same ConfigError on every rank, before any collective."""
        if self.pp > 1:
            from cifar_dist.parallel.pipeline import check_pipeline

            check_pipeline(model, self.pp * cfg.stages_per_rank, cfg.split_points)
        if self.tp > 1:
            from cifar_dist.parallel.tensor import check_tp

            check_tp(model, self.tp)
