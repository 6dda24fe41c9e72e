"""`data.batch_size: auto`: the largest power-of-two batch whose training step fits in memory.

Per rank, micro-batches 2^k are tried upwards from MIN_MICRO until one does not fit or the
global batch (micro x dp x grad_accum) would pass `data.auto_batch_max`; the last that fitted
wins, and all ranks take the smallest rank's answer.

- CUDA: a real probe. One training step (forward under the run's autocast and memory format,
  backward, optimiser step) of a freshly built model at that batch; it fits when it raises no
  out-of-memory error and the peak reserved memory stays within the memory that was free before
  the probe minus `auto_batch_headroom` of the device's total.
- CPU: the host has no allocator statistics to read, and RAM (tens of GiB) almost never binds
  for CIFAR models, so the step's memory is estimated from a measurement: the bytes autograd
  saves for backward in one small forward pass (saved-tensor hooks), per image, times 2 (the
  saved activations and their gradients in flight) times the batch, plus 4x the parameter
  bytes (weights, gradients, momentum, slack). It fits within MemAvailable minus the headroom.
  In practice the cap `auto_batch_max` decides on CPU; the chosen value is printed and saved in
  the run's config.yaml, so pin it there for a reproducible rerun.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.utils.dist import DistInfo

MIN_MICRO = 8  # smallest micro-batch tried; BatchNorm statistics get noisy below this
_PROBE_IMAGES = 8  # images in the CPU saved-bytes measurement


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest power of two b in [lo, hi] (lo a power of two) with fits(b), scanning upwards
    and stopping at the first failure (memory grows with the batch); None if lo fails."""
    best, b = None, lo
    while b <= hi:
        if not fits(b):
            break
        best, b = b, b * 2
    return best


def _probe_batch(
    cfg: Config, micro: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    x = torch.randn(micro, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    return x, torch.randint(0, cfg.data.num_classes, (micro,), device=device)


def _autocast(cfg: Config, device: torch.device) -> torch.autocast:
    from cifar_dist.train.common import AMP_DTYPES

    amp = AMP_DTYPES[cfg.train.amp]
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def cuda_step_fits(cfg: Config, device: torch.device, micro: int, headroom: float) -> bool:
    """One real training step at `micro` on `device`: no OOM and peak within the budget."""
    from cifar_dist.train.common import build_model
    from cifar_dist.train.optim import build_optimizer

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = free - headroom * total + torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        model = build_model(cfg, device)
        opt = build_optimizer(model, cfg.optim, micro)
        x, y = _probe_batch(cfg, micro, device)
        with _autocast(cfg, device):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) <= budget
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model = opt = x = y = logits = None  # noqa: F841 - drop references before emptying
        torch.cuda.empty_cache()


def cpu_step_bytes(cfg: Config) -> tuple[int, float]:
    """(parameter bytes, bytes autograd saves for backward per image) of the model on CPU."""
    from cifar_dist.train.common import build_model

    model, seen, total = build_model(cfg, torch.device("cpu")), set(), 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # count each storage once (views share it)
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    x, _ = _probe_batch(cfg, _PROBE_IMAGES, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(cfg, x.device):
        model(x)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # Parameters are saved too (by convs/linears); they do not grow with the batch.
    return params, max(total - params, 0) / _PROBE_IMAGES


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_step_fits(micro: int, headroom: float, params: int, per_image: float) -> bool:
    """The CPU estimate (module docstring) within (1 - headroom) of the available RAM."""
    return 4 * params + 2 * per_image * micro <= (1 - headroom) * available_ram()


def resolve_auto_batch(cfg: Config, info: DistInfo, dims: ParallelDims) -> Config:
    """`cfg` with data.batch_size replaced by the probed global batch (an int)."""
    d, per_step = cfg.data, dims.dp * cfg.train.grad_accum
    hi = d.auto_batch_max // per_step
    if hi < MIN_MICRO:
        raise ConfigError(
            f"data.auto_batch_max: {d.auto_batch_max} leaves less than {MIN_MICRO} images per "
            f"micro-batch at dp*grad_accum = {per_step}"
        )
    probe_cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, batch_size=MIN_MICRO))
    if info.device.type == "cuda":
        micro = largest_fitting(
            lambda b: cuda_step_fits(probe_cfg, info.device, b, d.auto_batch_headroom),
            MIN_MICRO,
            hi,
        )
    else:
        params, per_image = cpu_step_bytes(probe_cfg)
        micro = largest_fitting(
            lambda b: cpu_step_fits(b, d.auto_batch_headroom, params, per_image), MIN_MICRO, hi
        )
    micro = micro or 0
    if info.distributed:  # every rank must train with the same batch: take the smallest
        t = torch.tensor([micro], device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        micro = int(t.item())
    if micro < MIN_MICRO:
        raise ConfigError(
            f"data.batch_size: auto found no batch of >= {MIN_MICRO} images per rank that fits "
            f"in {info.device.type} memory with {d.auto_batch_headroom:.0%} headroom"
        )
    batch = micro * per_step
    if info.is_main:
        print(f"data.batch_size=auto -> {batch} ({micro} per micro-batch)", flush=True)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, batch_size=batch))
