"""Device-resident loader: sharding, resume, batch augmentation ops, and a training comparison."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.config.schema import DataConfig
from cifar_dist.data.augment import eval_transform, mean_std
from cifar_dist.data.device_loader import DeviceTrainLoader, build_device_loaders
from cifar_dist.data.gpu_augment import (
    AugParams,
    cutout_,
    gather_crop_flip,
    load_store,
    normalise,
)
from cifar_dist.data.loaders import BatchSource, ResumableSampler, build_loaders
from cifar_dist.data.synth import render_images

pytestmark = pytest.mark.filterwarnings("error:The given NumPy array is not writable")
CPU = torch.device("cpu")


@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray


def make_split(n: int, seed: int = 0) -> Split:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images.setflags(write=False)  # like the read-only memmap of arrays.py
    return Split(images, np.arange(n, dtype=np.int64))  # label = sample index


def data_cfg(**kw: object) -> DataConfig:
    """DataConfig with the device-loader fields (cutout, flip_mode, randaugment_group) set even
    before the schema declares them (the loader reads them with getattr and a default)."""
    known = {f.name for f in fields(DataConfig)}
    kw = {"loader": "device", **kw}
    cfg = DataConfig(**{k: v for k, v in kw.items() if k in known})  # type: ignore[arg-type]
    for k, v in kw.items():
        if k not in known:
            setattr(cfg, k, v)
    return cfg


def loader(
    split: Split, *, rank: int = 0, world: int = 2, micro: int = 8, seed: int = 0, **kw: object
) -> DeviceTrainLoader:
    train, _ = build_device_loaders(
        data_cfg(batch_size=32, **kw),
        {"train": split},
        micro_batch=micro,
        eval_batch=16,
        rank=rank,
        world_size=world,
        seed=seed,
        num_classes=len(split.labels),
        device=CPU,
    )
    return train


def epoch(ld: DeviceTrainLoader, e: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ld.set_epoch(e)
    ld.set_start_batch(start)
    return list(ld)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std("cifar10"))
    return ((x.float() * std + mean) * 255).round().to(torch.uint8)


def test_shards_match_distributed_sampler_and_cover_every_sample_once() -> None:
    split = make_split(256)
    for e in (0, 1):
        seen = []
        for r in (0, 1):
            ld = loader(split, rank=r)
            assert isinstance(ld, BatchSource) and len(ld) == 16
            labels = torch.cat([y for _, y in epoch(ld, e)])
            sampler = ResumableSampler(256, r, 2, 0, 8, len(ld))
            sampler.set_epoch(e)
            assert labels.tolist() == [i for i, _ in sampler]  # same order as the DataLoader path
            seen.append(labels)
        assert sorted(torch.cat(seen).tolist()) == list(range(256))  # each sample exactly once


def test_set_epoch_reshuffles_and_is_deterministic() -> None:
    a, b = loader(make_split(203)), loader(make_split(203))
    first, again, other = epoch(a, 0), epoch(b, 0), epoch(a, 1)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))


def test_resume_gives_exactly_the_remaining_batches_once() -> None:
    kw = dict(mixup_alpha=0.4, cutmix_alpha=1.0, cutout=8)
    ld = loader(make_split(203), **kw)
    full = epoch(ld, 3)
    resumed = epoch(ld, 3, start=5)
    assert len(resumed) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(list(ld)) == len(full)  # set_start_batch is one-shot
    with pytest.raises(ValueError):
        ld.set_start_batch(len(ld) + 1)


def test_ranks_draw_different_augmentation_streams() -> None:
    split = make_split(203)
    p0, p1 = (loader(split, rank=r).epoch_plan(0)[1] for r in (0, 1))
    assert not torch.equal(p0.dy, p1.dy) and not torch.equal(p0.flip, p1.flip)


@pytest.mark.parametrize("flip_mode", ["random", "alternating"])
def test_sample_augmentation_does_not_depend_on_the_world_size(flip_mode: str) -> None:
    """Crop/flip/cutout of sample i in epoch e are a function of (seed, epoch, i) only."""
    split = make_split(203)
    kw = dict(crop_padding=4, flip=True, flip_mode=flip_mode, cutout=8)
    for e in (0, 1):
        by_sample: dict[int, tuple[int, ...]] = {}
        for world in (1, 2, 4):
            for r in range(world):
                idx, p = loader(split, rank=r, world=world, micro=32 // world, **kw).epoch_plan(e)
                for j, i in enumerate(idx.tolist()):
                    got = (int(p.dy[j]), int(p.dx[j]), bool(p.flip[j]), int(p.cy[j]), int(p.cx[j]))
                    assert by_sample.setdefault(i, got) == got, (world, r, i)
        assert len({v[:3] for v in by_sample.values()}) > 20  # really random across samples


def test_crop_flip_keep_labels_shapes_and_ranges() -> None:
    split = make_split(203)
    ld = loader(split, crop_padding=4, flip=True)
    ld.set_epoch(2)
    idx, params = ld.epoch_plan(2)
    (x, y), *_ = list(ld)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all() and x.abs().max() < 2.2  # 0..255 normalised: ~[-2.0, 2.1]
    got = to_uint8(x)
    padded = F.pad(torch.from_numpy(np.array(split.images)).permute(0, 3, 1, 2), (4, 4, 4, 4))
    for i in range(8):  # reference by slicing, one image at a time
        assert int(y[i]) == int(idx[i])  # label of the sample that was gathered
        dy, dx = int(params.dy[i]), int(params.dx[i])
        ref = padded[int(idx[i]), :, dy : dy + 32, dx : dx + 32]
        assert torch.equal(got[i], ref.flip(-1) if params.flip[i] else ref)
    assert params.flip.any() and not params.flip.all() and params.dy.min() >= 0
    assert params.dy.max() <= 8 and params.dx.unique().numel() > 1


def test_flip_of_flip_is_identity() -> None:
    images = torch.from_numpy(np.array(make_split(6).images))
    n, idx = len(images), torch.arange(6)
    zero = torch.zeros(n, dtype=torch.long)
    flip = AugParams(zero, zero, torch.ones(n, dtype=torch.bool), zero, zero)
    once = gather_crop_flip(images, idx, flip)
    assert torch.equal(once, images.flip(2)) and not torch.equal(once, images)
    assert torch.equal(gather_crop_flip(once, idx, flip), images)


def test_alternating_flip_alternates_per_sample() -> None:
    ld = loader(make_split(256), flip_mode="alternating")
    assert ld.flip_base is not None
    masks = []
    for e in (0, 1, 2):
        idx, params = ld.epoch_plan(e)
        full = torch.zeros(256, dtype=torch.long) - 1
        full[idx] = params.flip.long()
        masks.append(full)
    both = (masks[0] >= 0) & (masks[1] >= 0)  # samples this rank saw in both epochs
    assert both.sum() > 20 and (masks[0][both] != masks[1][both]).all()
    both = (masks[0] >= 0) & (masks[2] >= 0)
    assert (masks[0][both] == masks[2][both]).all()


def test_cutout_zeroes_one_clipped_square() -> None:
    x = torch.ones(3, 3, 32, 32)
    cutout_(x, torch.tensor([16, 0, 31]), torch.tensor([16, 0, 5]), 8)
    zeros = (x == 0).all(1).sum((1, 2)).tolist()
    assert zeros == [64, 16, 40]  # whole 8x8; 4x4 corner; rows 27..31 x cols 1..8
    assert x[0, :, 12:20, 12:20].eq(0).all() and x[0, :, 11, :].eq(1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalise_matches_eval_transform(dtype: torch.dtype, channels_last: bool) -> None:
    images = torch.from_numpy(np.array(make_split(4).images))
    ref = eval_transform("cifar10")(images.permute(0, 3, 1, 2).contiguous())
    fast = normalise(
        images.permute(0, 3, 1, 2), *mean_std("cifar10"), dtype=dtype, channels_last=channels_last
    )
    assert fast.dtype == dtype and fast.shape == ref.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert fast.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(
        fast.float(),
        ref,
        atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
    )


def test_store_is_padded_once_and_eval_shards_are_exact() -> None:
    split = make_split(25)
    store = load_store(split.images, 2, CPU)
    assert store.shape == (25, 36, 36, 3) and store[:, :2].eq(0).all()
    cfg = DataConfig(batch_size=8)
    seen = []
    for r in (0, 1):
        _, evals = build_device_loaders(
            cfg,
            {"train": split, "test": split},
            micro_batch=4,
            eval_batch=5,
            rank=r,
            world_size=2,
            seed=0,
            num_classes=25,
            device=CPU,
        )
        ev = evals["test"]
        x, y = (torch.cat(t) for t in zip(*ev, strict=True))
        chw = torch.from_numpy(np.array(split.images[r::2])).permute(0, 3, 1, 2).contiguous()
        torch.testing.assert_close(x, eval_transform("cifar10")(chw))
        assert len(ev) == -(-ev.num_samples // 5)
        seen += y.tolist()
    assert sorted(seen) == list(range(25))


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_cutmix_soft_labels_sum_to_one(alphas: tuple[float, float]) -> None:
    ld = loader(make_split(64), mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    x, y = next(iter(ld))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert (y > 0).sum(1).max() == 2  # two sources per image (roll-by-one pairing)


def test_randaugment_runs_grouped_and_deterministic() -> None:
    split = make_split(64)
    kw = dict(randaugment_group=4, crop_padding=0, flip=False)
    a = loader(split, randaugment=True, randaugment_magnitude=15, **kw)
    plain = loader(split, **kw)
    (xa, _), (xb, _), (xp, _) = next(iter(a)), next(iter(a)), next(iter(plain))
    assert xa.shape == xp.shape and torch.equal(xa, xb) and not torch.equal(xa, xp)


class TinyNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )


def _train_and_eval(kind: str, seed: int, train: Split, test: Split) -> float:
    cfg = DataConfig(batch_size=32, num_workers=0, pin_memory=False, crop_padding=2)
    args = dict(micro_batch=32, eval_batch=100, rank=0, world_size=1, seed=seed, num_classes=10)
    splits = {"train": train, "test": test}
    if kind == "device":
        tr, evals = build_device_loaders(cfg, splits, device=CPU, **args)  # type: ignore[arg-type]
    else:
        tr, evals = build_loaders(cfg, splits, **args)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for e in range(4):
        tr.set_epoch(e)
        for x, y in tr:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in evals["test"])
    return hits / len(test.labels)


def test_training_matches_dataloader_path_accuracy_band() -> None:
    """Same config and seeds through both loaders: seed-averaged test accuracy in one band.

    A broken device path (labels misaligned, wrong normalisation, garbage crops) lands near
    chance (0.1); the synthetic classes are learnable to > 0.9 in these few epochs.
    """
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(640) % 10, np.arange(200) % 10
    train = Split(render_images(y_train, 10, rng), y_train.astype(np.int64))
    test = Split(render_images(y_test, 10, rng), y_test.astype(np.int64))
    acc = {
        k: np.mean([_train_and_eval(k, s, train, test) for s in (0, 1)])
        for k in ("torch", "device")
    }
    assert acc["torch"] > 0.6, acc
    assert abs(acc["device"] - acc["torch"]) < 0.1, acc


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_indices_and_format() -> None:
    split, cuda = make_split(203), torch.device("cuda")
    cfg = data_cfg(batch_size=32, cutout=8, mixup_alpha=0.0)
    args = dict(micro_batch=8, eval_batch=16, rank=1, world_size=2, seed=0, num_classes=203)
    cpu_tr, _ = build_device_loaders(cfg, {"train": split}, device=CPU, **args)  # type: ignore[arg-type]
    gpu_tr, evals = build_device_loaders(
        cfg,
        {"train": split, "test": split},
        device=cuda,
        dtype=torch.bfloat16,
        channels_last=True,
        **args,  # type: ignore[arg-type]
    )
    ys_cpu, batches = [y for _, y in epoch(cpu_tr, 1)], epoch(gpu_tr, 1)
    assert [y.tolist() for y in ys_cpu] == [y.tolist() for _, y in batches]  # same shard order
    x = batches[0][0]
    assert x.is_cuda and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
    assert next(iter(evals["test"]))[0].is_cuda


def test_progressive_resizing_downscales_the_same_batches_then_returns_to_full_size() -> None:
    split = make_split(64)

    def make(**kw: object) -> DeviceTrainLoader:
        train, _ = build_device_loaders(
            data_cfg(batch_size=32, crop_padding=2, **kw),
            {"train": split},
            **dict(micro_batch=8, eval_batch=16, rank=1, world_size=2, seed=0, num_classes=64),
            device=CPU,
            dtype=torch.bfloat16,
            channels_last=True,
        )
        return train

    full, small = make(), make(epoch_sizes=[16, 24])
    for e, side in enumerate([16, 24, 32]):
        for (xf, yf), (xs, ys) in zip(epoch(full, e), epoch(small, e), strict=True):
            assert xs.shape == (8, 3, side, side) and torch.equal(ys, yf)
            assert xs.dtype == torch.bfloat16
            assert xs.is_contiguous(memory_format=torch.channels_last)
            ref = F.interpolate(xf.float(), size=(side, side), mode="bilinear", antialias=True)
            torch.testing.assert_close(xs, ref.bfloat16() if side < 32 else xf)
    from cifar_dist.models import create_model

    assert create_model("airbench_net")(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_crop_epochs_centres_every_image_after_the_first_epochs() -> None:
    split = make_split(64)

    def make(**kw: object) -> DeviceTrainLoader:
        train, _ = build_device_loaders(
            data_cfg(batch_size=32, flip_mode="alternating", **kw),
            {"train": split},
            **dict(micro_batch=8, eval_batch=16, rank=1, world_size=2, seed=0, num_classes=64),
            device=CPU,
        )
        return train

    always, first, never = (
        make(crop_padding=2),
        make(crop_padding=2, crop_epochs=1),
        make(crop_padding=0),
    )
    for e in range(3):
        for (xa, ya), (xf, yf), (xn, yn) in zip(
            epoch(always, e), epoch(first, e), epoch(never, e), strict=True
        ):
            assert torch.equal(ya, yf) and torch.equal(yf, yn)
            assert not torch.equal(xa, xn)  # random translation in every epoch
            if e == 0:  # translated as without crop_epochs
                assert torch.equal(xf, xa)
            else:  # centred (same flips) as an unpadded store
                assert torch.equal(xf, xn)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": {"loader": "torch", "crop_epochs": 2}}, "needs data.loader=device"),
        ({"data": {"loader": "device", "crop_epochs": -1}}, "must be >= 0"),
        ({"data": {"loader": "torch", "epoch_sizes": [24]}}, "needs data.loader=device"),
        ({"data": {"loader": "device", "epoch_sizes": [40]}}, "sides must be in 8..32"),
        (
            {"data": {"loader": "device", "epoch_sizes": [24]}, "model": {"name": "vit_tiny"}},
            "pools globally",
        ),
    ],
)
def test_progressive_resizing_is_refused_where_it_cannot_work(
    overrides: dict[str, dict[str, object]], message: str
) -> None:
    from cifar_dist.config.load import config_from_dict
    from cifar_dist.config.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides)
