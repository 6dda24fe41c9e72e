"""The callback protocol: recipe options hook into the one training loop here.

A callback sees the trainer at fixed points of a run and may keep state that goes into the
checkpoint under its `key`. It names the backends it cannot run with and why (`unsupported`),
so one validation pass at config load answers a bad combination in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config
    from cifar_dist.train.trainer import Trainer

BACKENDS = ("torch", "pipeline", "deepspeed")
"""torch: plain / DDP / FSDP2 / TP / TP+FSDP; pipeline: torch.distributed.pipelining (pp > 1,
engine=torch); deepspeed: parallel.engine=deepspeed (ZeRO and its pipeline engine)."""


class Callback:
    config_key: ClassVar[str] = ""
    """The config key that turns the callback on (named in refusals)."""
    key: ClassVar[str] = ""
    """Checkpoint entry of its state; empty = stateless."""
    unsupported: ClassVar[dict[str, str]] = {}
    """backend -> why the callback cannot run with it."""

    def supports(self, backend: str, cfg: Config) -> str | None:
        """None when the callback runs with `backend` and `cfg`'s layout, else why it cannot."""
        return self.unsupported.get(backend)

    def before_prepare(self, trainer: Trainer) -> None:
        """The whole plain model exists on every rank; nothing is wrapped or sharded yet."""

    def setup(self, trainer: Trainer) -> None:
        """The model is prepared (wrapped, sharded, cut into stages) and the optimiser built."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        """Gradients are reduced; clipping and the step follow."""

    def after_step(self, trainer: Trainer, step: int) -> None:
        """Optimiser step `step` (1-based) was applied (not called for skipped steps)."""

    def end_of_epoch(self, trainer: Trainer) -> None:
        """A whole training epoch finished, before evaluation and the checkpoint."""

    def after_evaluate(self, trainer: Trainer, val: dict[str, Any]) -> bool:
        """Validation metrics of this epoch; True asks the run to stop."""
        return False

    @contextmanager
    def eval_weights(self, trainer: Trainer) -> Iterator[None]:
        """The weights to evaluate are in the model while this is entered."""
        yield

    def state_dict(self, trainer: Trainer) -> Any:
        """Collective where the state is sharded: every rank calls it."""
        return None

    def load_state_dict(self, trainer: Trainer, state: Any) -> None:
        pass


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor (a view: in-place updates reach the live tensor). Foreach
    kernels refuse lists that mix DTensors and plain tensors, and the updates here are
    elementwise, so they run on the local shards."""
    return t.to_local() if isinstance(t, DTensor) else t


def to_full(t: Tensor) -> Tensor:
    """A checkpointable plain tensor: a DTensor's shards gathered (collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_live(full: Tensor, live: Tensor) -> Tensor:
    """`full` (as saved) laid out like the live tensor: this rank's shard of a DTensor."""
    full = full.to(live.device, live.dtype)
    if isinstance(live, DTensor):
        # Every rank holds the whole checkpoint: each keeps its own shard, no communication.
        return distribute_tensor(full, live.device_mesh, live.placements, src_data_rank=None)
    return full


@torch.no_grad()
def swap_into(live: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy `values` into the live tensors of the same names; returns what they held."""
    before = {k: live[k].detach().clone() for k in values}
    for k, v in values.items():
        live[k].detach().copy_(v)
    return before
