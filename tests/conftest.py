"""Shared fixtures: synthetic canonical files and a tiny config for fast CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synth_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding 600 train / 120 test synthetic CIFAR-10 images in the canonical format."""
    from cifar_dist.data import write_synthetic

    root = tmp_path_factory.mktemp("synth10")
    write_synthetic(root, "cifar10", n_train=600, n_test=120, seed=0)
    return root


def leave_spawned_worker() -> None:
    """End a torch.multiprocessing worker whose checks passed without interpreter teardown: a
    gloo process now and then aborts there ("terminate called without an active exception": a
    joinable native thread destroyed; cifar_dist/cli.py leaves launched workers the same way),
    which mp.spawn reports as a failed rank. A failed check raises before this is reached."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny_overrides(data_dir: Path, run_dir: Path, **extra: object) -> dict[str, object]:
    """Dotted overrides for a seconds-long run of a small model on synthetic data."""
    base: dict[str, object] = {
        "data.dir": str(data_dir),
        "data.val_size": 100,
        "data.batch_size": 32,
        "data.eval_batch_size": 100,
        "data.num_workers": 0,
        "data.crop_padding": 0,
        "data.flip": False,
        "model.name": "resnet18",
        "model.norm": "group",
        "optim.lr": 0.05,
        "optim.weight_decay": 0.0,
        "schedule.name": "constant",
        "schedule.warmup_epochs": 0.0,
        "train.epochs": 1,
        "train.progress": False,
        "train.deterministic": True,
        "log.dir": str(run_dir),
        "log.name": "t",
        "log.plots": False,
        "log.wandb.mode": "disabled",
    }
    base.update(extra)
    return base
