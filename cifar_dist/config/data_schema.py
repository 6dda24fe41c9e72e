"""The `data` section of the run config (schema.py assembles the sections)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cifar_dist.config.errors import check


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    """Which dataset: cifar10 (10 classes) or cifar100 (100 fine classes)."""
    dir: str = ""
    """Data directory; empty means $CIFAR_DIST_DATA, else ./data."""
    source: str = ""
    """Image-folder directory or tar shards to import when no array file exists
    (empty means $CIFAR_DIST_SOURCE, else the canonical pickles, downloaded if missing)."""
    download: bool = True
    """Download the canonical files (MD5-checked) when neither arrays nor a source exist."""
    synthetic: int = 0
    """If > 0 and the data directory holds no dataset yet, first write this many learnable synthetic
    training images (plus synthetic // 5 test images) there in the canonical format; for smoke runs."""
    val_size: int = 5000
    """Images carved from the training split, by `split_seed`, for validation (0 = none)."""
    split_seed: int = 0
    """Seed of the fixed permutation that carves the validation split."""
    subset: int = 0
    """Use only the first N training images after the split (0 = all); for debugging."""
    batch_size: int | Literal["auto"] = 128
    """Global training batch (summed over data-parallel ranks and one optimiser step's micro-batches);
    "auto" = the largest power of two whose measured training memory fits the device with
    `auto_batch_headroom` to spare, capped at `auto_batch_max` (see docs/fast_recipe.md)."""
    auto_batch_max: int = 2048
    """batch_size=auto: never pick more than this (on CPU memory is rarely the limit, this is)."""
    auto_batch_headroom: float = 0.2
    """batch_size=auto: fraction of device memory (CUDA) or available RAM (CPU) left free."""
    eval_batch_size: int = 500
    """Global evaluation batch."""
    loader: Literal["torch", "device", "ffcv"] = "torch"
    """torch: DataLoader + transforms.v2; device: device-resident uint8 tensor; ffcv: .beton files."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the main process)."""
    pin_memory: bool = True
    """Pin host memory for faster copies to a GPU (ignored on CPU)."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive across epochs."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead."""
    crop_padding: int = 4
    """Pixels of padding for the random crop (0 = no crop)."""
    crop_epochs: int = 0
    """With crop_padding (loader=device): random translation in the first N epochs only; later
    epochs see every image centred (augmentation reduced toward the end; 0 = every epoch)."""
    flip: bool = True
    """Random horizontal flip."""
    flip_mode: Literal["random", "alternating"] = "random"
    """With flip: random = a fair coin per image per epoch; alternating = each image mirrored in
    every other epoch (airbench; loader=device only)."""
    cutout: int = 0
    """Side in pixels of a square cut out of each training image and filled with the dataset
    mean (loader=device|ffcv; 0 = off)."""
    epoch_sizes: list[int] = field(default_factory=list)
    """Progressive resizing (loader=device): the training images' side for the first epochs, in
    order (e.g. [24, 24, 28]: epochs 1-2 at 24 px, epoch 3 at 28); later epochs and evaluation
    use the full 32 px. Needs a model that pools globally (airbench, resnet), not the ViT."""
    randaugment_group: int = 16
    """loader=device: images that share one RandAugment draw (1 = per image; larger = faster)."""
    ffcv_order: Literal["random", "quasi_random"] = "random"
    """loader=ffcv: random = exact DistributedSampler shards, resumable; quasi_random = FFCV's
    page-local order, one process only."""
    randaugment: bool = False
    """RandAugment (transforms.v2) on the training images."""
    randaugment_magnitude: int = 9
    """RandAugment magnitude (0..30)."""
    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha) parameter (0 = off)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) parameter (0 = off)."""

    def __post_init__(self) -> None:
        check(self.val_size >= 0, "data.val_size", "must be >= 0")
        check(self.subset >= 0, "data.subset", "must be >= 0")
        check(self.synthetic >= 0, "data.synthetic", "must be >= 0")
        check(
            self.batch_size == "auto" or self.batch_size >= 1,
            "data.batch_size",
            "must be >= 1 or auto",
        )
        check(self.auto_batch_max >= 1, "data.auto_batch_max", "must be >= 1")
        check(0 <= self.auto_batch_headroom < 1, "data.auto_batch_headroom", "must be in [0, 1)")
        check(self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        check(0 <= self.crop_padding <= 16, "data.crop_padding", "must be in 0..16")
        check(
            0 <= self.randaugment_magnitude <= 30, "data.randaugment_magnitude", "must be in 0..30"
        )
        check(self.mixup_alpha >= 0, "data.mixup_alpha", "must be >= 0")
        check(self.cutmix_alpha >= 0, "data.cutmix_alpha", "must be >= 0")
        check(0 <= self.cutout <= 32, "data.cutout", "must be in 0..32")
        check(self.randaugment_group >= 1, "data.randaugment_group", "must be >= 1")
        check(
            all(8 <= side <= 32 for side in self.epoch_sizes),
            "data.epoch_sizes",
            f"sides must be in 8..32, got {self.epoch_sizes}",
        )
        check(self.crop_epochs >= 0, "data.crop_epochs", "must be >= 0")
        if self.loader != "device":
            check(not self.epoch_sizes, "data.epoch_sizes", "needs data.loader=device")
            check(self.crop_epochs == 0, "data.crop_epochs", "needs data.loader=device")
        if self.loader == "torch":
            check(self.cutout == 0, "data.cutout", "needs data.loader=device or ffcv")
            check(
                self.flip_mode == "random", "data.flip_mode", "alternating needs data.loader=device"
            )
        if self.loader == "ffcv":
            check(
                not self.randaugment, "data.randaugment", "is not available with data.loader=ffcv"
            )
            check(
                self.flip_mode == "random", "data.flip_mode", "alternating needs data.loader=device"
            )

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10
