"""DataLoader path: exact eval shards, resumable distributed training order, seeded augmentation.

Determinism contract: the augmentation of sample i in epoch e is a pure function of
(seed, epoch, i), and the MixUp/CutMix of batch b on data-parallel rank r a pure function of
(seed, epoch, b, r), whatever `num_workers` is and whether the run resumed mid-epoch.
transforms.v2 draws from the global CPU RNG, so each sample's transform runs inside
`fork_rng` after seeding it from a hash of those numbers. The sampler yields (index, epoch)
pairs because persistent workers hold dataset copies that never see `set_epoch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from cifar_dist.config.schema import DataConfig
from cifar_dist.data.augment import (
    batch_mixer,
    eval_transform,
    mix_seed,
    seeded_cpu_rng,
    train_transform,
)
from cifar_dist.data.errors import BatchSizeError

# Stream tags keep the per-sample, per-batch and worker-seed hashes apart.
_SAMPLE, _BATCH, _WORKERS = 0, 1, 2


class ArraySplitLike(Protocol):
    """uint8 (N, 32, 32, 3) HWC `images` (may be a read-only memmap), int64 (N,) `labels`."""

    images: np.ndarray
    labels: np.ndarray


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer iterates; the DataLoader path and the device-resident loader share it.

    Iterating yields (images float32 NCHW normalised, labels int64 (B,) or soft float (B, C));
    `len` is the full epoch's batch count; `set_start_batch(k)` makes the next iteration
    start at batch k of the current epoch.
    """

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def set_start_batch(self, batch: int) -> None: ...


class ShardSampler(Sampler[int]):
    """Exact eval shard without padding: rank r of w gets range(r, n, w).

    Every sample is seen exactly once across ranks even when n % w != 0, unlike
    DistributedSampler, which pads with duplicates; shard sizes then differ by at most one,
    so reduce metric sums and counts across ranks, not per-rank means.
    """

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler(shuffle=True, drop_last=True) that can start mid-epoch.

    The parent gives the per-epoch permutation from seed + epoch and equal shards of
    floor(n / w) per rank; this keeps the first `num_batches` whole batches of the shard,
    skips the first `start_batch` of them, and yields (index, epoch) pairs.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, batch: int, batches: int) -> None:
        # The parent only needs len(dataset); range(n) keeps the dataset out of the sampler.
        super().__init__(range(n), num_replicas=world, rank=rank, seed=seed, drop_last=True)
        if batches * batch > self.num_samples:
            raise ValueError(f"{batches} batches of {batch} exceed the shard of {self.num_samples}")
        self.batch_size, self.num_batches, self.start_batch = batch, batches, 0

    def set_start_batch(self, batch: int) -> None:
        if not 0 <= batch <= self.num_batches:
            raise ValueError(f"start batch {batch} is not in 0..{self.num_batches}")
        self.start_batch = batch

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        shard = list(super().__iter__())
        kept = shard[self.start_batch * self.batch_size : self.num_batches * self.batch_size]
        return iter([(int(i), self.epoch) for i in kept])

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size


class AugmentedSamples(Dataset[tuple[Tensor, int]]):
    """Map-style dataset keyed by (index, epoch); the transform is seeded per (seed, epoch, index)."""

    def __init__(self, split: ArraySplitLike, transform: v2.Transform, seed: int) -> None:
        self.images, self.labels = split.images, split.labels
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key
        # np.array copies the 3 KiB image: from_numpy on a read-only memmap would warn and share it.
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1).contiguous()
        with seeded_cpu_rng(mix_seed(self.seed, epoch, index, _SAMPLE)):
            return self.transform(image), int(self.labels[index])


class BatchedArrays(Dataset[tuple[Tensor, Tensor]]):
    """Indexed by a whole batch of indices, so numpy gathers and v2 normalises it in one call."""

    def __init__(self, split: ArraySplitLike, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.array(self.images[idx])).permute(0, 3, 1, 2)
        labels = torch.from_numpy(np.array(self.labels[idx], dtype=np.int64))
        return self.transform(images.contiguous()), labels


