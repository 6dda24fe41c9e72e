"""The highest-loss validation images at the end of training, for the W&B table.

Why a pass of its own over the validation split: the trainers evaluate through torchmetrics
(cifar_dist/train/metrics.py), which keeps no per-sample losses, and their evaluation is being
redesigned; one more forward pass over the validation shard at the very end costs about one
evaluation. Each rank keeps only its own top k (on the CPU), rank 0 gathers the k of every
data-parallel rank and keeps the global top k: no rank ever holds more than k x world images.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cifar_dist.data.augment import mean_std


def wanted(trainer: Any, cfg: Any) -> bool:
    """Only with W&B on, a validation split, and the Trainer's own evaluation path (the
    DeepSpeed pipeline engine evaluates through its own eval_batch)."""
    from cifar_dist.logging.wandb_sink import resolve_settings
    from cifar_dist.train.trainer import Trainer

    return (
        cfg.log.wandb.worst_images > 0
        and resolve_settings(cfg.log.wandb)["mode"] != "disabled"
        and "val" in trainer.eval_loaders
        and type(trainer).evaluate_split is Trainer.evaluate_split
        and type(trainer)._evaluate is Trainer._evaluate
    )


@torch.no_grad()
def _local_top_k(trainer: Any, k: int) -> list[dict[str, Any]]:
    from cifar_dist.train.metrics import tta_logits

    cfg, device, model = trainer.cfg, trainer.device, trainer.eval_model()
    was_training = model.training
    model.eval()
    ref = next(model.parameters())
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    best: list[dict[str, Any]] = []
    for images, labels in trainer.eval_loaders["val"]:
        x = images.to(device, ref.dtype).contiguous(memory_format=fmt)
        labels = labels.to(device)
        amp = trainer.amp_dtype
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = tta_logits(model, x, cfg.train.tta, cfg.train.tta_translate)
        probs = logits.float().softmax(-1)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        for i in loss.topk(min(k, len(loss))).indices.tolist():
            conf, pred = probs[i].max(0)
            best.append(
                {
                    "image": images[i].detach().float().cpu(),
                    "true": int(labels[i]),
                    "pred": int(pred),
                    "confidence": float(conf),
                    "true_prob": float(probs[i, labels[i]]),
                    "loss": float(loss[i]),
                }
            )
        best = sorted(best, key=lambda r: -r["loss"])[:k]
    model.train(was_training)
    return best


def _to_uint8(image: torch.Tensor, dataset: str) -> Any:
    """HWC uint8 for display: loaders hand out normalised float (or raw uint8) images."""
    if image.max() > 1.5 and image.min() >= 0:  # uint8-valued (the device loader's raw path)
        return image.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in mean_std(dataset))  # type: ignore[arg-type]
    return (
        (image * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    )


def collect_worst(trainer: Any, cfg: Any) -> list[dict[str, Any]]:
    """Collective (every rank calls it when `wanted`): the global top-k rows on rank 0, [] elsewhere."""
    k = cfg.log.wandb.worst_images
    with contextlib.ExitStack() as stack:  # the weights evaluation uses (e.g. EMA's)
        for cb in trainer.callbacks:
            stack.enter_context(cb.eval_weights(trainer))
        rows = _local_top_k(trainer, k)
    if dist.is_available() and dist.is_initialized():
        group = trainer.eval_group  # tp/pp peers of one replica saw the same images
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, rows, group=group)
        rows = [r for part in gathered for r in part]
    if not trainer.info.is_main:
        return []
    rows = sorted(rows, key=lambda r: -r["loss"])[:k]
    for r in rows:
        r["image"] = _to_uint8(r["image"], cfg.data.dataset)
    return rows
