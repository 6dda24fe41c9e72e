"""train.ema_decay: an exponential moving average of the weights, evaluated and checkpointed.

Hand-written rather than torch.optim.swa_utils.AveragedModel: AveragedModel deep-copies the
module, which for a tensor-parallel, FSDP2 or pipeline-cut model copies hooks, meshes and meta
layers. Here the average is kept per live tensor (parameters and buffers, as AveragedModel's
use_buffers=True): a DTensor's average is a DTensor of the same placements, so a sharded model's
EMA is the EMA of its local shards, with no communication. Floating tensors follow
ema = decay * ema + (1 - decay) * w (the first update copies, as AveragedModel); integer buffers
(num_batches_tracked) are copied. The checkpoint keeps AveragedModel's layout
({"module.<name>": tensor, "n_averaged": count}) so `cifar-dist eval/predict` read it as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cifar_dist.train.callbacks.base import Callback, like_live, local, swap_into, to_full

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config
    from cifar_dist.train.trainer import Trainer


def _half(t: Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


class EMA(Callback):
    config_key = "train.ema_decay"
    key = "ema"

    def supports(self, backend: str, cfg: Config) -> str | None:
        # ZeRO 0-2 leave every rank the whole updated module after each step (averaged here,
        # in float32 also when DeepSpeed's module is bf16); ZeRO-3 and the pipeline engine
        # keep only a shard or a stage's layers of it.
        if backend == "deepspeed" and (cfg.deepspeed.zero_stage == 3 or cfg.parallel.pp > 1):
            return (
                "EMA with engine=deepspeed needs the whole module on every rank: ZeRO stage 0-2 "
                "without pp (ZeRO-3 and DeepSpeed's pipeline engine keep only a shard or a stage)"
            )
        return None

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.avg: dict[str, Tensor] = {}
        self.n_averaged = 0

    def setup(self, trainer: Trainer) -> None:
        # float32 averages of half-precision weights (DeepSpeed's bf16 module): a bf16 lerp
        # with decay 0.999 would round most updates away.
        self.avg = {
            k: v.detach().clone().to(torch.float32 if _half(v) else v.dtype)
            for k, v in trainer.live_state().items()
        }

    @torch.no_grad()
    def after_step(self, trainer: Trainer, step: int) -> None:
        live = trainer.live_state()
        floats = [k for k, v in self.avg.items() if torch.is_floating_point(v)]
        avg = [local(self.avg[k]) for k in floats]
        cur = [local(live[k].detach()).to(self.avg[k].dtype) for k in floats]
        if self.n_averaged == 0:
            torch._foreach_copy_(avg, cur)
        else:
            torch._foreach_lerp_(avg, cur, 1.0 - self.decay)
        for k, v in self.avg.items():
            if not torch.is_floating_point(v):
                v.copy_(live[k])
        self.n_averaged += 1

    @contextmanager
    def eval_weights(self, trainer: Trainer) -> Iterator[None]:
        live = trainer.live_state()
        before = swap_into(live, self.avg)
        try:
            yield
        finally:
            swap_into(live, before)

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        state: dict[str, Any] = {"module." + k: to_full(v) for k, v in self.avg.items()}
        state["n_averaged"] = torch.tensor(self.n_averaged, dtype=torch.long)
        return state

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        self.n_averaged = int(state["n_averaged"])
        for k, v in self.avg.items():
            v.copy_(like_live(state["module." + k], v))
