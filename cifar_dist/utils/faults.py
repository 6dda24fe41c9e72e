"""Fault injection for the failure tests: first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT
is 0), so a restarted attempt runs through. Unset = no-op.

CIFAR_DIST_FAULT="<rank>:<step>[:<kind>]", kind:
- `kill` (default): SIGKILL after optimiser step <step>, between steps;
- `collective`: SIGKILL inside optimiser step <step>, while this rank's all-reduce of the step
  flags is in flight (the peers are blocked in the matching all-reduce): a death mid-collective;
- `sigterm`: SIGTERM to this rank alone after step <step> (the other ranks get no signal and
  must still stop at the same step: the pre-emption agreement).
Step 0 (`kill`, `sigterm`) fires during set-up, before the data is built (train/fit.py).
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist


def _fault(rank: int, step: int, kind: str) -> bool:
    spec = os.environ.get("CIFAR_DIST_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    parts = spec.split(":")
    want = parts[2] if len(parts) > 2 else "kill"
    return want == kind and rank == int(parts[0]) and step == int(parts[1])


def maybe_inject_fault(step: int, rank: int) -> None:
    """Called after optimiser step `step` on every rank."""
    if _fault(rank, step, "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if _fault(rank, step, "sigterm"):
        os.kill(os.getpid(), signal.SIGTERM)


def maybe_die_in_collective(step: int, rank: int, flags: torch.Tensor) -> None:
    """Called during optimiser step `step`, just before the step's flag all-reduce: start that
    all-reduce asynchronously, then SIGKILL this process while it is in flight."""
    if _fault(rank, step, "collective"):
        dist.all_reduce(flags.clone(), async_op=True)
        os.kill(os.getpid(), signal.SIGKILL)
