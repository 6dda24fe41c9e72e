"""The fast CIFAR-10 network of Keller Jordan's airbench94, plus its whitening initialisation."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import make_norm2d
from .registry import PipelineModel, TensorParallelPlan, register_model

WIDTHS = (64, 256, 256)
WIDE_WIDTHS = (128, 384, 384)  # airbench95: ~2.5x the compute per image, +1 point at 15 epochs
MID_WIDTHS = (96, 320, 320)  # ~1.7x airbench94's convolution FLOPs per image, ~0.66x airbench95's
NANO_WIDTHS = (16, 32, 32)  # ~1/20 of airbench94's convolution FLOPs: tests and smoke runs
WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL**2  # every 2x2x3 patch eigenvector and its negation
LOGIT_SCALE = 1 / 9  # airbench's fixed output temperature


class ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool2 -> norm -> GELU -> conv3x3 -> norm -> GELU."""

    def __init__(self, c_in: int, c_out: int, norm: str, groups: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            make_norm2d(norm, c_out, groups),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            make_norm2d(norm, c_out, groups),
            nn.GELU(),
        )


class Head(nn.Module):
    """Global max-pool -> flatten -> bias-free linear -> logits scaled by 1/9."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=False)
        self.scale = LOGIT_SCALE

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1)) * self.scale


class AirbenchNet(PipelineModel):
    def __init__(
        self, num_classes: int, norm: str, groups: int, widths: tuple[int, ...] = WIDTHS
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        # Unpadded 2x2 conv: 32x32 -> 31x31; the three pooled groups then give 15, 7, 3.
        whiten = nn.Conv2d(3, WHITEN_WIDTH, WHITEN_KERNEL, padding=0, bias=True)
        self.stem = nn.Sequential(whiten, nn.GELU())
        chans = (WHITEN_WIDTH, *widths)
        self.blocks = nn.Sequential(
            *(ConvGroup(chans[i], chans[i + 1], norm, groups) for i in range(len(widths)))
        )
        self.head = Head(widths[-1], num_classes)

    @property
    def whiten(self) -> nn.Conv2d:
        # A property, not a second attribute, so the conv appears once in the state dict.
        return cast(nn.Conv2d, self.stem[0])

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        """Each group's conv pair splits column/row (the norm between is local); the stem
        (24 channels) and the group's output norm stay whole; the head splits its features."""
        plan: TensorParallelPlan = {}
        for i in range(len(self.blocks)):
            p = f"blocks.{i}."
            plan.update({p + "0": "colwise", p + "2": "split_norm", p + "4": "rowwise"})
        plan["head.fc"] = "rowwise_whole"
        return plan


def _register_widths(name: str, widths: tuple[int, ...], summary: str) -> None:
    """Register AirbenchNet at `widths` as `name`: the variants differ only in their widths."""

    def factory(
        num_classes: int = 10,
        *,
        norm: str = "batch",
        groups: int = 8,
        se: bool = False,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> nn.Module:
        return AirbenchNet(num_classes, norm, groups, widths)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f'{summary}\n\nApplies: norm, groups (with norm="group"). Ignored: se, dropout, drop_path.'
    )
    register_model(name)(factory)


_register_widths(
    "airbench_net",
    WIDTHS,
    "airbench94's net: 2x2 whitening stem (24 ch) + conv groups of 64/256/256 + max-pool head. "
    "Call `fit_whitening(model.whiten, train_images)` before training to get airbench's init.",
)
_register_widths(
    "airbench_net_wide", WIDE_WIDTHS, "airbench95's net: conv groups of 128/384/384 (4.6M params)."
)
_register_widths(
    "airbench_net_mid",
    MID_WIDTHS,
    "airbench_net with conv groups of 96/320/320 (3.15M params), between airbench94 and 95.",
)
_register_widths(
    "airbench_net_nano",
    NANO_WIDTHS,
    "airbench_net with conv groups of 16/32/32 (~39k params): the same code paths at ~1/20 of "
    "the compute, for tests, smoke runs and debugging (not for accuracy).",
)


@torch.no_grad()
def fit_whitening(
    stem: nn.Conv2d, images: Tensor, eps: float = 5e-4, chunk_size: int = 512
) -> None:
    """Set `stem` to whiten its k x k x C input patches, as airbench does.

    Eigendecomposition of the (uncentred, like airbench: inputs are already normalised) patch
    second-moment matrix; filter i is eigenvector i scaled by 1/sqrt(eigenvalue_i + eps), in
    descending eigenvalue order, and the second half of the filters is the negated first half so
    that a following GELU keeps both signs. The bias is zeroed so the first half of the outputs is
    exactly the whitened patch (airbench leaves its bias at default init and trains it briefly;
    a trainer may still do that). Patches are accumulated in chunks of `chunk_size` images in
    float64, so a few thousand CIFAR images fit comfortably in memory.
    """
    c_out, c_in, kh, kw = stem.weight.shape
    dim = c_in * kh * kw
    if images.ndim != 4 or images.shape[1] != c_in:
        raise ValueError(f"images must be (N, {c_in}, H, W), got {tuple(images.shape)}")
    if c_out != 2 * dim:
        raise ValueError(f"stem needs 2 * {dim} = {2 * dim} output channels, has {c_out}")
    second_moment = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.split(chunk_size):
        # unfold orders each patch as (channel, row, col), the same as a flattened conv filter.
        patches = F.unfold(chunk.double(), (kh, kw)).transpose(1, 2).reshape(-1, dim)
        second_moment += patches.T @ patches
        count += patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment / count)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.reshape(dim, c_in, kh, kw)
    weight = torch.cat((filters, -filters))
    stem.weight.copy_(weight.to(device=stem.weight.device, dtype=stem.weight.dtype))
    if stem.bias is not None:
        stem.bias.zero_()
