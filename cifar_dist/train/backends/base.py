"""The hooks a training backend implements, and the parts the torch-optimiser backends share.

A backend is built once per run by the Trainer (`backend = cls(trainer)`) and reads the
trainer's config, model and state. It sets what the loop, the callbacks and logging use on the
trainer: `train_model` (what train()/eval() toggle), `eval_group`, `optimizer`, `scheduler`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cifar_dist.train.common import StepResult
from cifar_dist.train.optim import build_optimizer, build_scheduler
from cifar_dist.utils.dist import all_reduce_sum

if TYPE_CHECKING:
    from cifar_dist.train.trainer import Trainer

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class Backend:
    eval_copies = 1
    """How many times evaluation counts each sample world-wide (the confusion matrix is divided
    by it; ratios are unchanged)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @staticmethod
    def data_rank(rank: int, dims: ParallelDims) -> int:
        """Which data-parallel shard global rank `rank` reads: its dp coordinate on the mesh
        (tensor- and pipeline-parallel peers of one replica read the same batches)."""
        return dims.coords(rank).dp

    # ----- set-up ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Split / wrap `trainer.model` for the layout; sets `trainer.train_model`."""
        raise NotImplementedError

    def optim_module(self) -> nn.Module:
        """The module whose parameters this rank's optimiser steps."""
        return self.trainer.model

    def build_optimizer(self) -> None:
        t = self.trainer
        cfg = t.cfg
        t.optimizer = build_optimizer(self.optim_module(), cfg.optim, cfg.data.batch_size)
        t.scheduler = build_scheduler(
            t.optimizer, cfg.schedule, t.steps_per_epoch, cfg.train.epochs
        )

    # ----- one optimiser step ------------------------------------------------------------------
    def forward_backward(self, batches: Batches) -> StepResult:
        """Forward and backward over `grad_accum` micro-batches drawn from `batches`; gradients
        are reduced across data-parallel ranks when this returns."""
        raise NotImplementedError

    def clip_gradients(self, max_norm: float) -> float:
        """Global gradient norm (before clipping), clipping to `max_norm` (inf = measure only)."""
        return float(torch.nn.utils.clip_grad_norm_(self.optim_module().parameters(), max_norm))

    def optimizer_step(self, losses: list[float]) -> tuple[float, bool]:
        """Clip, agree across ranks on finiteness, step (or skip); (grad norm, step applied)."""
        t = self.trainer
        if t.scaler:
            t.scaler.unscale_(t.optimizer)
        for cb in t.callbacks:
            cb.before_optimizer_step(t)
        norm = self.clip_gradients(t.cfg.train.clip_norm or math.inf)
        finite = all(math.isfinite(v) for v in losses) and (
            t.scaler is not None or math.isfinite(norm)
        )
        finite = t.agree(finite)
        if not finite:
            t.optimizer.zero_grad(set_to_none=True)
            if t.scaler:
                t.scaler.update()
            t.state.skipped_steps += 1
            t.count_nonfinite_step()
            return norm, False
        if t.scaler:
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()
        t.state.nonfinite_run = 0
        return norm, True

    # ----- weights -----------------------------------------------------------------------------
    def live_state(self) -> dict[str, torch.Tensor]:
        """This rank's live parameters and buffers under the full model's names (what the
        recipe callbacks average): DTensors for tp / fsdp, a pipeline rank's own stages."""
        return self.trainer.model.state_dict(keep_vars=True)

    def eval_module(self) -> nn.Module:
        """What evaluation calls on a batch of images (every rank of the job calls it)."""
        return self.trainer.model

    # ----- checkpoints -------------------------------------------------------------------------
    def model_optim_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        t = self.trainer
        return t.model.state_dict(), t.optimizer.state_dict()

    def load_model_optim_state_dict(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        t = self.trainer
        t.model.load_state_dict(model)
        t.optimizer.load_state_dict(optim)

    def checkpoint_state(self) -> dict[str, Any]:
        """The weights, optimiser, schedule and loss-scaler part of a checkpoint."""
        t = self.trainer
        model, optim = self.model_optim_state_dict()
        return {
            "model": model,
            "optimizer": optim,
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler else None,
        }

    def load_checkpoint_state(self, ckpt: dict[str, Any]) -> None:
        t = self.trainer
        self.load_model_optim_state_dict(ckpt["model"], ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        if t.scaler and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])

    def localize(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint as this rank loads it (a pipeline rank: its own shard's entries)."""
        return ckpt

    def write_checkpoint(self, state: dict[str, Any]) -> Path | None:
        """Write the trainer's `state` (collective); the path rank 0 wrote, else None."""
        t = self.trainer
        path, error = None, None
        if t.info.is_main:
            try:
                path = save_checkpoint(state, t.run_dir / "checkpoints", t.state.step)
            except CheckpointError as e:
                error = e
        # Every rank learns whether rank 0's write failed and stops with it (a rank that went
        # on would wait in its next collective for a peer that has left).
        if all_reduce_sum(float(error is not None), t.device) > 0:
            raise error or CheckpointError(
                f"checkpoint at step {t.state.step}: rank 0 could not write it (see its error)"
            )
        return path

    def read_checkpoint(self, spec: str) -> dict[str, Any] | None:
        """The checkpoint train.resume names ('auto' = the newest valid one), None if none."""
        t = self.trainer
        if spec == "auto":
            found = latest_checkpoint(
                t.run_dir / "checkpoints", map_location=t.device, warn=t.info.is_main
            )
            return None if found is None else found[1]
        return load_checkpoint(Path(spec), map_location=t.device)
