"""`cifar-dist` on N ranks forked from the test process: torchrun's rank environment without
torchrun's start-up.

Why by hand: a torchrun launch starts N+1 fresh interpreters, each importing torch, torchvision
and torchmetrics (~4-5 s of CPU apiece, the largest cost of a short equivalence run on 2 cores).
Forked ranks inherit those imports. They run the same `cifar_dist.cli.main` that torchrun would
start, with the same RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables, and one
rank failing stops the others, as torchrun does. The launchers themselves (torchrun, restarts,
DeepSpeed, Slurm) stay tested through real launches in tests/test_distributed.py and friends.

Fork safety: each rank sets one intra-op thread before any torch op (torch's DataLoader workers
do the same), so no OpenMP team from the parent is reused in the child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, nproc: int, port: int, argv: list[str], env: dict[str, str], log: Path):
    """The child: redirect output to `log`, set torchrun's variables, run the CLI, exit."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives to _exit)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.update(env)
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        import torch

        torch.set_num_threads(1)
        from cifar_dist.cli import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_forked(
    nproc: int, *argv: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `cifar-dist ARGV` on `nproc` forked ranks; stdout holds every rank's output, rank by
    rank, prefixed `[rankN]:` as torchrun's --tee does; returncode is the first non-zero one."""
    import torch.distributed as dist

    # A child would inherit the group and skip joining its own (utils/dist.init_distributed).
    assert not dist.is_initialized(), "a process group is live in the test process"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"rank{r}.log" for r in range(nproc)]
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                _rank_main(rank, nproc, port, list(argv), env or {}, logs[rank])
            pids.append(pid)
        codes = _wait_all(pids, timeout)
        out = "".join(f"[rank{r}]: {line}\n" for r, log in enumerate(logs) for line in _read(log))
    code = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess(["forked", *argv], code, out, out)


def _read(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines() if log.exists() else []


def _wait_all(pids: list[int], timeout: float, grace: float = 5.0) -> list[int]:
    """Exit codes of `pids`. When one fails, the rest get `grace` seconds to finish (and print
    their own error), then they are killed, as when the time is up: a peer would otherwise wait
    forever in a collective."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            done, status = (0, 0) if pid in codes else os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if any(c != 0 for c in codes.values()):
            deadline = min(deadline, time.monotonic() + grace)
        if len(codes) < len(pids) and time.monotonic() > deadline:
            for pid in set(pids) - set(codes):
                os.kill(pid, signal.SIGKILL)
                codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.05)
    return [codes[pid] for pid in pids]
