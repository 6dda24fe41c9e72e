"""Lookahead-style weight averaging with a warming decay, as airbench94/95 use it.

Every `every` optimiser steps t (after `start_step`), with T the run's total steps:

    rho  = decay**every * (t / T)**pow
    slow = rho * slow + (1 - rho) * fast        (slow.lerp_(fast, 1 - rho))
    fast = slow

over every floating-point entry of the model's state dict (parameters and BatchNorm running
statistics). Early on rho is ~0 (slow just follows fast); towards the end it approaches
decay**every, a strong average. `sync` copies slow into fast without a new average (airbench
calls it at epoch ends and after the last step), so what is evaluated and checkpointed is the
averaged model. Zhang et al. 2019 ("Lookahead Optimizer: k steps forward, 1 step back") is the
fixed-rho original.

Why hand-written: torch has no Lookahead, and torch.optim.swa_utils.AveragedModel keeps a
separate average without writing it back into the trained model, which is the point here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def _local(t: Tensor) -> Tensor:
    # A DTensor's local shard (a view): foreach kernels refuse lists mixing DTensors and plain
    # tensors, and the update is elementwise.
    return t.to_local() if isinstance(t, DTensor) else t


class Lookahead:
    def __init__(
        self,
        model: nn.Module,
        every: int,
        total_steps: int,
        decay: float = 0.95,
        pow: float = 3.0,
        start_step: int = 0,
    ) -> None:
        if every < 1 or total_steps < 1:
            raise ValueError(f"Lookahead: every={every} and total_steps={total_steps} must be >= 1")
        self.every, self.total, self.decay, self.pow = every, total_steps, decay, pow
        self.start_step = start_step
        self.slow: dict[str, Tensor] | None = None  # created at the first averaging step

    def rho(self, step: int) -> float:
        """Weight kept on the slow copy at optimiser step `step` (1-based)."""
        return self.decay**self.every * min(step / self.total, 1.0) ** self.pow

    @staticmethod
    def _float_state(model: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
        # keep_vars: the live parameter/buffer tensors, so copy_/lerp_ act on the model itself.
        # A dict is such a live state already (a pipeline rank's stages, under full names).
        # DTensors (tp, fsdp) average shard by shard: the update is elementwise.
        state = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model
        return {k: v for k, v in state.items() if torch.is_floating_point(v)}

    @torch.no_grad()
    def step(self, model: nn.Module | dict[str, Tensor], step: int) -> bool:
        """Call after optimiser step `step` (1-based); returns True when it averaged."""
        if step <= self.start_step or step % self.every:
            return False
        fast = self._float_state(model)
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in fast.items()}
            return True
        slow, live = (
            [_local(self.slow[k]) for k in fast],
            [_local(v.detach()) for v in fast.values()],
        )
        # One fused kernel per op over all tensors (what torch's optimisers use): on a GPU a
        # Python loop of ~30 small lerp/copy launches would cost more than the math.
        torch._foreach_lerp_(slow, live, 1.0 - self.rho(step))
        torch._foreach_copy_(live, slow)
        return True

    @torch.no_grad()
    def sync(self, model: nn.Module | dict[str, Tensor]) -> None:
        """fast = slow (no new average); a no-op before the first averaging step."""
        if self.slow is None:
            return
        fast = self._float_state(model)
        live = [_local(v.detach()) for v in fast.values()]
        torch._foreach_copy_(live, [_local(self.slow[k]) for k in fast])

    def state_dict(self) -> dict[str, object]:
        return {"slow": self.slow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        slow = state.get("slow")
        self.slow = None if slow is None else {k: v.clone() for k, v in slow.items()}  # type: ignore[union-attr]
