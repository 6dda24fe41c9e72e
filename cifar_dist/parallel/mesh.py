"""Parallel degrees -> a validated layout (torchtitan's ParallelDims), and the DeviceMesh for it."""

from __future__ import annotations

from dataclasses import dataclass

from cifar_dist.config.schema import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
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
        return cls(dp=dp, tp=tp, pp=pp, world_size=world_size)

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1
