"""A short fine-tuning loop for a pruned model.

`fit()` cannot be used for this: its resume path restores the optimiser and expects the
checkpoint's architecture, and a pruned model has different shapes. This loop reuses the
project's optimiser/schedule builders and the normal data loaders; it runs in one process,
without parallelism, AMP or EMA (fine-tuning a compressed model is a few CPU/GPU epochs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifar_dist.compress import CompressError
from cifar_dist.config.schema import Config
from cifar_dist.train.optim import build_optimizer, build_scheduler

# Default fine-tuning peak LR as a fraction of the run's own peak LR: the weights are already
# trained, so a full-size peak would undo more than pruning did.
DEFAULT_LR_FRACTION = 0.1


def finetune(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: Config,
    epochs: int,
    *,
    lr: float | None = None,
    max_steps: int = 0,
    device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place for `epochs` epochs (or `max_steps` steps if > 0).

    The optimiser and schedule come from `cfg.optim` / `cfg.schedule` with the peak LR replaced
    by `lr` (default: DEFAULT_LR_FRACTION x cfg.optim.lr). One optimiser step per loader batch.
    Returns one record per epoch: {"epoch", "steps", "loss", "acc", "seconds"}.
    """
    if epochs < 1:
        raise CompressError(f"finetune: epochs must be >= 1, got {epochs}")
    device = device or next(model.parameters()).device
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise CompressError("finetune: the training loader is empty")
    peak = lr if lr is not None else cfg.optim.lr * DEFAULT_LR_FRACTION
    # lr_scaling="none" so `peak` is the LR actually used, whatever the run's scaling rule.
    optim_cfg = replace(cfg.optim, lr=peak, lr_scaling="none")
    optimizer = build_optimizer(model, optim_cfg, cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch, epochs)
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)  # reshuffle / re-augment like the trainer does
        model.train()
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0.0, 0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.train.label_smoothing)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise CompressError(
                    f"finetune: non-finite loss at step {step} (lower --finetune-lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            hard = labels if labels.ndim == 1 else labels.argmax(dim=1)  # mixup gives soft labels
            correct += float((logits.argmax(dim=1) == hard).sum())
            loss_sum += loss_value * labels.shape[0]
            seen += labels.shape[0]
            step += 1
            if 0 < max_steps <= step:
                break
        record = {
            "epoch": epoch + 1,
            "steps": step,
            "loss": loss_sum / max(seen, 1),
            "acc": correct / max(seen, 1),
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if log is not None:
            log(
                f"finetune epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f} "
                f"acc {record['acc']:.4f} ({record['seconds']:.1f} s)"
            )
        if 0 < max_steps <= step:
            break
    model.eval()
    return history
