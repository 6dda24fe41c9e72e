"""Learning-rate arithmetic on the optimiser config: batch-size scaling and lr units.

A leaf module (config schema only): both cifar_dist.train.optim and the DeepSpeed JSON in
cifar_dist.parallel use it, and parallel must not import train.
"""

from __future__ import annotations

import math

from cifar_dist.config.schema import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The explicit batch-size rule: lr * (B / B_ref) (linear) or its square root (sqrt)."""
    ratio = global_batch / cfg.base_batch_size
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def momentum_scale(momentum: float) -> float:
    """How much larger than the gradient a Nesterov step becomes under a constant gradient, as
    airbench defines it (1 + 1 / (1 - momentum)); dividing by it decouples lr from momentum."""
    return 1.0 + 1.0 / (1.0 - momentum)


def torch_lr_and_decay(cfg: OptimConfig, lr: float, global_batch: int) -> tuple[float, float]:
    """(torch lr for a mean loss, weight decay *per step* as a fraction of each weight).

    lr_units=torch: lr as given, per-step decay lr * weight_decay (SGD's L2 term).
    lr_units=per_1024 (airbench): `lr` moves the weights per 1024 examples' summed gradient, so
    with a mean loss over B examples torch's lr is lr * B / (1024 * momentum_scale); the decay
    is `weight_decay` per 1024 examples, B / (1024 * momentum_scale) of it per step.
    """
    if cfg.lr_units == "torch":
        return lr, lr * cfg.weight_decay
    per_step = global_batch / (1024.0 * momentum_scale(cfg.momentum))
    return lr * per_step, cfg.weight_decay * per_step
