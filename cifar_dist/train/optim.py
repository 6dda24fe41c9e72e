"""Optimisers and LR schedules, built from torch.optim and torch.optim.lr_scheduler."""

from __future__ import annotations

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

# Re-exported: the LR arithmetic lives in a leaf module so cifar_dist.parallel (DeepSpeed JSON)
# can use it without importing cifar_dist.train.
from cifar_dist.utils.lr import scaled_lr, torch_lr_and_decay


def _norm_params(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of (norm-layer biases, norm-layer weights) of the CNN norms and LayerNorms."""
    biases, weights = set(), set()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "bias", None) is not None:
                biases.add(id(m.bias))
            if getattr(m, "weight", None) is not None:
                weights.add(id(m.weight))
    return biases, weights


def param_groups(
    model: nn.Module, cfg: OptimConfig, lr: float, decay_per_step: float, muon: bool = False
) -> list[dict]:
    """Parameter groups with their own lr and torch weight-decay coefficient.

    Groups: weights (>= 2-D; decayed), vectors (biases, norm scales, pos_embed/cls_token; no
    decay unless `decay_vectors`), norm biases (lr x `norm_bias_lr_scale`), and with `muon` the
    4-D conv filters (flagged "muon": True). A group's L2 coefficient is decay_per_step / its lr,
    so every decayed group loses the same fraction per step whatever its lr multiplier (airbench:
    the bias multiplier scales the lr, not the decay). The first group is the main weights
    group, whose lr the trainer logs. Frozen (requires_grad=False) parameters are left out.
    """
    norm_biases, _ = _norm_params(model)
    kinds: dict[str, list[nn.Parameter]] = {
        "weights": [],
        "vectors": [],
        "norm_bias": [],
        "muon": [],
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if muon and p.ndim == 4:
            kinds["muon"].append(p)
        elif id(p) in norm_biases:
            kinds["norm_bias"].append(p)
        elif p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")):
            kinds["vectors"].append(p)
        else:
            kinds["weights"].append(p)
    scale = {"weights": 1.0, "vectors": 1.0, "norm_bias": cfg.norm_bias_lr_scale}
    groups: list[dict] = []
    for kind in ("weights", "vectors", "norm_bias"):
        group_lr = lr * scale[kind]
        decayed = kind == "weights" or cfg.decay_vectors
        wd = decay_per_step / group_lr if decayed and group_lr > 0 else 0.0
        groups.append({"params": kinds[kind], "lr": group_lr, "weight_decay": wd, "kind": kind})
    if muon:
        groups.append(
            {
                "params": kinds["muon"],
                "lr": cfg.muon_lr,
                "momentum": cfg.muon_momentum,
                "weight_decay": 0.0,
                "muon": True,
                "kind": "muon",
            }
        )
    return [g for g in groups if g["params"]]


def adamw_param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """param_groups for AdamW, whose decay is decoupled (lr * wd per step): the torch coefficient
    stays as configured on every decayed group."""
    groups = param_groups(model, cfg, lr, lr * cfg.weight_decay)
    for g in groups:
        g["weight_decay"] = cfg.weight_decay if g["weight_decay"] > 0 else 0.0
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    lr, decay = torch_lr_and_decay(cfg, scaled_lr(cfg, global_batch), global_batch)
    if cfg.name == "adamw":
        groups = adamw_param_groups(model, cfg, lr)
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2))
    nesterov = cfg.nesterov and cfg.momentum > 0
    groups = param_groups(model, cfg, lr, decay, muon=cfg.name == "muon")
    if cfg.name == "muon":
        from cifar_dist.train.muon import MuonSGD

        return MuonSGD(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=nesterov,
            ns_steps=cfg.muon_ns_steps,
            normalize=cfg.muon_normalize,
        )
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=nesterov)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> LRScheduler:
    """Stepped once per optimiser step over `epochs * steps_per_epoch` steps."""
    total = max(1, steps_per_epoch * epochs)
    if cfg.name == "onecycle":
        if total < 3:  # too short for a rise and a fall: OneCycleLR would divide by zero
            return ConstantLR(optimizer, factor=1.0, total_iters=0)
        # Each phase needs at least one step (OneCycleLR divides by the phase length).
        pct = min(max(cfg.pct_start, 2 / total), (total - 1) / total)
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total, pct_start=pct)
    if cfg.name == "triangle":
        return triangle_schedule(optimizer, cfg, total)
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


def triangle_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total: int
) -> LRScheduler:
    """airbench's triangle: start_factor -> 1 over pct_start of the steps, then -> end_factor.

    Two torch LinearLRs in sequence; the second starts where the first ends (factor 1).
    """
    peak = min(max(1, int(cfg.pct_start * total)), total - 1)
    if peak < 1:  # a one-step run: constant at the start factor
        return LinearLR(optimizer, cfg.start_factor, cfg.start_factor, total_iters=1)
    up = LinearLR(optimizer, start_factor=cfg.start_factor, end_factor=1.0, total_iters=peak)
    down = LinearLR(
        optimizer, start_factor=1.0, end_factor=cfg.end_factor, total_iters=total - peak
    )
    return SequentialLR(optimizer, [up, down], milestones=[peak])
