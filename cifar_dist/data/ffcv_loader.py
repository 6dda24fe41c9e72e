"""FFCV path: `.beton` files written from the array store, read by FFCV's Loader.

Optional (`pip install 'cifar-dist[ffcv]'` after the system libraries, see docs/fast_data.md);
ffcv is imported inside functions only. Training order is exact and resumable: a custom FFCV
TraversalOrder yields this rank's DistributedSampler(shuffle, drop_last=True) shard of epoch e,
the same indices as the other loaders. FFCV's own `distributed=True` pads the shards with
duplicates (drop_last=False) and its QUASI_RANDOM order refuses distributed mode, so
`quasi_random` is single-process only. FFCV's augmentations draw from numba's unseeded per-thread
RNG: the order and MixUp/CutMix are deterministic under a seed, flips/translates/cutout are not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cifar_dist.config.schema import DataConfig
from cifar_dist.data.arrays import _exclusive, load_splits, resolve_data_dir
from cifar_dist.data.augment import batch_mixer, mean_std, mix_seed, seeded_cpu_rng
from cifar_dist.data.device_loader import shard_indices, train_batches
from cifar_dist.data.gpu_augment import Normalise
from cifar_dist.data.loaders import ArraySplitLike

_BATCH = 1  # the MixUp/CutMix stream tag of loaders.py: same draws on every path


def require_ffcv() -> Any:
    """The ffcv module, or a MissingExtraError (an ImportError) with the install line."""
    from cifar_dist.config.extras import MissingExtraError, missing_message

    try:
        import ffcv
    except ImportError:
        raise MissingExtraError(missing_message("ffcv", "data.loader=ffcv")) from None
    return ffcv


def beton_paths(
    cfg: DataConfig, splits: Mapping[str, ArraySplitLike], out_dir: Path | None = None
) -> dict[str, Path]:
    """<data dir>/<dataset>/ffcv/<split>-<n>-<fingerprint>.beton, keyed on the split's content
    (all labels and every (n // 64)-th image), so a changed carve or store never reuses a stale
    file whatever the config says."""
    root = Path(out_dir) if out_dir else resolve_data_dir(cfg) / cfg.dataset / "ffcv"
    paths = {}
    for name, split in splits.items():
        n = len(split.labels)
        digest = hashlib.sha1(np.ascontiguousarray(split.labels).tobytes())
        digest.update(np.ascontiguousarray(split.images[:: max(1, n // 64)]).tobytes())
        paths[name] = root / f"{name}-{n}-{digest.hexdigest()[:12]}.beton"
    return paths


class _Samples:
    """Indexable (image HWC uint8, label) pairs, in the writer's field order."""

    def __init__(self, split: ArraySplitLike) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.split.images[i]), int(self.split.labels[i])


def write_betons(
    cfg: DataConfig,
    splits: Mapping[str, ArraySplitLike] | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """`cifar-dist data beton`: each split of `load_splits(cfg)` as a .beton (RGBImageField raw,
    IntField); returns the paths. Under a lock, each file written to a temp name and renamed, so
    concurrent ranks are safe; existing files are kept unless `overwrite`."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    splits = load_splits(cfg) if splits is None else splits
    paths = beton_paths(cfg, splits, out_dir)
    root = next(iter(paths.values())).parent
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f"{root.name}.lock"):
        for name, path in paths.items():
            if path.is_file() and not overwrite:
                continue
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
            try:
                writer = DatasetWriter(str(tmp), fields, num_workers=max(1, cfg.num_workers))
                writer.from_indexed_dataset(_Samples(splits[name]))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return paths


def _pipelines(
    cfg: DataConfig, device: torch.device, norm: Normalise, train: bool
) -> dict[str, list[Any]]:
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import (
        Convert,
        Cutout,
        NormalizeImage,
        RandomHorizontalFlip,
        RandomTranslate,
        Squeeze,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    mean, std = (np.array(v) * 255 for v in mean_std(cfg.dataset))
    image: list[Any] = [SimpleRGBImageDecoder()]
    if train and cfg.flip:
        image.append(RandomHorizontalFlip())
    if train and cfg.crop_padding:
        image.append(RandomTranslate(padding=cfg.crop_padding, fill=(0, 0, 0)))
    if train and getattr(cfg, "cutout", 0):
        image.append(Cutout(getattr(cfg, "cutout", 0), fill=tuple(int(m) for m in mean)))
    if device.type == "cpu":  # NormalizeImage: uint8 -> float32 (x - mean) / std in one numba pass
        image += [
            NormalizeImage(mean, std, np.float32),
            ToTensor(),
            ToTorchImage(norm.channels_last),
        ]
        image += [Convert(norm.dtype)] if norm.dtype != torch.float32 else []
    else:  # FFCV's NormalizeImage needs cupy on CUDA: copy uint8 (4x fewer bytes), normalise there
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(norm.channels_last)]
    label = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
    return {"image": image, "label": label}


def _own(images: Tensor, labels: Tensor, norm: Normalise) -> tuple[Tensor, Tensor]:
    """Batches the caller owns: FFCV yields views of a ring of buffers that it overwrites a few
    batches later, so a consumer that keeps batches (list(loader), prefetching) would see them
    change. The CUDA pipeline's uint8 output is normalised here, into a fresh tensor."""
    if images.dtype == torch.uint8:  # FFCV's NormalizeImage needs cupy on CUDA
        images = norm(images)
    else:
        images = images.clone(memory_format=torch.preserve_format)
    return images, labels.to(torch.int64, copy=True)


class FFCVTrainLoader:
    """BatchSource over a .beton; same shards, `len`, `set_epoch`, `set_start_batch` as the others."""

    def __init__(
        self,
        cfg: DataConfig,
        path: Path,
        n: int,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_classes: int,
        device: torch.device,
        norm: Normalise,
    ) -> None:
        from ffcv.loader import Loader, OrderOption

        if cfg.randaugment or getattr(cfg, "flip_mode", "random") != "random":
            raise ValueError(
                "data.loader=ffcv: randaugment and alternating flip need loader=device"
            )
        self.quasi = getattr(cfg, "ffcv_order", "random") == "quasi_random"
        if self.quasi and world_size > 1:
            raise ValueError("data.ffcv_order=quasi_random: FFCV supports it in one process only")
        self.n, self.micro, self.rank, self.world = n, micro_batch, rank, world_size
        self.seed, self.num_batches = seed, train_batches(cfg, n, micro_batch, world_size)
        self.norm, self.mixer = norm, batch_mixer(cfg, num_classes)
        self.epoch, self._start, self._iter_start = 0, 0, 0
        self.loader = Loader(
            str(path),
            batch_size=micro_batch,
            num_workers=max(1, cfg.num_workers),
            order=OrderOption.QUASI_RANDOM if self.quasi else _shard_order(self),
            os_cache=not self.quasi,  # QUASI_RANDOM needs FFCV's page cache to pick pages from
            drop_last=True,
            seed=seed,
            pipelines=_pipelines(cfg, device, self.norm, train=True),
        )

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, batch: int) -> None:
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch {batch} is not in 0..{len(self)}")
        self._start = batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._start = self._start, 0
        self._iter_start = 0 if self.quasi else start  # read by the traversal order in iter()
        self.loader.next_epoch = self.epoch
        return self._batches(iter(self.loader), start, self.epoch)

    def _batches(self, it: Iterator, start: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for b, (images, labels) in enumerate(it, start=0 if self.quasi else start):
            if b < start or b >= self.num_batches:  # quasi_random resumes by skipping batches
                continue
            images, labels = _own(images, labels, self.norm)
            if self.mixer is not None:
                with seeded_cpu_rng(mix_seed(self.seed, epoch, b, self.rank, _BATCH)):
                    images, labels = self.mixer(images, labels)
            yield images, labels


def _shard_order(owner: FFCVTrainLoader) -> Any:
    """A TraversalOrder bound to `owner`: its shard of epoch e, from its resume batch on.

    ffcv 1.0.2's Loader accepts a custom order only as an *instance* of TraversalOrder, which it
    then calls with itself (`order(self)`), so this returns an uninitialised instance whose
    `__call__` builds the real one.
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        def __call__(self, loader: Any) -> ShardOrder:
            return ShardOrder(loader)

        def sample_order(self, epoch: int) -> np.ndarray:
            idx = shard_indices(owner.n, owner.seed, epoch, owner.rank, owner.world)
            kept = idx[owner._iter_start * owner.micro : owner.num_batches * owner.micro]
            return kept.numpy().astype(np.uint64)

    return ShardOrder.__new__(ShardOrder)


class FFCVEvalLoader:
    """Unaugmented batches of this rank's exact shard range(rank, n, world), in order."""

    def __init__(
        self,
        cfg: DataConfig,
        path: Path,
        n: int,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        norm: Normalise,
    ) -> None:
        from ffcv.loader import Loader, OrderOption

        self.num_samples, self.norm = len(range(rank, n, world_size)), norm
        self.loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=max(1, cfg.num_workers),
            order=OrderOption.SEQUENTIAL,
            indices=np.arange(rank, n, world_size),
            drop_last=False,
            pipelines=_pipelines(cfg, device, self.norm, train=False),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            yield _own(images, labels, self.norm)


def build_ffcv_loaders(
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
    beton_dir: Path | None = None,
) -> tuple[FFCVTrainLoader, dict[str, FFCVEvalLoader]]:
    """`build_device_loaders` over .beton files (written first if missing, under a lock)."""
    require_ffcv()
    if "train" not in splits:
        raise ValueError(f"no 'train' split among {sorted(splits)}")
    paths = write_betons(cfg, splits, beton_dir)
    norm = Normalise(cfg.dataset, dtype, channels_last)
    out: dict[str, Any] = dict(rank=rank, world_size=world_size, device=torch.device(device))
    n = len(splits["train"].labels)
    train = FFCVTrainLoader(
        cfg,
        paths["train"],
        n,
        micro_batch=micro_batch,
        seed=seed,
        num_classes=num_classes,
        norm=norm,
        **out,
    )
    evals = {
        name: FFCVEvalLoader(
            cfg, paths[name], len(s.labels), batch_size=eval_batch, norm=norm, **out
        )
        for name, s in splits.items()
        if name != "train"
    }
    return train, evals
