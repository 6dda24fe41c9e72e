"""Process-group set-up from torchrun's environment; a single process needs no torchrun."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "" when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """auto -> the local rank's CUDA device when CUDA is available, else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but CUDA is not available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(
    device: str = "auto", backend: str = "auto", timeout_s: float = 600
) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR...), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size == 1:
        return DistInfo(0, 0, 1, dev, "")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
            **_attempt_store(rank, world_size, timeout_s),
        )
    return DistInfo(rank, local_rank, world_size, dev, backend)


def _attempt_store(rank: int, world_size: int, timeout_s: float) -> dict[str, object]:
    """Under torchrun, a store namespace per restart attempt.

    After an elastic restart, gloo on torch 2.13 sometimes reads the previous attempt's peer
    addresses from torchrun's shared store ("connectFullMesh ... Connection refused" to a dead
    worker's port, or a hang). Prefixing every key with the attempt number keeps rounds apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"cifar_dist/attempt_{attempt}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world_size}


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: str = "auto", backend: str = "auto") -> Iterator[DistInfo]:
    """Init on entry, destroy on exit (also on exceptions, so no rank is left holding sockets)."""
    owned = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device, backend)
    try:
        yield info
    except BaseException:
        if owned:
            destroy_distributed()  # no barrier: a failed peer would never reach it
        raise
    if owned:
        # Clean exit: wait for every rank before tearing sockets down, so no rank closes a
        # gloo connection a peer's last (possibly asynchronous) operation still uses; gloo
        # answers that with an uncaught exception and SIGABRT.
        barrier()
        destroy_distributed()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def print0(*args: object, **kwargs: object) -> None:
    """print on global rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    if get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
