"""parallel.engine=deepspeed: the Trainer with DeepSpeed owning the step (ZeRO 0-3).

DeepSpeed's engine does what Trainer._micro_step/_optimizer_step do by hand: `engine.backward`
divides the loss by gradient_accumulation_steps and reduces gradients (all-reduce, or
reduce-scatter from ZeRO-2 on), and `engine.step()`, called after every micro-batch, applies
clipping, the optimiser and the LR schedule only at the accumulation boundary. Checkpoints are
DeepSpeed's (see checkpoint.py), resumed with our TrainState, RNG and sampler position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cifar_dist.config.load import config_to_dict
from cifar_dist.deepspeed import checkpoint as ds_checkpoint
from cifar_dist.deepspeed import ds_json
from cifar_dist.deepspeed.runtime import initialize, prepare_runtime, write_ds_config
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.parallel.sync_norm import convert_sync_batchnorm
from cifar_dist.train.checkpoint import CheckpointError
from cifar_dist.train.common import StepResult, build_model
from cifar_dist.train.optim import (
    adamw_param_groups,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    torch_lr_and_decay,
)
from cifar_dist.train.state import TrainState
from cifar_dist.train.trainer import Trainer
from cifar_dist.utils.dist import all_reduce_sum, barrier
from cifar_dist.utils.seed import rng_state, set_rng_state


def deepspeed_trainer_class(dims: ParallelDims) -> type[Trainer]:
    if dims.pp > 1:
        from cifar_dist.deepspeed.pipe_trainer import DeepSpeedPipeTrainer

        return DeepSpeedPipeTrainer
    return DeepSpeedTrainer


class DeepSpeedTrainer(Trainer):
    # ----- set-up ------------------------------------------------------------------------------
    def setup_parallel(self) -> None:
        prepare_runtime(self.device)
        if self.cfg.model.norm == "sync_batch" and self.dims.dp_enabled:
            # In place (the root of our models is never a norm layer), as parallelize() does.
            convert_sync_batchnorm(self.model, self.device)
        if self.cfg.train.channels_last:
            # deepspeed.initialize broadcasts every parameter as `p.data.view(torch.uint8)`,
            # which needs stride(-1) == 1 (a channels_last conv weight has C_in there), and its
            # ZeRO/bf16 optimisers re-point parameters into flat contiguous buffers anyway. So
            # the weights stay contiguous; the images are still channels_last (_batch), and a
            # convolution follows its input's memory format.
            self.model.to(memory_format=torch.contiguous_format)
        self.ds_module: nn.Module = self.model
        self.train_model = self.model  # the engine, once setup_optim has built it

    def setup_optim(self) -> None:
        cfg = self.cfg
        self.ds_config = ds_json.build(cfg, self.dims.dp, self.steps_per_epoch)
        optimizer: torch.optim.Optimizer | None = None
        scheduler: Any = None

        def torch_schedule(opt: torch.optim.Optimizer) -> Any:
            return build_scheduler(opt, cfg.schedule, self.steps_per_epoch, cfg.train.epochs)

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
        self.train_model = self.engine
        # The torch optimiser underneath DeepSpeed's wrappers: its param_groups carry the lr.
        self.optimizer = self.engine.basic_optimizer
        self.scheduler = self.engine.lr_scheduler
        self.dtype = next(self.engine.module.parameters()).dtype  # bf16 weights under bf16
        self._ds_skipped = 0
        self._local_norm_sq: float | None = None
        if self.engine.optimizer is self.optimizer:
            # Stage 0 in fp32: DeepSpeed steps our optimiser directly and keeps no grad norm.
            self.optimizer.register_step_pre_hook(self._record_grad_norm)
        if self.info.is_main:
            write_ds_config(self.ds_config, self.run_dir / "ds_config.json")

    def check_param_groups(self, groups: list[dict]) -> None:
        """Hook: refuse optimiser parameter groups the engine cannot handle (pipeline only)."""

    # ----- one optimiser step ------------------------------------------------------------------
    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        images = images.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=fmt)
        labels = labels.to(self.device, non_blocking=True)
        if labels.is_floating_point():  # soft labels from mixup/cutmix
            labels = labels.float()
        return images, labels

    @staticmethod
    def _correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
        hard = labels if labels.ndim == 1 else labels.argmax(dim=1)
        return float((logits.argmax(dim=1) == hard).sum())

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        out = StepResult(lr=float(self.engine.get_lr()[0]))
        for _ in range(self.accum):
            images, labels = self._batch(*next(batches))
            logits = self.engine(images)
            loss = self._loss(logits, labels)
            self.engine.backward(loss)
            self.engine.step()  # updates only at the accumulation boundary
            out.add(float(loss.detach()), self._correct(logits.detach(), labels), len(labels))
        out.grad_norm = self._after_step(out.losses)
        return out

    def _record_grad_norm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
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
        # the world-wide sum counts each stage's share dp times. Stage 0 only, after clipping.
        return math.sqrt(all_reduce_sum(self._local_norm_sq, self.device) / self.dims.dp)

    def _after_step(self, losses: list[float]) -> float:
        """Non-finite and stop decisions, taken identically on every rank (one all-reduce)."""
        norm = self._grad_norm()
        # fp16: overflowing steps are the loss scaler's business (DeepSpeed skips them).
        norm_ok = norm is None or self.cfg.train.amp == "fp16" or math.isfinite(norm)
        finite = norm_ok and all(math.isfinite(v) for v in losses)
        self.stop_requested = self.signal_received is not None
        if self.info.distributed:
            flags = torch.tensor(
                [float(not finite), float(self.stop_requested)], device=self.device
            )
            dist.all_reduce(flags)
            finite, self.stop_requested = bool(flags[0] == 0), bool(flags[1] > 0)
        if self.engine.skipped_steps > self._ds_skipped:  # DeepSpeed dropped the update
            self.state.skipped_steps += self.engine.skipped_steps - self._ds_skipped
            self._ds_skipped = self.engine.skipped_steps
        if norm is None:
            norm = math.nan  # logged as NaN: this DeepSpeed optimiser keeps no norm
        if finite:
            self.state.nonfinite_run = 0
            return norm
        # DeepSpeed decides the update itself: ZeRO in fp32/fp16 skips a step whose gradient
        # norm is not finite (counted above), stage 0 and bf16 apply it. We count and stop.
        self.count_nonfinite_step()
        return norm

    # ----- evaluation --------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        self._sync_buffers()
        return self._gathered_copy() if self.cfg.deepspeed.zero_stage == 3 else self.model

    def _sync_buffers(self) -> None:
        """Ranks' BatchNorm running statistics drift apart (DeepSpeed, unlike DDP, does not
        broadcast buffers): evaluate, and checkpoint, rank 0's on every rank."""
        if self.info.distributed:
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)

    def _gathered_copy(self) -> nn.Module:
        """ZeRO-3 keeps 1/dp of each parameter per rank: evaluate a full plain copy instead of
        the engine, whose forward gathers parameters collectively (ranks' eval shards may hold
        different numbers of batches)."""
        from deepspeed.runtime.zero import GatheredParameters

        plain = build_model(self.cfg, self.device).to(self.dtype)
        params = list(self.model.parameters())
        with GatheredParameters(params, modifier_rank=None), torch.no_grad():
            for mine, full in zip(plain.parameters(), params):
                mine.copy_(full.detach())
        for mine, buf in zip(plain.buffers(), self.model.buffers()):
            mine.copy_(buf)
        return plain

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Our part of a checkpoint (DeepSpeed saves model, optimiser and schedule itself)."""
        per_rank = [(rng_state(), self.state.to_dict())]
        if self.info.distributed:  # collective: every rank's RNG streams and partial sums
            per_rank = [None] * self.info.world_size  # type: ignore[list-item]
            dist.all_gather_object(per_rank, (rng_state(), self.state.to_dict()))
        return {
            "rng": [r for r, _ in per_rank],
            "train_state": self.state.to_dict(),
            "rank_train_states": [t for _, t in per_rank],
            "config": config_to_dict(self.cfg),
        }

    def save(self) -> None:
        save_dir = self.run_dir / "checkpoints"
        tag = ds_checkpoint.tag_for(self.state.step)
        client = {ds_checkpoint.CLIENT_KEY: self.state_dict()}
        self._sync_buffers()
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client, save_latest=False)
        if self.info.is_main:  # save_checkpoint ends in a barrier: every rank's files are there
            ds_checkpoint.commit_latest(save_dir, tag)
        barrier()
        self.sink.checkpoint(save_dir / tag if self.info.is_main else None, self.state.step)

    def resume(self, spec: str) -> bool:
        if not spec:
            return False
        if spec == "auto":
            save_dir = self.run_dir / "checkpoints"
            tag = ds_checkpoint.read_latest(save_dir)
            if tag is None:
                return False
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
        self._restore(ours)
        return True

    def _restore(self, ours: dict[str, Any]) -> None:
        rngs, states = ours["rng"], ours["rank_train_states"]
        same_layout = len(rngs) == self.info.world_size
        set_rng_state(rngs[self.info.rank] if same_layout else rngs[0])
        self.state = TrainState.from_dict(
            states[self.info.rank] if same_layout else ours["train_state"]
        )
        self._ds_skipped = self.engine.skipped_steps

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        raise CheckpointError(
            "a DeepSpeed run resumes from a DeepSpeed checkpoint directory (train.resume=auto, "
            "or the path of <run>/checkpoints or one of its step_* tags)"
        )
