"""CIFAR augmentation pipelines built from torchvision.transforms.v2.

Per-image transforms (`train_transform`, `eval_transform`) take uint8 CHW tensors (or an NCHW
batch for the eval transform, which has no randomness) and return float32 normalised tensors.
`batch_mixer` returns a batch-wise MixUp / CutMix that turns int64 (B,) labels into soft (B, C).

transforms.v2 draws its random parameters from the global CPU torch RNG; `loaders.py` runs each
sample's (and each batch's) transform under `seeded_cpu_rng(mix_seed(...))` from this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torchvision.transforms import v2

from cifar_dist.config.schema import DataConfig

# Per-channel (R, G, B) statistics of the training images on the 0..1 scale.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

DatasetName = Literal["cifar10", "cifar100"]
_MASK64 = (1 << 64) - 1


def mean_std(dataset: DatasetName = "cifar10") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel on the 0..1 scale for `dataset`."""
    if dataset == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return CIFAR10_MEAN, CIFAR10_STD


def _to_float_normalised(dataset: DatasetName) -> list[v2.Transform]:
    mean, std = mean_std(dataset)
    # scale=True maps uint8 0..255 to 0..1 so the 0..1-scale statistics above apply.
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(cfg: DataConfig) -> v2.Compose:
    """Per-image training augmentation on a uint8 (3, 32, 32) tensor -> float32 normalised.

    Order: random crop, horizontal flip, RandAugment (all on uint8, where RandAugment's colour
    ops are defined), then float conversion and normalisation.
    """
    ops: list[v2.Transform] = []
    if cfg.crop_padding > 0:
        # Zero padding, the classic CIFAR recipe (He et al. 2016), not reflect: torch's reflect
        # pad kernel is ~20x slower on a 32x32 image when intra-op threads > 1 (measured 2.6 ms
        # vs 0.11 ms with 2 threads), which hits num_workers=0, where this runs in the trainer.
        ops.append(v2.RandomCrop(32, padding=cfg.crop_padding, padding_mode="constant", fill=0))
    if cfg.flip:
        ops.append(v2.RandomHorizontalFlip(p=0.5))
    if cfg.randaugment:
        ops.append(v2.RandAugment(magnitude=cfg.randaugment_magnitude))
    return v2.Compose(ops + _to_float_normalised(cfg.dataset))


def eval_transform(dataset: DatasetName = "cifar10") -> v2.Compose:
    """Deterministic uint8 -> float32 normalised; works on one CHW image or an NCHW batch."""
    return v2.Compose(_to_float_normalised(dataset))


def batch_mixer(cfg: DataConfig, num_classes: int) -> v2.Transform | None:
    """MixUp, CutMix, or a 50/50 choice of both per batch; None when both alphas are 0.

    Call it on a float NCHW batch and int64 (B,) labels; it returns soft float (B, C) labels.
    """
    mixers: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (a splitmix64 chain).

    By hand because tuple hash() is not a stable API and numpy's SeedSequence costs ~5x more
    on this per-sample path (~2 us here).
    """
    h = 0
    for v in values:
        h = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run a block with the global CPU RNG seeded, restoring the caller's state afterwards."""
    # devices=[]: v2 transforms draw their parameters on the CPU generator only, and forking
    # CUDA state would cost time (and initialise CUDA inside workers).
    with torch.random.fork_rng(devices=[]):
        # Not torch.manual_seed: it also reseeds every CUDA generator, which fork_rng(devices=[])
        # would then not restore (GPU dropout masks would follow the data seed).
        torch.default_generator.manual_seed(seed)
        yield
