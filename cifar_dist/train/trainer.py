"""The training loop: one Trainer per run, built from a Config and the process's DistInfo.

The Trainer owns the epoch loop, the step's decisions (non-finite steps, pre-emption), the
recipe callbacks, logging and what a checkpoint holds; everything that differs per parallel
layout is its backend's (train/backends/: torch, pipeline, deepspeed)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.logging.sinks import Sink
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.train.backends import backend_for
from cifar_dist.train.backends.base import Backend
from cifar_dist.train.callbacks import build_callbacks
from cifar_dist.train.common import (
    AMP_DTYPES,
    NonFiniteError,
    Preempted,
    StepResult,
    build_model,
    resolve_amp,
)
from cifar_dist.train.metrics import evaluate
from cifar_dist.train.state import TrainState
from cifar_dist.utils.dist import DistInfo, all_reduce_sum
from cifar_dist.utils.faults import maybe_die_in_collective, maybe_inject_fault
from cifar_dist.utils.seed import rng_state, set_rng_state


class Trainer:
    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        dims: ParallelDims,
        loaders: tuple,
        run_dir: Path,
        sink: Sink,
        backend_cls: type[Backend] | None = None,
    ) -> None:
        """`backend_cls`: the layout's backend (default: the registry's for cfg and dims)."""
        cfg = resolve_amp(cfg, info.device)  # fit() has done it; a Trainer built directly not
        self.cfg, self.info, self.dims, self.run_dir, self.sink = cfg, info, dims, run_dir, sink
        backend_cls = backend_cls or backend_for(cfg, dims)
        self.device = info.device
        self.train_loader, self.eval_loaders = loaders
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        if self.amp_dtype is torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.amp: fp16 needs a GPU (GradScaler); use bf16 on CPU")
        torch.manual_seed(cfg.train.seed)  # identical init on every rank
        self.model = build_model(cfg, self.device)
        self.dtype = next(self.model.parameters()).dtype
        # Dropout / drop-path streams per data-parallel replica: tensor- and pipeline-parallel
        # peers hold pieces of one replica and must draw the same masks.
        torch.manual_seed(cfg.train.seed + 1 + dims.coords(info.rank).dp)
        self.accum = cfg.train.grad_accum
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError("data.batch_size: larger than the training split")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        # Recipe options (whitening stem, EMA, Lookahead, early stopping): see callbacks/.
        self.callbacks = build_callbacks(cfg)
        # Ranks over which evaluation metrics are reduced (None = all); tensor/pipeline layouts
        # set their dp group, since the ranks of one replica see the same images.
        self.eval_group: dist.ProcessGroup | None = None
        for cb in self.callbacks:
            cb.before_prepare(self)
        self.backend = backend_cls(self)
        self.backend.prepare()
        self.backend.build_optimizer()
        for cb in self.callbacks:
            cb.setup(self)
        self.state = TrainState()
        self.signal_received: int | None = None  # set by a SIGTERM/SIGUSR1 handler (pre-emption)
        self.stop_requested = (
            False  # the all-ranks decision derived from it, taken at a step boundary
        )

    # ----- what backends share: batches, precision, loss --------------------------------------
    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format

    def prepare_batch(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images on the device in the model's dtype and memory format; labels on the device
        (soft labels from mixup/cutmix in the model's dtype)."""
        images = images.to(self.device, self.dtype, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        if labels.is_floating_point():
            labels = labels.to(self.dtype)
        return images, labels

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing
        )

    @staticmethod
    def correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
        hard = labels if labels.ndim == 1 else labels.argmax(dim=1)
        return float((logits.detach().argmax(dim=1) == hard).sum())

    def live_state(self) -> dict[str, torch.Tensor]:
        """This rank's live weights under the full model's names (see Backend.live_state)."""
        return self.backend.live_state()

    # ----- one optimiser step ------------------------------------------------------------------
    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimiser step over `grad_accum` micro-batches drawn from `batches`."""
        out = self.backend.forward_backward(batches)
        out.grad_norm, applied = self.backend.optimizer_step(out.losses)
        if applied:
            for cb in self.callbacks:
                cb.after_step(self, self.state.step + 1)  # this step's 1-based index
        return out

    def agree(self, finite: bool) -> bool:
        """Whether every rank's step is finite, and whether any rank was signalled to stop
        (`stop_requested`): every rank takes the same decisions, from one small all-reduce."""
        self.stop_requested = self.signal_received is not None
        if self.info.distributed:
            flags = torch.tensor(
                [float(not finite), float(self.stop_requested)], device=self.device
            )
            maybe_die_in_collective(self.state.step + 1, self.info.rank, flags)
            dist.all_reduce(flags)
            finite, self.stop_requested = bool(flags[0] == 0), bool(flags[1] > 0)
        return finite

    def count_nonfinite_step(self) -> None:
        """One more consecutive non-finite step; stop the run after train.max_nonfinite of them."""
        self.state.nonfinite_run += 1
        if self.state.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise NonFiniteError(
                f"training diverged: {self.state.nonfinite_run} consecutive non-finite losses/grad "
                f"norms at step {self.state.step} (lower optim.lr, or set train.clip_norm)"
            )

    # ----- checkpoints: our state here, the weights' and the file layout from the backend ------
    def state_dict(self) -> dict[str, Any]:
        from cifar_dist.config.load import config_to_dict

        # RNG streams and partial-epoch sums differ per rank: gather every rank's copy.
        per_rank = [(rng_state(), self.state.to_dict())]
        if self.info.distributed:
            per_rank = [None] * self.info.world_size
            dist.all_gather_object(per_rank, (rng_state(), self.state.to_dict()))
        return {
            **self.backend.checkpoint_state(),
            "ema": None,  # replaced by the EMA callback's state when train.ema_decay > 0
            **{cb.key: cb.state_dict(self) for cb in self.callbacks if cb.key},
            "rng": [r for r, _ in per_rank],
            "train_state": self.state.to_dict(),
            "rank_train_states": [t for _, t in per_rank],
            "config": config_to_dict(self.cfg),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        ckpt = self.backend.localize(ckpt)
        self.backend.load_checkpoint_state(ckpt)
        for cb in self.callbacks:
            if cb.key and ckpt.get(cb.key) is not None:
                cb.load_state_dict(self, ckpt[cb.key])
        rngs, states = ckpt["rng"], ckpt.get("rank_train_states") or [ckpt["train_state"]]
        same_layout = len(rngs) == self.info.world_size
        set_rng_state(rngs[self.info.rank] if same_layout else rngs[0])
        self.state = TrainState.from_dict(
            states[self.info.rank] if same_layout else ckpt["train_state"]
        )

    def resume(self, spec: str) -> bool:
        """Load the checkpoint train.resume names ('auto' = newest valid one); False if none."""
        ckpt = self.backend.read_checkpoint(spec) if spec else None
        if ckpt is None:
            return False
        self.load_state_dict(ckpt)
        return True

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        path = self.backend.write_checkpoint(state)
        self.sink.checkpoint(path, self.state.step)

    # ----- epochs ------------------------------------------------------------------------------
    def _max_steps_reached(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.state.step

    def train_epoch(self) -> None:
        """One epoch (or what is left of it). On CUDA its time is measured with CUDA events,
        so `train_s` is device time, not host time that may run ahead of queued kernels."""
        st = self.state
        timed = self.device.type == "cuda"
        if timed:
            before = st.train_time_s
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        self._train_epoch()
        if st.step_in_epoch >= self.steps_per_epoch:
            for cb in self.callbacks:
                cb.end_of_epoch(self)
        if timed:
            end.record()
            end.synchronize()
            st.train_time_s = before + start.elapsed_time(end) / 1000.0

    def _train_epoch(self) -> None:
        st, cfg = self.state, self.cfg
        self.train_model.train()
        self.train_loader.set_epoch(st.epoch)
        self.train_loader.set_start_batch(st.step_in_epoch * self.accum)
        show = self.info.is_main and cfg.train.progress
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=st.step_in_epoch,
            disable=not show,
            leave=False,
            desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
            dynamic_ncols=True,
        )
        batches = iter(self.train_loader)
        t0 = time.perf_counter()
        while (
            st.step_in_epoch < self.steps_per_epoch
            and not self._max_steps_reached()
            and not self.stop_requested
        ):
            out = self.train_step(batches)
            st.epoch_correct += out.correct
            st.epoch_seen += out.seen
            st.epoch_loss_sum += out.loss_sum
            st.train_samples += out.seen
            losses, lr, norm = out.losses, out.lr, out.grad_norm
            st.step += 1
            st.step_in_epoch += 1
            st.lr_trace.append(lr)
            if st.step % cfg.log.every_steps == 0:  # same step on every rank: all-reduce is safe
                mean_loss = (
                    all_reduce_sum(sum(losses) / len(losses), self.device) / self.info.world_size
                )
                self.sink.log(
                    {"step/loss": mean_loss, "step/lr": lr, "step/grad_norm": norm},
                    st.step,
                )
            maybe_inject_fault(st.step, self.info.rank)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.3g}")
            if cfg.train.ckpt_every_steps and st.step % cfg.train.ckpt_every_steps == 0:
                st.train_time_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save()
        st.train_time_s += time.perf_counter() - t0
        bar.close()

    def eval_model(self) -> nn.Module:
        return self.backend.eval_module()

    def evaluate_split(self, split: str, confusion: bool = False) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:  # e.g. the EMA weights swapped in meanwhile
            for cb in self.callbacks:
                stack.enter_context(cb.eval_weights(self))
            res = self._evaluate(split, confusion)
        if "confusion" in res:
            res["confusion"] = res["confusion"] // self.backend.eval_copies
        return res

    def _evaluate(self, split: str, confusion: bool) -> dict[str, Any]:
        return evaluate(
            self.eval_model(),
            self.eval_loaders[split],
            self.cfg.data.num_classes,
            self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.cfg.train.channels_last,
            tta=self.cfg.train.tta,
            tta_translate=self.cfg.train.tta_translate,
            confusion=confusion,
            process_group=self.eval_group,
        )

    def end_epoch(self) -> bool:
        """Log the epoch, evaluate, checkpoint; returns True when early stopping says stop."""
        st, cfg = self.state, self.cfg
        seen = all_reduce_sum(st.epoch_seen, self.device)
        record: dict[str, Any] = {
            "epoch": st.epoch + 1,
            "train_loss": all_reduce_sum(st.epoch_loss_sum, self.device) / max(seen, 1),
            "train_acc": all_reduce_sum(st.epoch_correct, self.device) / max(seen, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_steps": st.skipped_steps,
        }
        last = st.epoch + 1 == cfg.train.epochs or self._max_steps_reached()
        stop = False
        if "val" in self.eval_loaders and ((st.epoch + 1) % cfg.train.eval_every == 0 or last):
            val = self.evaluate_split("val")
            record.update({f"val_{k}": v for k, v in val.items()})
            stop = any([cb.after_evaluate(self, val) for cb in self.callbacks])  # each sees val
        st.history.append(record)
        self.sink.log(record, st.step)
        st.epoch += 1
        st.step_in_epoch = 0
        st.reset_epoch_sums()
        self.save()
        return stop

    def run(self) -> None:
        while self.state.epoch < self.cfg.train.epochs and not self._max_steps_reached():
            self.train_epoch()
            if self._max_steps_reached() and self.state.step_in_epoch < self.steps_per_epoch:
                self.save()  # stopped mid-epoch: a later run with a larger budget resumes here
                return
            if self.stop_requested:
                self.save()
                raise Preempted(
                    f"stopped by signal at step {self.state.step}; checkpoint saved in "
                    f"{self.run_dir / 'checkpoints'} (resume with --train.resume=auto)"
                )
            if self.end_epoch():
                if self.info.is_main:
                    tqdm.write(
                        f"early stopping: no val_loss improvement in {self.state.bad_evals} evaluations"
                    )
                return
