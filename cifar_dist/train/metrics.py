"""Evaluation metrics with torchmetrics; compute() syncs across ranks, so sharded eval is exact."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def build_metrics(
    num_classes: int, device: torch.device, process_group: Any = None
) -> MetricCollection:
    top5 = min(5, num_classes)
    pg = {"process_group": process_group}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", **pg),
            "top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro", **pg),
            "precision": MulticlassPrecision(num_classes, average="macro", **pg),
            "recall": MulticlassRecall(num_classes, average="macro", **pg),
            "f1": MulticlassF1Score(num_classes, average="macro", **pg),
        }
    ).to(device)


def _flip_pair(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(images) + model(images.flip(-1)))


def tta_logits(
    model: nn.Module, images: torch.Tensor, tta: bool, translate: int = 0
) -> torch.Tensor:
    """Logits averaged over test-time views.

    tta=False: the image alone. tta=True: the image and its horizontal flip, 1/2 each. With
    `translate` = t > 0 as well (airbench's tta_level 2, t = 1): 1/2 on that flip pair plus 1/4
    on each flip pair of the image shifted t pixels up-left and down-right (reflect padding),
    i.e. 6 views weighted as if flip and shift were drawn at random.
    """
    if not tta:
        return model(images)
    logits = _flip_pair(model, images)
    if translate <= 0:
        return logits
    t, h, w = translate, images.shape[-2], images.shape[-1]
    padded = F.pad(images, (t, t, t, t), mode="reflect")
    up_left = padded[..., :h, :w]
    down_right = padded[..., 2 * t : 2 * t + h, 2 * t : 2 * t + w]
    shifted = 0.5 * (_flip_pair(model, up_left) + _flip_pair(model, down_right))
    return 0.5 * logits + 0.5 * shifted


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: bool = False,
    tta_translate: int = 0,
    confusion: bool = False,
    process_group: Any = None,
) -> dict[str, Any]:
    """Loss and metrics over this rank's shard, reduced by torchmetrics over `process_group`
    (None = all ranks; tensor/pipeline-parallel runs pass their dp group, since the ranks of
    one replica see the same images and would otherwise count them several times)."""
    was_training = model.training
    model.eval()
    metrics = build_metrics(num_classes, device, process_group)
    loss_mean = MeanMetric(process_group=process_group).to(device)
    cm = (
        MulticlassConfusionMatrix(num_classes, process_group=process_group).to(device)
        if confusion
        else None
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = next(model.parameters(), None)  # parameterless wrappers (ONNX Runtime) run in float32
    dtype = ref.dtype if ref is not None else torch.float32
    for images, labels in loader:
        images = images.to(device, dtype, non_blocking=True).contiguous(memory_format=fmt)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = tta_logits(model, images, tta, tta_translate)
        logits = logits.to(dtype)
        loss_mean.update(F.cross_entropy(logits, labels, reduction="none"))
        metrics.update(logits, labels)
        if cm is not None:
            cm.update(logits, labels)
    out: dict[str, Any] = {k: float(v) for k, v in metrics.compute().items()}
    out["loss"] = float(loss_mean.compute())
    if cm is not None:
        out["confusion"] = cm.compute().cpu().numpy()
    model.train(was_training)
    return out
