"""Trainer for layouts on a DeviceMesh whose parameters are DTensors: tensor parallel (dp x tp,
FSDP2 over dp) and FSDP2 alone. The loop is the base Trainer's; what changes is how gradients
are measured, how metrics are reduced and how checkpoints gather the sharded weights."""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cifar_dist.parallel.parallelize import parallelize
from cifar_dist.train.grad_norm import clip_grad_norm
from cifar_dist.train.trainer import Trainer

# Full (unsharded) tensors in the single-process layout, so a checkpoint loads into a plain
# model (`cifar-dist eval`) and into any other layout.
_FULL = StateDictOptions(full_state_dict=True)


class MeshTrainer(Trainer):
    def setup_parallel(self) -> None:
        # Every rank raises the same ConfigError here, before any collective.
        self.dims.check_model(self.model, self.cfg.parallel)
        self.eval_group = self.dims.group("dp")
        self.train_model = parallelize(self.model, self.dims, self.cfg, self.device)

    def clip_gradients(self, max_norm: float) -> float:
        return clip_grad_norm(list(self.model.parameters()), max_norm)

    def model_optim_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # Collective (gathers the shards); every rank calls save(), rank 0 writes.
        model = get_model_state_dict(self.model, options=_FULL)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        return model, optim

    def load_model_optim_state_dict(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        # Every rank holds the full checkpoint; each keeps its own shard of it.
        set_model_state_dict(self.model, model, options=_FULL)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=_FULL)
