"""Optimisers and LR schedules, built from torch.optim and torch.optim.lr_scheduler."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    SequentialLR,
)

from cifar_dist.config.schema import OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The explicit batch-size rule: lr * (B / B_ref) (linear) or its square root (sqrt)."""
    ratio = global_batch / cfg.base_batch_size
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norm weights and embeddings-like 1-D/0-D tensors (standard practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_vector = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if is_vector else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, global_batch)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> LRScheduler:
    """Stepped once per optimiser step over `epochs * steps_per_epoch` steps."""
    total = max(1, steps_per_epoch * epochs)
    if cfg.name == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total, pct_start=cfg.pct_start)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    rest = total - warmup
    if cfg.name == "cosine":
        base_lr = optimizer.param_groups[0]["lr"]
        main: LRScheduler = CosineAnnealingLR(
            optimizer, T_max=rest, eta_min=base_lr * cfg.min_lr_ratio
        )
    elif cfg.name == "multistep":
        milestones = sorted({max(1, int(m * total) - warmup) for m in cfg.milestones})
        main = MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
