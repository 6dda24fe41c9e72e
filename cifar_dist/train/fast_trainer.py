"""The record-recipe trainer (airbench-style): whitening stem, Lookahead, device-event timing.

A Trainer subclass, chosen by `trainer_class` when the config uses the options it implements
(`uses_fast_trainer`). Everything else (dirac init, bias-only norms, lr multipliers and units,
Muon, the triangle schedule, multi-view TTA, the device loader) is configured through the
ordinary hooks and works with the base Trainer too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.train.common import StepResult
from cifar_dist.train.lookahead import Lookahead
from cifar_dist.train.model_init import init_whitening
from cifar_dist.train.trainer import Trainer


def uses_fast_trainer(cfg: Config) -> bool:
    """True when the config asks for an option only FastTrainer implements."""
    return cfg.model.whiten_init > 0 or cfg.train.lookahead_every > 0


def check_layout(cfg: Config, dims: ParallelDims) -> None:
    if dims.tp > 1 or dims.pp > 1 or cfg.parallel.engine != "torch":
        raise ConfigError(
            "model.whiten_init / train.lookahead_every: not available with parallel.tp or "
            "parallel.pp > 1 or parallel.engine=deepspeed (torch data parallel only)"
        )


class FastTrainer(Trainer):
    """Trainer + whitening-stem init (frozen weights, bias frozen after N epochs) + Lookahead.

    On CUDA the training time is measured with CUDA events around each epoch's loop, so
    `train_s` is device time, not host time that may run ahead of queued kernels.
    """

    def setup_parallel(self) -> None:
        # Before wrapping: the stem's frozen weight must be frozen when DDP/compile see it.
        self.whiten_stem = init_whitening(self.model, self.cfg)
        self.whiten_bias_steps = round(self.cfg.model.whiten_bias_epochs * self.steps_per_epoch)
        super().setup_parallel()

    def setup_optim(self) -> None:
        super().setup_optim()
        t = self.cfg.train
        self.lookahead: Lookahead | None = None
        if t.lookahead_every > 0:
            self.lookahead = Lookahead(
                self.model,
                every=t.lookahead_every,
                total_steps=self.steps_per_epoch * t.epochs,  # what the LR schedule spans
                decay=t.lookahead_decay,
                pow=t.lookahead_pow,
                start_step=round(t.lookahead_start_epochs * self.steps_per_epoch),
            )

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        out = super().train_step(batches)
        stepped = self.state.nonfinite_run == 0
        if self.lookahead is not None and stepped:
            self.lookahead.step(self.model, self.state.step + 1)  # this step's 1-based index
        return out

    def _optimizer_step(self, losses: list[float]) -> float:
        bias = self.whiten_stem.bias if self.whiten_stem is not None else None
        if bias is not None and 0 < self.whiten_bias_steps <= self.state.step:
            # Frozen like requires_grad=False (no update, no momentum, no decay), but DDP- and
            # compile-safe: the gradient is still computed and reduced, then dropped here.
            bias.grad = None
        return super()._optimizer_step(losses)

    def train_epoch(self) -> None:
        st = self.state
        timed = self.device.type == "cuda"
        if timed:
            before = st.train_time_s
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        super().train_epoch()
        if self.lookahead is not None and st.step_in_epoch >= self.steps_per_epoch:
            # Evaluate and checkpoint the averaged weights (airbench). Not after a max_steps or
            # signal stop mid-epoch: a resumed run must continue from the fast weights.
            self.lookahead.sync(self.model)
        if timed:
            end.record()
            end.synchronize()
            st.train_time_s = before + start.elapsed_time(end) / 1000.0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lookahead"] = self.lookahead.state_dict() if self.lookahead else None
        return state

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        super().load_state_dict(ckpt)
        if self.lookahead is not None and ckpt.get("lookahead"):
            self.lookahead.load_state_dict(ckpt["lookahead"])