class TrainLoader:
    """The trainer's BatchSource on the DataLoader path (built by `build_loaders`).

    `len()` is always the full epoch's batch count for this rank, also after
    `set_start_batch(k)`; that call is one-shot: the next iteration yields batches k..len-1 of
    the current epoch and the one after starts at 0 again (so its order relative to
    `set_epoch` does not matter).
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: ArraySplitLike,
        sampler: ResumableSampler,
        *,
        seed: int,
        rank: int,
        num_classes: int,
    ) -> None:
        self.seed, self.rank, self._start = seed, rank, 0
        self.sampler, self.mixer = sampler, batch_mixer(cfg, num_classes)
        workers = cfg.num_workers
        self.loader = DataLoader(
            AugmentedSamples(split, train_transform(cfg), self.seed),
            batch_size=sampler.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=cfg.persistent_workers and workers > 0,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            # Own generator: otherwise each iter() draws the workers' base seed from the global
            # RNG, perturbing the trainer's stream. Augmentation does not depend on it.
            generator=torch.Generator().manual_seed(mix_seed(self.seed, self.rank, _WORKERS)),
        )

    def __len__(self) -> int:
        return self.sampler.num_batches

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_start_batch(self, batch: int) -> None:
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch {batch} is not in 0..{len(self)}")
        self._start = batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._start = self._start, 0
        self.sampler.set_start_batch(start)
        return self._batches(iter(self.loader), start, self.sampler.epoch)

    def _batches(self, it: Iterator, start: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for b, (images, labels) in enumerate(it, start=start):
            if self.mixer is not None:
                # Main process, seeded by the absolute batch index so a resumed epoch mixes alike;
                # the rank is in the seed so ranks do not share lambdas / boxes.
                with seeded_cpu_rng(mix_seed(self.seed, epoch, b, self.rank, _BATCH)):
                    images, labels = self.mixer(images, labels)
            yield images, labels


class EvalLoader:
    """Deterministic, unaugmented batches of (images, int64 labels) over this rank's exact shard."""

    def __init__(
        self, split: ArraySplitLike, *, batch_size: int, rank: int, world_size: int, cfg: DataConfig
    ) -> None:
        self.sampler = ShardSampler(len(split.labels), rank, world_size)
        # batch_size=None with a BatchSampler as the sampler hands the dataset whole index lists
        # (one vectorised gather per batch). No workers: two vectorised ops cost less than IPC.
        self.loader = DataLoader(
            BatchedArrays(split, eval_transform(cfg.dataset)),
            sampler=BatchSampler(self.sampler, batch_size, drop_last=False),
            batch_size=None,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        )

    @property
    def num_samples(self) -> int:
        """Samples in this rank's shard (shards differ by at most one across ranks)."""
        return len(self.sampler)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.loader)


def build_loaders(
    cfg: DataConfig,
    splits: Mapping[str, ArraySplitLike],
    *,
    micro_batch: int,
    eval_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    num_classes: int,
) -> tuple[TrainLoader, dict[str, EvalLoader]]:
    """The training loader for splits["train"] and an eval loader for every other split.

    `rank` / `world_size` are the data-parallel rank and degree. `seed` must be the same on
    every rank (the base seed, not a per-rank offset): it fixes the permutation the ranks split.
    `cfg.batch_size` must equal micro_batch * world_size * grad_accum; an epoch keeps whole
    optimiser steps only, so `len(train) % grad_accum == 0`.
    """
    if "train" not in splits:
        raise ValueError(f"no 'train' split among {sorted(splits)}")
    train = splits["train"]
    n, per_step = len(train.labels), micro_batch * world_size
    if micro_batch < 1 or eval_batch < 1 or world_size < 1 or len(train.images) != n:
        raise ValueError(f"bad loader arguments: {micro_batch=} {eval_batch=} {world_size=}")
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
    batches = (n // world_size) // (micro_batch * accum) * accum
    sampler = ResumableSampler(n, rank, world_size, seed, micro_batch, batches)
    train_loader = TrainLoader(cfg, train, sampler, seed=seed, rank=rank, num_classes=num_classes)
    evals = {
        name: EvalLoader(split, batch_size=eval_batch, rank=rank, world_size=world_size, cfg=cfg)
        for name, split in splits.items()
        if name != "train"
    }
    return train_loader, evals
