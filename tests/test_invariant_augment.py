"""Augmentation does not depend on the world size: 1 process x 32 == 2 ranks x 16, per-step
losses and final weights, with random crop and flip on, for the device and DataLoader paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_dist.config import load_config
from cifar_dist.train.fit import fit
from tests.test_distributed import _base, assert_same_run, cli_args, run_torchrun

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
    proc = run_torchrun(
        2, "train", *cli_args(_base(synth_cifar10, tmp_path, "ddp", **common)), timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(tmp_path / "single", tmp_path / "ddp")
