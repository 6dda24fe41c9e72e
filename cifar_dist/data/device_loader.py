"""Device-resident loader: the whole split as one uint8 tensor on the training device.

Same BatchSource interface and sharding as the DataLoader path (`loaders.py`): rank r keeps
batches of perm[r : (n // w) * w : w] where perm = torch.randperm(n) from a CPU generator seeded
with seed + epoch (DistributedSampler(shuffle=True, drop_last=True) semantics, identical indices
to `ResumableSampler`), whole optimiser steps per epoch. Augmentation is batch-wise tensor work
on the device (`gpu_augment.py`); its crop, flip and cutout parameters are drawn for all n
samples of the split at once, in dataset order, from a device `torch.Generator` seeded from
(seed, epoch) only, and each rank indexes its own samples: sample i of epoch e is augmented the
same way whatever the world size, so 1, 2 or 4 ranks see identical global batches, and
`set_start_batch(k)` yields exactly batches k.. of the full epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from cifar_dist.config.schema import DataConfig
from cifar_dist.data.augment import batch_mixer, mix_seed, seeded_cpu_rng
from cifar_dist.data.errors import BatchSizeError
from cifar_dist.data.gpu_augment import (
    AugParams,
    Normalise,
    alternating_flip,
    apply_global_mix,
    cutout_,
    draw_global_mix,
    draw_params,
    gather_crop_flip,
    load_store,
    randaugment_grouped,
)
from cifar_dist.data.loaders import ArraySplitLike

# Stream tags of mix_seed. _PARTNER: RandAugment of the mixing partners' batch.
_AUG, _FLIP, _RANDAUG, _MIX, _PARTNER = 3, 4, 5, 6, 7


def _labels(labels: np.ndarray, device: torch.device) -> Tensor:
    # np.array copies: from_numpy on a read-only memmap would warn and share it.
    return torch.from_numpy(np.array(labels, dtype=np.int64)).to(device)


def train_batches(cfg: DataConfig, n: int, micro_batch: int, world_size: int) -> int:
    """Per-rank micro-batches per epoch, with the checks and rounding of `build_loaders`."""
    per_step = micro_batch * world_size
    if micro_batch < 1 or world_size < 1:
        raise ValueError(f"bad loader arguments: {micro_batch=} {world_size=}")
    if cfg.batch_size % per_step:
        raise BatchSizeError(
            f"data.batch_size: {cfg.batch_size} is not a multiple of micro-batch x ranks = {per_step}"
        )
    if n < cfg.batch_size:
        raise BatchSizeError(
            f"data.batch_size: {cfg.batch_size} is more than the {n} images of the train split "
            "(fewer than one global batch); lower data.batch_size or use more data"
        )
    accum = cfg.batch_size // per_step
    # Whole optimiser steps only: a trailing partial step would leave gradients never applied.
    return (n // world_size) // (micro_batch * accum) * accum


def shard_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> Tensor:
    """This rank's DistributedSampler(shuffle=True, drop_last=True) shard of epoch `epoch` (CPU)."""
    g = torch.Generator().manual_seed(seed + epoch)  # exactly DistributedSampler's permutation
    perm = torch.randperm(n, generator=g)
    return perm[rank : (n // world_size) * world_size : world_size]


class DeviceTrainLoader:
    """BatchSource over a device-resident uint8 split; yields normalised images on the device.

    Images: `dtype` NCHW (channels_last memory if asked); labels int64 (B,), or soft float32
    (B, C) with MixUp/CutMix. `set_start_batch(k)` is one-shot, as on the DataLoader path.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: ArraySplitLike,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_classes: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        n = len(split.labels)
        self.n, self.micro, self.rank, self.world = n, micro_batch, rank, world_size
        self.seed, self.num_batches = seed, train_batches(cfg, n, micro_batch, world_size)
        self.device, self.norm = torch.device(device), Normalise(cfg.dataset, dtype, channels_last)
        self.pad, self.flip, self.cutout = cfg.crop_padding, cfg.flip, getattr(cfg, "cutout", 0)
        self.crop_epochs: int = getattr(cfg, "crop_epochs", 0)
        self.store = load_store(split.images, self.pad, self.device)
        self.labels = _labels(split.labels, self.device)
        self.flip_base: Tensor | None = None
        if cfg.flip and getattr(cfg, "flip_mode", "random") == "alternating":
            g = torch.Generator(self.device).manual_seed(mix_seed(seed, _FLIP))  # rank-free
            self.flip_base = torch.rand(n, generator=g, device=self.device) < 0.5
        self.randaugment: v2.RandAugment | None = None
        if cfg.randaugment:
            self.randaugment = v2.RandAugment(magnitude=cfg.randaugment_magnitude)
        self.randaugment_group: int = getattr(cfg, "randaugment_group", 16)
        # MixUp/CutMix over the global batch (gpu_augment.GlobalMix): world-size invariant.
        self.mixing = batch_mixer(cfg, num_classes) is not None  # (validates the alphas)
        self.alphas, self.num_classes = (cfg.mixup_alpha, cfg.cutmix_alpha), num_classes
        self.global_batch = cfg.batch_size
        self.epoch_sizes = list(getattr(cfg, "epoch_sizes", []))
        self.accum = cfg.batch_size // (micro_batch * world_size)
        self.epoch, self._start = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, batch: int) -> None:
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch {batch} is not in 0..{len(self)}")
        self._start = batch

    def epoch_plan(self, epoch: int) -> tuple[Tensor, AugParams]:
        """This rank's sample indices for the epoch's kept batches and their random parameters."""
        kept = self.num_batches * self.micro
        cpu_idx = shard_indices(self.n, self.seed, epoch, self.rank, self.world)[:kept]
        return self._with_params(cpu_idx.to(self.device), epoch)

    def partner_plan(self, epoch: int) -> tuple[Tensor, AugParams]:
        """The mixing partner of each of this rank's samples (as epoch_plan): the sample before
        it in its global batch, by global position in the epoch's permutation (rank r of w holds
        positions r, r + w, ...; a global batch is a block of batch_size positions)."""
        g = torch.Generator().manual_seed(self.seed + epoch)  # shard_indices' permutation
        perm = torch.randperm(self.n, generator=g)
        pos = self.rank + self.world * torch.arange(self.num_batches * self.micro)
        start = pos // self.global_batch * self.global_batch
        partner = perm[start + (pos - start - 1) % self.global_batch]
        return self._with_params(partner.to(self.device), epoch)

    def _with_params(self, idx: Tensor, epoch: int) -> tuple[Tensor, AugParams]:
        # Rank-free: parameters of every sample of the split (dataset order), then this rank's.
        g = torch.Generator(self.device).manual_seed(mix_seed(self.seed, epoch, _AUG))
        n = self.n
        if not self.flip:
            flip: Tensor | None = torch.zeros(n, dtype=torch.bool, device=self.device)
        elif self.flip_base is not None:
            flip = alternating_flip(self.flip_base, torch.arange(n, device=self.device), epoch)
        else:
            flip = None
        params = draw_params(n, self.pad, flip=flip, generator=g, device=self.device)[idx]
        if 0 < self.crop_epochs <= epoch:  # drawn anyway: the other parameters stay the same
            centre = torch.full_like(params.dy, self.pad)
            params = AugParams(centre, centre, params.flip, params.cy, params.cx)
        return idx, params

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._start = self._start, 0
        return self._batches(start, self.epoch)

    def _batches(self, start: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        idx, params = self.epoch_plan(epoch)
        pidx, pparams = self.partner_plan(epoch) if self.mixing else (idx, params)
        for b in range(start, self.num_batches):
            sl = slice(b * self.micro, (b + 1) * self.micro)
            out, labels = self.batch(idx[sl], params[sl], epoch, b)
            if self.mixing:
                partner, plabels = self.batch(pidx[sl], pparams[sl], epoch, b, _PARTNER)
                # one draw per optimiser step, from (seed, epoch, step): the same on every rank
                mix = draw_global_mix(
                    *self.alphas, mix_seed(self.seed, epoch, b // self.accum, _MIX)
                )
                out, labels = apply_global_mix(mix, out, labels, partner, plabels, self.num_classes)
            yield self.resized(out, epoch), labels

    def resized(self, images: Tensor, epoch: int) -> Tensor:
        """Progressive resizing: the epoch's side from data.epoch_sizes (antialiased bilinear,
        computed in float32 and returned in the images' dtype and memory format)."""
        if epoch >= len(self.epoch_sizes) or self.epoch_sizes[epoch] == images.shape[-1]:
            return images
        side = self.epoch_sizes[epoch]
        small = v2.functional.resize(images.float(), [side, side], antialias=True)
        fmt = (
            torch.channels_last
            if images.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        return small.to(images.dtype).contiguous(memory_format=fmt)

    def batch(
        self, idx: Tensor, params: AugParams, epoch: int, b: int, tag: int = _RANDAUG
    ) -> tuple[Tensor, Tensor]:
        """Micro-batch `b` of `epoch` from its sample indices and parameters, unmixed."""
        images = gather_crop_flip(self.store, idx, params).permute(0, 3, 1, 2)  # NCHW view
        if self.randaugment is not None:  # per (rank, batch): not world-size invariant
            with seeded_cpu_rng(mix_seed(self.seed, epoch, b, self.rank, tag)):
                images = randaugment_grouped(images, self.randaugment, self.randaugment_group)
        out = self.norm(images)
        if self.cutout > 0:
            cutout_(out, params.cy, params.cx, self.cutout)
        return out, self.labels[idx]


class DeviceEvalLoader:
    """Unaugmented normalised batches of this rank's exact shard range(rank, n, world), on device.

    Only the shard is copied to the device. Shard sizes differ by at most one across ranks, so
    reduce metric sums and counts, not per-rank means (as with `EvalLoader`).
    """

    def __init__(
        self,
        split: ArraySplitLike,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        dataset: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad eval loader arguments: {rank=} {world_size=} {batch_size=}")
        self.store = load_store(split.images[rank::world_size], 0, torch.device(device))
        self.labels = _labels(split.labels[rank::world_size], torch.device(device))
        self.batch_size, self.norm = batch_size, Normalise(dataset, dtype, channels_last)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, self.num_samples, self.batch_size):
            images = self.store[i : i + self.batch_size].permute(0, 3, 1, 2)
            yield self.norm(images), self.labels[i : i + self.batch_size]


def build_device_loaders(
    cfg: DataConfig,
    splits: Mapping[str, ArraySplitLike],
    *,
    micro_batch: int,
    eval_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[DeviceTrainLoader, dict[str, DeviceEvalLoader]]:
    """`build_loaders` for the device-resident path: same arguments, plus where and how images
    are yielded. `seed` must be the base seed, the same on every rank (it fixes the permutation).
    """
    if "train" not in splits:
        raise ValueError(f"no 'train' split among {sorted(splits)}")
    if eval_batch < 1:
        raise ValueError(f"bad loader arguments: {eval_batch=}")
    fmt = dict(device=device, dtype=dtype, channels_last=channels_last)
    train = DeviceTrainLoader(
        cfg,
        splits["train"],
        micro_batch=micro_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_classes=num_classes,
        **fmt,  # type: ignore[arg-type]
    )
    evals = {
        name: DeviceEvalLoader(
            split,
            batch_size=eval_batch,
            rank=rank,
            world_size=world_size,
            dataset=cfg.dataset,
            **fmt,  # type: ignore[arg-type]
        )
        for name, split in splits.items()
        if name != "train"
    }
    return train, evals
