"""parallel.engine=torch, pp = 1: one process, DDP, FSDP2, TP, or TP + FSDP2 on a 2-D mesh.

Layouts on a DeviceMesh (fsdp, tp) hold DTensor parameters: their gradient norm is reduced
over the mesh, metrics over the dp group (tp peers see the same images), and checkpoints
gather full tensors through torch.distributed.checkpoint's state-dict API, so a checkpoint
loads into a plain model (`cifar-dist eval`) and into any other layout.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cifar_dist.parallel.parallelize import parallelize
from cifar_dist.train.backends.base import Backend, Batches
from cifar_dist.train.common import StepResult
from cifar_dist.train.grad_norm import clip_grad_norm

_FULL = StateDictOptions(full_state_dict=True)


class TorchBackend(Backend):
    def prepare(self) -> None:
        t = self.trainer
        self.mesh = t.dims.uses_mesh
        if self.mesh:
            t.dims.check_model(t.model, t.cfg.parallel)  # the same ConfigError on every rank
            t.eval_group = t.dims.group("dp")
        t.train_model = parallelize(t.model, t.dims, t.cfg, t.device)

    def forward_backward(self, batches: Batches) -> StepResult:
        t = self.trainer
        out = StepResult(lr=t.optimizer.param_groups[0]["lr"])
        for i in range(t.accum):
            images, labels = next(batches)
            loss, correct = self._micro_step(images, labels, sync=i == t.accum - 1)
            out.add(loss, correct, labels.shape[0])
        return out

    def _micro_step(
        self, images: torch.Tensor, labels: torch.Tensor, sync: bool
    ) -> tuple[float, float]:
        t = self.trainer
        images, labels = t.prepare_batch(images, labels)
        # DDP all-reduces gradients on the last micro-batch only.
        no_sync = getattr(t.train_model, "no_sync", None)
        ctx = no_sync() if (no_sync and not sync) else contextlib.nullcontext()
        with ctx:
            with t.autocast():
                logits = t.train_model(images)
            loss = t.loss(logits, labels)
            scaled = loss / t.accum
            (t.scaler.scale(scaled) if t.scaler else scaled).backward()
        return float(loss.detach()), t.correct(logits, labels)

    def clip_gradients(self, max_norm: float) -> float:
        if self.mesh:  # DTensor gradients: the norm is reduced over their mesh
            return clip_grad_norm(list(self.trainer.model.parameters()), max_norm)
        return super().clip_gradients(max_norm)

    def model_optim_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self.mesh:
            return super().model_optim_state_dict()
        # Collective (gathers the shards); every rank calls save(), rank 0 writes.
        t = self.trainer
        model = get_model_state_dict(t.model, options=_FULL)
        optim = get_optimizer_state_dict(t.model, t.optimizer, options=_FULL)
        return model, optim

    def load_model_optim_state_dict(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        if not self.mesh:
            return super().load_model_optim_state_dict(model, optim)
        # Every rank holds the full checkpoint; each keeps its own shard of it.
        t = self.trainer
        set_model_state_dict(t.model, model, options=_FULL)
        set_optimizer_state_dict(t.model, t.optimizer, optim, options=_FULL)
        return None
