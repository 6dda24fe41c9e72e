"""Pieces every trainer shares: model construction, batch arithmetic, step results, errors."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from cifar_dist.config.schema import Config, ConfigError
from cifar_dist.models import create_model

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively. On a CPU without AVX-512 BF16 / AMX, oneDNN
    emulates bf16 and autocast is far slower than fp32 (resnet18 fwd+bwd ~24x on an AVX2 EPYC,
    docs/benchmarks.md); torch has no public query, so this asks oneDNN as torch's tests do."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def native_bf16_on_every_rank(device: torch.device) -> bool:
    """native_bf16 agreed by all ranks (a job across mixed nodes, e.g. an A100 and a V100, must
    not autocast on some ranks only: DeepSpeed's config and the per-rank numerics would differ).
    Every rank calls this at the same point (resolve_amp runs on the same config everywhere)."""
    native = native_bf16(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return native
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(native)], device=where)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resolve_amp(cfg: Config, device: torch.device) -> Config:
    """`cfg` with train.amp=auto replaced by what every rank's device runs: bf16 where it is
    native on all of them (and the run is float32), else none. Runs record the resolved value in
    config.yaml."""
    if cfg.train.amp != "auto":
        return cfg
    native = cfg.train.dtype == "float32" and native_bf16_on_every_rank(device)
    return replace(cfg, train=replace(cfg.train, amp="bf16" if native else "none"))


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradient norms."""


@dataclass
class StepResult:
    """What one optimiser step reports back to the epoch loop (this rank's view)."""

    lr: float
    losses: list[float] = field(default_factory=list)
    """Mean loss of each micro-batch."""
    loss_sum: float = 0.0
    """Sum over samples of the loss (for the epoch mean)."""
    correct: float = 0.0
    seen: int = 0
    grad_norm: float = 0.0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.losses.append(loss)
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n


class Preempted(RuntimeError):
    """A SIGTERM/SIGUSR1 stopped the run after a checkpoint; resume with --train.resume=auto."""


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    m = cfg.model
    model = create_model(
        m.name,
        num_classes=cfg.data.num_classes,
        norm=m.norm,
        groups=m.groups,
        se=m.se,
        dropout=m.dropout,
        drop_path=m.drop_path,
    )
    from cifar_dist.train.model_init import apply_model_options

    apply_model_options(model, m)  # norm momentum/eps/frozen scale, dirac init (recipe options)
    fmt = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    return model.to(device=device, dtype=dtype, memory_format=fmt)


def micro_batch_size(cfg: Config, dp: int) -> int:
    per_step = dp * cfg.train.grad_accum
    if cfg.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by dp*grad_accum = {per_step}"
        )
    return cfg.data.batch_size // per_step
