"""FFCV path: .beton writing, exact 2-rank shards, resume, augmentation and eval round trips.

Skipped when ffcv is not importable (it needs system libraries; see docs/fast_data.md). Each FFCV
Loader JIT-compiles its pipeline with numba on first use (~5-20 s), so the loaders are built once
per module.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_dist.config.schema import DataConfig
from cifar_dist.data import load_splits, write_synthetic
from cifar_dist.data.augment import eval_transform, mean_std
from cifar_dist.data.loaders import BatchSource, ResumableSampler

try:
    import ffcv  # noqa: F401

    FFCV_ERROR = ""
except ImportError as e:  # the precise reason goes into the skip message
    FFCV_ERROR = f"{e.__class__.__name__}: {e}"

needs_ffcv = pytest.mark.skipif(
    bool(FFCV_ERROR),
    reason=f"ffcv not importable ({FFCV_ERROR}); install: apt-get install -y pkg-config "
    "libturbojpeg0-dev libopencv-dev && pip install -c constraints.txt -e '.[ffcv]'",
)
CPU = torch.device("cpu")


def test_missing_ffcv_gives_one_line_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_dist.data import ffcv_loader

    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'cifar-dist\[ffcv\]'.*libturbojpeg0-dev"):
        ffcv_loader.require_ffcv()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, dict, dict[str, Path]]:
    from cifar_dist.data.ffcv_loader import write_betons

    root = tmp_path_factory.mktemp("ffcv")
    write_synthetic(root, "cifar10", n_train=300, n_test=50, seed=0)
    cfg = DataConfig(dir=str(root), val_size=44, batch_size=32, num_workers=1, crop_padding=2)
    splits = load_splits(cfg)  # train 256 (divisible by 2 ranks x 8), val 44, test 50
    return cfg, splits, write_betons(cfg)


def build(data: tuple, rank: int, **kw: object) -> tuple:
    from cifar_dist.data.ffcv_loader import build_ffcv_loaders

    cfg, splits, _ = data
    return build_ffcv_loaders(
        cfg,
        splits,
        micro_batch=8,
        eval_batch=16,
        rank=rank,
        world_size=2,
        seed=0,
        num_classes=10,
        device=CPU,
        **kw,
    )


@pytest.fixture(scope="module")
def ranks(data: tuple) -> list[tuple]:
    return [build(data, r) for r in (0, 1)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std("cifar10"))
    return ((x.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


@needs_ffcv
def test_betons_written_for_every_split(data: tuple) -> None:
    from cifar_dist.data.ffcv_loader import beton_paths

    cfg, splits, paths = data
    assert set(paths) == {"train", "val", "test"} and all(
        p.stat().st_size > 0 for p in paths.values()
    )
    assert paths["train"].name.startswith("train-256-")  # keyed on the split's content
    other = beton_paths(cfg, {"train": splits["val"], "val": splits["val"]})
    assert other["train"] != paths["train"] and other["val"] == paths["val"]


@needs_ffcv
def test_eval_shards_are_exact_and_match_the_arrays(data: tuple, ranks: list) -> None:
    _, splits, _ = data
    seen = []
    for r, (_, evals) in enumerate(ranks):
        x, y = (torch.cat(t) for t in zip(*evals["test"], strict=True))
        chw = torch.from_numpy(np.array(splits["test"].images[r::2])).permute(0, 3, 1, 2)
        torch.testing.assert_close(x, eval_transform("cifar10")(chw.contiguous()))
        assert y.tolist() == splits["test"].labels[r::2].tolist()
        seen.append(len(y))
    assert sum(seen) == 50


@needs_ffcv
def test_train_two_ranks_cover_every_sample_once_and_resume(data: tuple, ranks: list) -> None:
    _, splits, _ = data
    train = splits["train"]
    for e in (0, 1):
        seen = []
        for r, (ld, _) in enumerate(ranks):
            assert isinstance(ld, BatchSource) and len(ld) == 16
            ld.set_epoch(e)
            batches = list(ld)
            x = torch.cat([b[0] for b in batches])
            sampler = ResumableSampler(256, r, 2, 0, 8, 16)
            sampler.set_epoch(e)
            order = [i for i, _ in sampler]
            assert torch.cat([b[1] for b in batches]).tolist() == train.labels[order].tolist()
            seen += order
            assert x.shape == (128, 3, 32, 32) and torch.isfinite(x).all()
            ld.set_epoch(e)
            ld.set_start_batch(10)
            resumed = list(ld)
            assert len(resumed) == 6 and torch.equal(resumed[0][1], batches[10][1])
        assert sorted(seen) == list(range(256))  # exactly once across the two ranks


@needs_ffcv
def test_flip_and_translate_keep_labels_aligned(data: tuple, ranks: list) -> None:
    _, splits, _ = data
    ld = ranks[0][0]
    ld.set_epoch(0)
    x, y = next(iter(ld))
    sampler = ResumableSampler(256, 0, 2, 0, 8, 16)
    src = torch.from_numpy(np.array(splits["train"].images))[[i for i, _ in sampler][:8]]
    padded = F.pad(src.permute(0, 3, 1, 2), (2, 2, 2, 2))
    got = to_uint8(x)
    for i in range(8):  # some translate (and maybe flip) of its own source image
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(got[i], c) for c in crops), i
    assert y.dtype == torch.int64


@needs_ffcv
def test_mixup_gives_soft_labels(data: tuple) -> None:
    cfg, splits, _ = data
    from cifar_dist.data.ffcv_loader import build_ffcv_loaders

    cfg = replace(cfg, mixup_alpha=0.4, flip=False, crop_padding=0)
    ld, _ = build_ffcv_loaders(
        cfg,
        {"train": splits["train"]},
        micro_batch=8,
        eval_batch=8,
        rank=0,
        world_size=1,
        seed=0,
        num_classes=10,
        device=CPU,
    )
    _, y = next(iter(ld))
    assert y.shape == (8, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(8))
