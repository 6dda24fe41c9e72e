"""Augmentation does not depend on the world size: 1 process x 32 == 2 ranks x 16, per-step
losses and final weights, with random crop and flip on, for the device and DataLoader paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_dist.config import load_config
from cifar_dist.train.fit import fit
from tests.forked_ranks import run_forked
from tests.test_distributed import ENV, _base, assert_same_run, cli_args

pytestmark = pytest.mark.distributed


# GroupNorm (no cross-rank statistics) in float64: the only difference left between the runs
# would be the augmentation each sample gets (see test_distributed.py on float32 rounding).
@pytest.mark.timeout(300)
@pytest.mark.parametrize("loader", ["device", "torch"])
def test_augmented_batches_equal_on_one_and_two_ranks(
    synth_cifar10: Path, tmp_path: Path, loader: str
) -> None:
    common = {"model.norm": "group", "train.dtype": "float64", "data.loader": loader}
    fit(load_config(None, _base(synth_cifar10, tmp_path, "single", **common)))
    proc = run_forked(
        2, "train", *cli_args(_base(synth_cifar10, tmp_path, "ddp", **common)), env=ENV, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(tmp_path / "single", tmp_path / "ddp")


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_device_mixup_cutmix_of_a_sample_does_not_depend_on_the_world_size(
    alphas: tuple[float, float],
) -> None:
    """MixUp/CutMix pair within the global batch and draw per step: the mixed image and soft
    label of sample i in epoch e are the same on 1, 2 and 4 ranks (2 steps of accumulation)."""
    import torch

    from tests.test_device_loader import loader, make_split

    split = make_split(96)  # labels = sample indices, so a soft label names both sources
    kw = dict(crop_padding=4, flip=True, cutout=4, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    by_sample: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for world in (1, 2, 4):
        for r in range(world):
            ld = loader(split, rank=r, world=world, micro=16 // world, **kw)  # batch 32
            ld.set_epoch(1)
            idx, _ = ld.epoch_plan(1)
            batches = list(ld)
            assert len(batches) == 6  # 3 steps x 2 micro-batches
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            for j, i in enumerate(idx.tolist()):
                got = by_sample.setdefault(i, (x[j], y[j]))
                torch.testing.assert_close(got[0], x[j], atol=1e-6, rtol=0, msg=f"{world} {r} {i}")
                torch.testing.assert_close(got[1], y[j], atol=1e-6, rtol=0, msg=f"{world} {r} {i}")
    assert len(by_sample) == 96
    ys = torch.stack([v[1] for v in by_sample.values()])
    assert (ys > 0).sum(1).max() == 2 and (ys.max(1).values < 1).any()  # really mixed
