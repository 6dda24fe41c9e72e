"""DeepSpeed as a parallelism: prepare its runtime on CPU or GPU, then `deepspeed.initialize`.

The JSON itself comes from `ds_json.build` (generated from the project config). On CPU,
DeepSpeed uses its CPU accelerator and, without oneCCL installed, torch's gloo backend; the
process group is the one `utils.dist` already created (torchrun or the `deepspeed` launcher
both set RANK/WORLD_SIZE/MASTER_ADDR), so DeepSpeed only wraps it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cifar_dist.config.schema import ConfigError


def import_deepspeed() -> ModuleType:
    from cifar_dist.config.extras import MissingExtraError, missing_message

    try:
        import deepspeed
    except ImportError:
        raise MissingExtraError(missing_message("deepspeed", "parallel.engine=deepspeed")) from None
    return deepspeed


def _select_accelerator(device: torch.device) -> str:
    """Make DeepSpeed's accelerator agree with train.device; returns its name."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    name = get_accelerator().device_name()
    if device.type == "cpu" and name != "cpu":
        # A GPU machine told to train on CPU: DeepSpeed auto-detected CUDA at import.
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
        name = "cpu"
    elif device.type != name:
        raise ConfigError(
            f"train.device: training on {device.type} but DeepSpeed's accelerator is {name} "
            "(check DS_ACCELERATOR)"
        )
    return name


def _skip_shm_build() -> None:
    """Do not JIT-build DeepSpeed's shared-memory CPU all-reduce kernel (`deepspeed_shm_comm`).

    DeepSpeed's TorchBackend compiles it (~45 s on 2 cores, once per TORCH_EXTENSIONS_DIR) the
    first time a CPU job starts, but only `inference_all_reduce` uses it: training collectives
    go through torch.distributed (gloo). DeepSpeed reads `deepspeed.ops.__compatible_ops__`
    once and keeps that dict, so marking the op incompatible there skips the build; everything
    else about the op registry stays as DeepSpeed probed it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even in one process; give it a private world of one."""
    if dist.is_initialized():
        return
    # deepspeed.initialize asserts that a launcher set LOCAL_RANK; one process is local rank 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def prepare_runtime(device: torch.device) -> ModuleType:
    """Import DeepSpeed, pick its accelerator and hand it our process group."""
    ds = import_deepspeed()
    if _select_accelerator(device) == "cpu":
        _skip_shm_build()
    _ensure_process_group(device)
    ds.init_distributed(dist_backend=dist.get_backend())
    return ds


def initialize(
    model: nn.Module,
    ds_config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    model_parameters: Any,
) -> Any:
    """deepspeed.initialize with our process group; returns the engine.

    `optimizer`/`scheduler` None mean DeepSpeed builds them from the JSON; `model_parameters`
    (parameter groups) then carries the project's no-weight-decay groups into DeepSpeed's
    optimiser.
    """
    ds = import_deepspeed()
    engine, _, _, _ = ds.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=model_parameters if optimizer is None else None,
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def write_ds_config(ds_config: dict[str, Any], path: Path) -> None:
    """The JSON DeepSpeed ran with, saved with the run (atomically: temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
