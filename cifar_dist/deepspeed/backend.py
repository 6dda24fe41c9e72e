"""parallel.engine=deepspeed: DeepSpeed's engine owns the step (ZeRO 0-3).

DeepSpeed's engine does what the torch backend's forward_backward/optimizer_step do by hand:
`engine.backward` divides the loss by gradient_accumulation_steps and reduces gradients
(all-reduce, or reduce-scatter from ZeRO-2 on), and `engine.step()`, called after every
micro-batch, applies clipping, the optimiser and the LR schedule only at the accumulation
boundary. Checkpoints are DeepSpeed's (see checkpoint.py) with the Trainer's state (TrainState,
RNG, callbacks) as client state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cifar_dist.deepspeed import checkpoint as ds_checkpoint
from cifar_dist.deepspeed import ds_json
from cifar_dist.deepspeed.runtime import initialize, prepare_runtime, write_ds_config
from cifar_dist.parallel.sync_norm import convert_sync_batchnorm
from cifar_dist.train.backends.base import Backend, Batches
from cifar_dist.train.checkpoint import CheckpointError
from cifar_dist.train.common import StepResult, build_model
from cifar_dist.train.optim import (
    adamw_param_groups,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    torch_lr_and_decay,
)
from cifar_dist.utils.dist import all_reduce_sum, barrier


class DeepSpeedBackend(Backend):
    # Whether forward_backward can take the gradient norm before engine.step() clips it (stage
    # 0 only). The pipeline engine all-reduces, clips and steps inside train_batch(): there only
    # the optimiser's step pre-hook sees the gradients, already clipped.
    norm_before_clip = True

    # ----- set-up ------------------------------------------------------------------------------
    def prepare(self) -> None:
        t = self.trainer
        prepare_runtime(t.device)
        if t.cfg.model.norm == "sync_batch" and t.dims.dp_enabled:
            # In place (the root of our models is never a norm layer), as parallelize() does.
            convert_sync_batchnorm(t.model, t.device)
        if t.cfg.train.channels_last:
            # deepspeed.initialize broadcasts every parameter as `p.data.view(torch.uint8)`,
            # which needs stride(-1) == 1 (a channels_last conv weight has C_in there), and its
            # ZeRO/bf16 optimisers re-point parameters into flat contiguous buffers anyway. So
            # the weights stay contiguous; the images are still channels_last (_batch), and a
            # convolution follows its input's memory format.
            t.model.to(memory_format=torch.contiguous_format)
        self.ds_module: nn.Module = t.model
        t.train_model = t.model  # the engine, once build_optimizer has built it

    def build_optimizer(self) -> None:
        t = self.trainer
        cfg = t.cfg
        self.ds_config = ds_json.build(cfg, t.dims.dp, t.steps_per_epoch)
        optimizer: torch.optim.Optimizer | None = None
        scheduler: Any = None

        def torch_schedule(opt: torch.optim.Optimizer) -> Any:
            return build_scheduler(opt, cfg.schedule, t.steps_per_epoch, cfg.train.epochs)

        if cfg.deepspeed.optimizer == "torch":
            optimizer = build_optimizer(self.ds_module, cfg.optim, cfg.data.batch_size)
        if cfg.deepspeed.scheduler == "torch":
            # A callable: DeepSpeed calls it with the optimiser it built (or ours).
            scheduler = torch_schedule
        # For DeepSpeed's own optimiser (AdamW only): the same groups as the torch path.
        batch = cfg.data.batch_size
        lr, _ = torch_lr_and_decay(cfg.optim, scaled_lr(cfg.optim, batch), batch)
        groups = adamw_param_groups(self.ds_module, cfg.optim, lr)
        self.check_param_groups(optimizer.param_groups if optimizer is not None else groups)
        self.engine = initialize(self.ds_module, self.ds_config, optimizer, scheduler, groups)
        ds_checkpoint.install_safe_engine(self.engine)
        t.train_model = self.engine
        # The torch optimiser underneath DeepSpeed's wrappers: its param_groups carry the lr.
        t.optimizer = self.engine.basic_optimizer
        t.scheduler = self.engine.lr_scheduler
        t.dtype = next(self.engine.module.parameters()).dtype  # bf16 weights under bf16
        self._ds_skipped = 0
        self._local_norm_sq: float | None = None
        # Stage 0 in fp32: DeepSpeed steps our optimiser directly and keeps no grad norm, so we
        # take it ourselves between the boundary's backward (gradients all-reduced there) and
        # engine.step() (which clips them): the pre-clip norm, as ZeRO and DDP report it.
        self._own_norm = self.engine.optimizer is t.optimizer
        if self._own_norm and not self.norm_before_clip:
            t.optimizer.register_step_pre_hook(lambda opt, *_: self._record_grad_norm(opt))
        if t.info.is_main:
            write_ds_config(self.ds_config, t.run_dir / "ds_config.json")

    def check_param_groups(self, groups: list[dict]) -> None:
        """Hook: refuse optimiser parameter groups the engine cannot handle (pipeline only)."""

    # ----- one optimiser step ------------------------------------------------------------------
    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.trainer
        images = images.to(t.device, t.dtype, non_blocking=True)
        images = images.contiguous(memory_format=t.memory_format)
        labels = labels.to(t.device, non_blocking=True)
        if labels.is_floating_point():  # soft labels: float32 even under bf16 weights
            labels = labels.float()
        return images, labels

    def forward_backward(self, batches: Batches) -> StepResult:
        t = self.trainer
        out = StepResult(lr=float(self.engine.get_lr()[0]))
        for _ in range(t.accum):
            images, labels = self._batch(*next(batches))
            logits = self.engine(images)
            loss = t.loss(logits, labels)
            self.engine.backward(loss)
            if self._own_norm and self.engine.is_gradient_accumulation_boundary():
                self._record_grad_norm(t.optimizer)
            self.engine.step()  # updates only at the accumulation boundary
            out.add(float(loss.detach()), t.correct(logits, labels), len(labels))
        return out

    def _record_grad_norm(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._local_norm_sq = float(torch.nn.utils.get_total_norm(grads)) ** 2 if grads else 0.0

    def _grad_norm(self) -> float | None:
        """The global gradient norm of this step, or None where DeepSpeed reports none."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            return float(norm)
        if self._local_norm_sq is None:
            return None
        # Every data-parallel replica holds the same (averaged) gradients of its own stage, so
        # the world-wide sum counts each stage's share dp times. Stage 0 only.
        t = self.trainer
        return math.sqrt(all_reduce_sum(self._local_norm_sq, t.device) / t.dims.dp)

    def optimizer_step(self, losses: list[float]) -> tuple[float, bool]:
        """The engine has stepped already: the non-finite and stop decisions, identically on
        every rank. DeepSpeed decides the update itself: ZeRO in fp32/fp16 skips a step whose
        gradient norm is not finite (counted), stage 0 and bf16 apply it; we count and stop."""
        t = self.trainer
        norm = self._grad_norm()
        # fp16: overflowing steps are the loss scaler's business (DeepSpeed skips them).
        norm_ok = norm is None or t.cfg.train.amp == "fp16" or math.isfinite(norm)
        finite = t.agree(norm_ok and all(math.isfinite(v) for v in losses))
        skipped = self.engine.skipped_steps - self._ds_skipped
        if skipped:  # DeepSpeed dropped the update
            t.state.skipped_steps += skipped
            self._ds_skipped = self.engine.skipped_steps
        if norm is None:
            norm = math.nan  # logged as NaN: this DeepSpeed optimiser keeps no norm
        if not finite:
            t.count_nonfinite_step()
            return norm, False
        t.state.nonfinite_run = 0
        return norm, not skipped

    # ----- evaluation --------------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        self._sync_buffers()
        return (
            self._gathered_copy()
            if self.trainer.cfg.deepspeed.zero_stage == 3
            else self.trainer.model
        )

    def _sync_buffers(self) -> None:
        """Ranks' BatchNorm running statistics drift apart (DeepSpeed, unlike DDP, does not
        broadcast buffers): evaluate, and checkpoint, rank 0's on every rank."""
        if self.trainer.info.distributed:
            for buf in self.trainer.model.buffers():
                dist.broadcast(buf, src=0)

    def _gathered_copy(self) -> nn.Module:
        """ZeRO-3 keeps 1/dp of each parameter per rank: evaluate a full plain copy instead of
        the engine, whose forward gathers parameters collectively (ranks' eval shards may hold
        different numbers of batches)."""
        from deepspeed.runtime.zero import GatheredParameters

        t = self.trainer
        plain = build_model(t.cfg, t.device).to(t.dtype)
        params = list(t.model.parameters())
        with GatheredParameters(params, modifier_rank=None), torch.no_grad():
            for mine, full in zip(plain.parameters(), params):
                mine.copy_(full.detach())
        for mine, buf in zip(plain.buffers(), t.model.buffers()):
            mine.copy_(buf)
        return plain

    # ----- checkpoints: DeepSpeed saves model, optimiser and schedule itself -------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def load_checkpoint_state(self, ckpt: dict[str, Any]) -> None:
        self._ds_skipped = self.engine.skipped_steps  # the engine loaded its own part

    def write_checkpoint(self, state: dict[str, Any]) -> Path | None:
        t = self.trainer
        save_dir = t.run_dir / "checkpoints"
        tag = ds_checkpoint.tag_for(t.state.step)
        self._sync_buffers()
        client = {ds_checkpoint.CLIENT_KEY: state}
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client, save_latest=False)
        if t.info.is_main:  # save_checkpoint ends in a barrier: every rank's files are there
            ds_checkpoint.commit_latest(save_dir, tag)
        barrier()
        return save_dir / tag if t.info.is_main else None

    def read_checkpoint(self, spec: str) -> dict[str, Any] | None:
        """Loads the engine's part (weights, optimiser, schedule) and returns ours."""
        if spec == "auto":
            save_dir = self.trainer.run_dir / "checkpoints"
            tag = ds_checkpoint.read_latest(save_dir)
            if tag is None:
                return None
        else:
            save_dir, tag = ds_checkpoint.resolve(Path(spec))
        try:
            path, client = self.engine.load_checkpoint(
                str(save_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except CheckpointError:
            raise
        except Exception as e:  # DeepSpeed asserts on a layout it cannot load
            raise CheckpointError(
                f"checkpoint {save_dir / tag}: DeepSpeed could not load it "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
            ) from None
        ours = (client or {}).get(ds_checkpoint.CLIENT_KEY)
        if path is None or ours is None:
            raise CheckpointError(f"checkpoint {save_dir / tag}: not a cifar-dist DeepSpeed save")
        return ours
