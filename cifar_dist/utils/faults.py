"""Fault injection for the elastic-restart test: kill this rank at a given step, first attempt only.

Set CIFAR_DIST_FAULT="<rank>:<step>"; the process SIGKILLs itself after that optimiser step when
torchrun's TORCHELASTIC_RESTART_COUNT is 0, so the restarted attempt runs through. Unset = no-op.
"""

from __future__ import annotations

import os
import signal


def maybe_inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get("CIFAR_DIST_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    fault_rank, fault_step = (int(v) for v in spec.split(":"))
    if rank == fault_rank and step == fault_step:
        os.kill(os.getpid(), signal.SIGKILL)
