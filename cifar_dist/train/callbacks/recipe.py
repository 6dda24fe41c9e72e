"""The airbench recipe options as callbacks: whitening stem (fit + bias freeze) and Lookahead.

Both act on the model's live tensors, so they run with every torch and pipeline layout: the
stem is fitted on rank 0 before the model is wrapped or cut and broadcast; Lookahead averages
each rank's own tensors (a DTensor shard by shard, a pipeline rank its own stages).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from cifar_dist.train.callbacks.base import Callback, like_live, to_full
from cifar_dist.train.lookahead import Lookahead
from cifar_dist.train.model_init import init_whitening

if TYPE_CHECKING:
    from torch import nn

    from cifar_dist.train.trainer import Trainer


class WhiteningStem(Callback):
    config_key = "model.whiten_init"
    unsupported = {
        "deepspeed": "the whitening stem's bias freeze drops a gradient before the step, but "
        "DeepSpeed reduces and applies gradients inside its engine (use engine=torch)",
    }

    def __init__(self) -> None:
        self.stem: nn.Conv2d | None = None
        self.freeze_at = 0

    def before_prepare(self, trainer: Trainer) -> None:
        # Before wrapping: the frozen weight must be frozen when DDP/FSDP/compile see it.
        main = trainer.info.rank == 0
        self.stem = init_whitening(trainer.model, trainer.cfg, fit=main)
        if trainer.info.distributed and self.stem is not None:
            for t in (self.stem.weight, self.stem.bias):
                if t is not None:
                    dist.broadcast(t.data, src=0)
        epochs = trainer.cfg.model.whiten_bias_epochs
        self.freeze_at = round(epochs * trainer.steps_per_epoch)

    def before_optimizer_step(self, trainer: Trainer) -> None:
        bias = self.stem.bias if self.stem is not None else None
        if bias is not None and 0 < self.freeze_at <= trainer.state.step:
            # Frozen like requires_grad=False (no update, no momentum, no decay), but DDP- and
            # compile-safe: the gradient is still computed and reduced, then dropped here.
            bias.grad = None


class LookaheadAveraging(Callback):
    config_key = "train.lookahead_every"
    key = "lookahead"
    unsupported = {
        "deepspeed": "Lookahead writes the averaged weights into the model, but DeepSpeed's "
        "optimiser steps its own (fp32 / ZeRO-partitioned) master copy and would overwrite them",
    }

    def __init__(self) -> None:
        self.la: Lookahead | None = None

    def setup(self, trainer: Trainer) -> None:
        t, spe = trainer.cfg.train, trainer.steps_per_epoch
        self.la = Lookahead(
            trainer.live_state(),
            every=t.lookahead_every,
            total_steps=spe * t.epochs,  # what the LR schedule spans
            decay=t.lookahead_decay,
            pow=t.lookahead_pow,
            start_step=round(t.lookahead_start_epochs * spe),
        )

    def after_step(self, trainer: Trainer, step: int) -> None:
        assert self.la is not None
        self.la.step(trainer.live_state(), step)

    def end_of_epoch(self, trainer: Trainer) -> None:
        # Evaluate and checkpoint the averaged weights (airbench). Not after a max_steps or
        # signal stop mid-epoch: a resumed run must continue from the fast weights.
        assert self.la is not None
        self.la.sync(trainer.live_state())

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        assert self.la is not None
        slow = self.la.slow
        return {"slow": None if slow is None else {k: to_full(v) for k, v in slow.items()}}

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        assert self.la is not None
        slow, live = state.get("slow"), trainer.live_state()
        self.la.slow = None if slow is None else {k: like_live(v, live[k]) for k, v in slow.items()}


class EarlyStopping(Callback):
    config_key = "train.early_stopping"

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def after_evaluate(self, trainer: Trainer, val: dict[str, Any]) -> bool:
        # Counters live in TrainState (checkpointed with the run's other counters).
        st = trainer.state
        if val["loss"] < st.best_val_loss:
            st.best_val_loss, st.bad_evals = val["loss"], 0
            return False
        st.bad_evals += 1
        return 0 < self.patience <= st.bad_evals
