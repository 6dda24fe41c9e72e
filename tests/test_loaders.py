"""Loaders: distributed shards, exact eval coverage, resume, worker-independence, augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from cifar_dist.config.schema import DataConfig
from cifar_dist.data.augment import eval_transform, mean_std, mix_seed, train_transform
from cifar_dist.data.loaders import (
    BatchSource,
    EvalLoader,
    ShardSampler,
    TrainLoader,
    build_loaders,
)

# A read-only uint8 array must not trigger torch's "non-writable array" warning.
pytestmark = pytest.mark.filterwarnings("error:The given NumPy array is not writable")


@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray


def make_split(n: int, seed: int = 0, labels: np.ndarray | None = None) -> Split:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images.setflags(write=False)  # like the read-only memmap of arrays.py
    return Split(images, np.arange(n, dtype=np.int64) if labels is None else labels)


def cfg_for(**kw: object) -> DataConfig:
    base: dict[str, object] = dict(batch_size=32, num_workers=0, pin_memory=False)
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def train_loader(
    split: Split, *, rank: int = 0, world: int = 2, micro: int = 8, seed: int = 0, **kw: object
) -> TrainLoader:
    loader, _ = build_loaders(
        cfg_for(**kw),
        {"train": split},
        micro_batch=micro,
        eval_batch=16,
        rank=rank,
        world_size=world,
        seed=seed,
        num_classes=int(split.labels.max()) + 1,
    )
    return loader


def epoch(loader: TrainLoader, e: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e)
    loader.set_start_batch(start)
    return list(loader)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std("cifar10"))
    return (x * std + mean) * 255


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_train_shards_disjoint_equal_and_cover_all_but_tail() -> None:
    n = 203  # labels are sample indices, so a batch's labels say which samples it holds
    loaders = [train_loader(make_split(n), rank=r) for r in (0, 1)]
    assert isinstance(loaders[0], BatchSource)
    # batch 32 = micro 8 * world 2 * accum 2: floor(101 / 16) = 6 steps -> 12 micro-batches
    assert len(loaders[0]) == len(loaders[1]) == 12
    seen: list[int] = []
    for loader in loaders:
        batches = epoch(loader, 0)
        assert len(batches) == 12 and all(y.shape == (8,) for _, y in batches)
        seen += torch.cat([y for _, y in batches]).tolist()
    assert len(seen) == len(set(seen)) == 2 * 12 * 8  # at most once; dropped tail = 11 < 32
    assert set(seen) <= set(range(n))


def test_set_epoch_reshuffles_and_is_repeatable() -> None:
    loader = train_loader(make_split(96), crop_padding=0, flip=False)
    order = [torch.cat([y for _, y in epoch(loader, e)]).tolist() for e in (0, 1, 0)]
    assert order[0] != order[1]
    assert order[0] == order[2]


@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_cover_each_index_exactly_once(world: int) -> None:
    n = 103
    split = make_split(n)
    assert sorted(i for r in range(world) for i in ShardSampler(n, r, world)) == list(range(n))
    labels, sizes = [], []
    for rank in range(world):
        ev = EvalLoader(split, batch_size=10, rank=rank, world_size=world, cfg=cfg_for())
        batches = list(ev)
        assert len(ev) == len(batches)
        sizes.append(ev.num_samples)
        for x, y in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            raw = torch.from_numpy(split.images[y.numpy()].copy()).permute(0, 3, 1, 2)
            assert torch.equal(x, eval_transform()(raw))  # no augmentation, labels aligned
            labels += y.tolist()
    assert sorted(labels) == list(range(n))
    assert max(sizes) - min(sizes) <= 1


def test_build_loaders_returns_eval_loaders_for_other_splits() -> None:
    splits = {"train": make_split(64), "val": make_split(7), "test": make_split(5)}
    train, evals = build_loaders(
        cfg_for(),
        splits,
        micro_batch=16,
        eval_batch=4,
        rank=1,
        world_size=2,
        seed=0,
        num_classes=64,
    )
    assert sorted(evals) == ["test", "val"]
    assert [y.tolist() for _, y in evals["val"]] == [[1, 3, 5]]
    assert len(train) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_matches_full_epoch(workers: int) -> None:
    split = make_split(160, labels=np.arange(160) % 10)
    kw: dict[str, Any] = dict(
        num_workers=workers, randaugment=True, mixup_alpha=0.4, cutmix_alpha=1.0
    )
    full = epoch(train_loader(split, **kw), 1)
    assert len(full) == 10
    resumed = train_loader(split, **kw)
    assert_same(epoch(resumed, 1, start=3), full[3:])
    # the same loader (persistent workers) after another epoch, then resuming again
    assert_same(epoch(resumed, 2, start=0), epoch(train_loader(split, **kw), 2))
    resumed.set_start_batch(7)  # before set_epoch: the order of the two calls must not matter
    resumed.set_epoch(1)
    assert_same(list(resumed), full[7:])
    assert_same(list(resumed), full)  # set_start_batch is one-shot


def test_batches_independent_of_workers_and_depend_on_seed() -> None:
    split = make_split(96)
    kw: dict[str, Any] = dict(randaugment=True)
    zero = epoch(train_loader(split, num_workers=0, **kw), 3)
    two = epoch(train_loader(split, num_workers=2, prefetch_factor=1, **kw), 3)
    assert_same(zero, two)
    other = epoch(train_loader(split, seed=1, **kw), 3)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(zero, other))


def test_iteration_leaves_global_rng_alone() -> None:
    loader = train_loader(make_split(64), mixup_alpha=1.0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch(loader, 0)
    assert torch.equal(torch.rand(3), expected)


def test_crop_flip_keep_labels_aligned_shapes_and_ranges() -> None:
    n = 64
    labels = np.arange(n, dtype=np.int64) % 10
    images = np.broadcast_to((labels * 20).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3))
    for randaugment in (False, True):
        loader = train_loader(Split(images, labels), micro=16, randaugment=randaugment)
        for x, y in epoch(loader, 0):
            assert (
                x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
            )
            pixels = unnormalise(x)
            assert pixels.min() > -0.01 and pixels.max() < 255.01
            if not randaugment:  # RandAugment changes colours; crop / flip must not
                centre = pixels[:, :, 16, 16].round()
                assert torch.equal(centre, (y * 20).float()[:, None].expand(-1, 3))


def test_crop_and_flip_actually_move_pixels() -> None:
    # Columns encode x (value 4x + 30), so the centre pixel tells the shift, the row's slope the
    # flip, and the zero padding shows up as exactly |shift| zeros at one end of the row.
    row = (4 * np.arange(32) + 30).astype(np.uint8)
    image = torch.from_numpy(np.broadcast_to(row, (3, 32, 32)).copy())
    tf = train_transform(cfg_for(crop_padding=4))
    shifts, flips = set(), set()
    for i in range(64):
        torch.manual_seed(i)
        centre_row = unnormalise(tf(image)[None])[0, 0, 16].round()
        flipped = bool(centre_row[20] < centre_row[10])
        col = int((centre_row[16] - 30) / 4)
        shift = 16 - (31 - col) if flipped else col - 16
        shifts.add(shift)
        flips.add(flipped)
        inside = centre_row[centre_row != 0]
        assert len(inside) == 32 - abs(shift) and inside.min() >= 30 and inside.max() <= 154
        assert torch.equal(inside.diff().abs(), torch.full((31 - abs(shift),), 4.0))
    assert flips == {False, True}
    assert min(shifts) >= -4 and max(shifts) <= 4 and len(shifts) >= 5


def test_flip_twice_is_identity_and_eval_transform_is_plain() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    flip = v2.RandomHorizontalFlip(p=1.0)
    assert not torch.equal(flip(image), image)
    assert torch.equal(flip(flip(image)), image)
    tf = train_transform(cfg_for(crop_padding=0))  # flip only
    torch.manual_seed(0)
    outs = {tuple(tf(image).flatten()[:8].tolist()) for _ in range(20)}
    allowed = {tuple(eval_transform()(im).flatten()[:8].tolist()) for im in (image, image.flip(-1))}
    assert outs == allowed


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_mixing_gives_soft_labels(mixup: float, cutmix: float) -> None:
    split = make_split(64, labels=np.arange(64) % 10)
    batches = epoch(train_loader(split, micro=16, mixup_alpha=mixup, cutmix_alpha=cutmix), 0)
    ys = torch.cat([y for _, y in batches])
    assert ys.shape == (32, 10) and ys.dtype == torch.float32  # 2 ranks: half the samples
    assert torch.allclose(ys.sum(1), torch.ones(32)) and ys.min() >= 0
    assert (ys.max(1).values < 1).any()  # some rows really are mixed
    plain = epoch(train_loader(split, micro=16), 0)
    assert plain[0][1].shape == (16,) and plain[0][1].dtype == torch.int64


def test_train_split_smaller_than_global_batch_raises() -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_loader(make_split(31))  # data.batch_size=32
    with pytest.raises(ValueError, match="not a multiple"):
        train_loader(make_split(64), micro=12)


def test_augmentation_changes_with_epoch_under_persistent_workers() -> None:
    loader = train_loader(make_split(96), num_workers=2)  # persistent workers by default
    seen = []
    for e in (0, 1):
        seen.append({int(i): x for xs, ys in epoch(loader, e) for x, i in zip(xs, ys)})
    common = seen[0].keys() & seen[1].keys()
    assert len(common) >= 8
    same = sum(torch.equal(seen[0][i], seen[1][i]) for i in common)
    assert same < len(common) / 2  # a crop offset and flip match across epochs with p = 1/162


def test_mix_seed_is_stable_and_order_sensitive() -> None:
    # Pinned: changing the hash would silently change every resumed run's augmentation.
    assert mix_seed(0, 0, 0, 0) == 1195769770526638388
    seeds = {mix_seed(0, e, i, 0) for e in range(4) for i in range(256)} | {mix_seed(0, 0, 1, 2)}
    assert len(seeds) == 4 * 256 + 1 and mix_seed(1, 2) != mix_seed(2, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_sample_augmentation_does_not_depend_on_the_world_size() -> None:
    """Crop and flip of sample i in epoch e are a function of (seed, epoch, i) only: 1, 2 and
    4 ranks hand out the same augmented image for every sample (labels = sample indices)."""
    split = make_split(203)
    for e in (0, 1):
        by_sample: dict[int, torch.Tensor] = {}
        for world in (1, 2, 4):
            for r in range(world):
                for x, y in epoch(train_loader(split, rank=r, world=world, micro=8), e):
                    for img, i in zip(x, y.tolist(), strict=True):
                        got = by_sample.setdefault(i, img)
                        assert torch.equal(got, img), (e, world, r, i)
        chw = torch.from_numpy(split.images.copy()).permute(0, 3, 1, 2)
        plain = torch.stack([eval_transform("cifar10")(chw[i]) for i in by_sample])
        moved = torch.stack(list(by_sample.values()))
        assert (moved != plain).flatten(1).any(1).float().mean() > 0.5  # really augmented
