"""Pre-emption: one exit code, and a marker file that survives the launcher's own exit code.

A SIGTERM/SIGUSR1 on any rank makes every rank stop at the same step boundary (the flag is
all-reduced with the step's finiteness check), write one checkpoint and raise `Preempted`;
`cifar-dist train` then exits with PREEMPTED_EXIT_CODE on every rank.

Launchers do not pass that code on: torchrun reports 1 for any failed worker (ChildFailedError,
or SignalException when the launcher itself got the signal), DeepSpeed's launcher 1 when it
was signalled itself. So a marker file tells the launcher scripts (launch/*.sh, slurm/*.sbatch)
that the non-zero exit was a pre-emption with a checkpoint, and they exit with
PREEMPTED_EXIT_CODE (and requeue under Slurm):
- `<run dir>/PREEMPTED`, written by global rank 0 (for people and plain-torchrun wrappers);
- `$CIFAR_DIST_PREEMPT_MARKER`, when set, written by each node's local rank 0 (the scripts set
  it to a file of their own, because they do not know a timestamped run directory's name).
Both are removed when a run starts, so a stale marker never turns a later crash into a requeue.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL (sysexits.h, "temporary failure; retry later"): distinct from a crash (1), a bad
input (2), and from 143/137 (a process killed by SIGTERM/SIGKILL before it could checkpoint)."""
MARKER_NAME = "PREEMPTED"
MARKER_ENV = "CIFAR_DIST_PREEMPT_MARKER"


def _paths(run_dir: Path, rank: int, local_rank: int) -> list[Path]:
    paths = [run_dir / MARKER_NAME] if rank == 0 else []
    env = os.environ.get(MARKER_ENV)
    if env and local_rank == 0:
        paths.append(Path(env))
    return paths


def clear_markers(run_dir: Path, rank: int, local_rank: int) -> None:
    for p in _paths(run_dir, rank, local_rank):
        p.unlink(missing_ok=True)


def write_markers(run_dir: Path, rank: int, local_rank: int, step: int) -> None:
    """Record a checkpointed pre-emption at `step` (best effort: a failed write only loses
    the mapping of the launcher's exit code, never the checkpoint)."""
    text = json.dumps({"step": step, "exit_code": PREEMPTED_EXIT_CODE, "run_dir": str(run_dir)})
    for p in _paths(run_dir, rank, local_rank):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text + "\n")
        except OSError:
            pass
