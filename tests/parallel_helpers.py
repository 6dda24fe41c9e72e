"""Shared by the pipeline and tensor-parallel tests: a run recipe, a cache of runs, and the
equality check against a single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.train.checkpoint import load_checkpoint
from cifar_dist.train.fit import fit
from tests.conftest import tiny_overrides
from tests.forked_ranks import run_forked
from tests.test_distributed import ENV, cli_args, run_torchrun

STEPS = 10
# The CNN runs clip (the norm must be global for the clip to agree) and use channels_last.
CNN = {"train.clip_norm": 1.0, "train.channels_last": True}


def overrides(data: Path, runs: Path, name: str, model: str, **extra: object) -> dict[str, object]:
    """10 steps in float64 (ReLU/GELU nets amplify float32 rounding of a different summation
    order far past 1e-5 in 10 steps; float64 leaves only the float32 cross-entropy), augmented
    (crop + flip), momentum on, GroupNorm for the CNNs."""
    return tiny_overrides(
        data,
        runs,
        **{
            "model.name": model,
            "data.batch_size": 16,
            "data.crop_padding": 4,
            "data.flip": True,
            "optim.momentum": 0.9,
            "train.dtype": "float64",
            "train.max_steps": STEPS,
            "log.every_steps": 1,
            "log.name": name,
            **extra,
        },
    )


def steps(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]


def assert_same_run(single: Path, other: Path) -> None:
    """Per-step loss and global grad norm within 1e-5, final weights within 1e-8 (float64)."""
    a, b = steps(single), steps(other)
    assert len(a) == len(b) == STEPS
    for key in ("step/loss", "step/grad_norm"):
        diff = max(abs(x[key] - y[key]) for x, y in zip(a, b))
        assert diff <= 1e-5, (key, diff)
    wa = load_checkpoint(single / "checkpoints/last.pt")["model"]
    wb = load_checkpoint(other / "checkpoints/last.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wa[k], wb[k], atol=1e-8, rtol=0, msg=k)


class Runs:
    """Single-process references and distributed runs, each made once per module."""

    def __init__(self, data: Path, root: Path) -> None:
        self.data, self.root = data, root
        self.done: dict[str, Path] = {}

    def single(self, model: str, **extra: object) -> Path:
        name = "_".join(["single", model, *(f"{k}={v}" for k, v in sorted(extra.items()))])
        if name not in self.done:
            fit(load_config(None, overrides(self.data, self.root, name, model, **extra)))
            self.done[name] = self.root / name
        return self.done[name]

    def ranks(self, nproc: int, name: str, model: str, **extra: object) -> Path:
        """`cifar-dist train` on `nproc` forked ranks (tests/forked_ranks.py), once per name."""
        if name not in self.done:
            over = overrides(self.data, self.root, name, model, **extra)
            proc = run_forked(nproc, "train", *cli_args(over), env=ENV, timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            self.done[name] = self.root / name
        return self.done[name]

    def resumed(self, nproc: int, name: str, model: str, stop_at: int, **extra: object) -> Path:
        """A run stopped after `stop_at` steps (mid-epoch) and resumed from its checkpoint to
        STEPS: its curve and final weights are then compared as an uninterrupted run's."""
        if name not in self.done:
            self.ranks(nproc, name, model, **extra, **{"train.max_steps": stop_at})
            resume = {**extra, "train.resume": "auto"}
            over = overrides(self.data, self.root, name, model, **resume)
            proc = run_forked(nproc, "train", *cli_args(over), env=ENV, timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert f"resumed at epoch 1, step {stop_at}" in proc.stdout + proc.stderr
        return self.done[name]


_SHARED: list[Runs] = []


@pytest.fixture(scope="session", name="runs")
def runs_fixture(synth_cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """One cache for the session, so the pipeline and tensor-parallel tests share their
    single-process references (pytest keeps a fixture imported into two modules twice)."""
    if not _SHARED:
        _SHARED.append(Runs(synth_cifar10, tmp_path_factory.mktemp("parallel_runs")))
    return _SHARED[0]


def assert_fails_on_every_rank(data: Path, tmp: Path, extra: list[str], line: str) -> None:
    """A 2-rank vit_nano run with `extra` flags exits non-zero, each rank printing `line` once."""
    over = tiny_overrides(data, tmp, **{"model.name": "vit_nano"})
    proc = run_torchrun(2, "train", *cli_args(over), *extra, timeout=120)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count(f"cifar-dist: error: {line}") == 2, proc.stderr[-3000:]
