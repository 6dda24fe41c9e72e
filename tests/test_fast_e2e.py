"""The fast recipe end to end on synthetic data: the CPU config shortened, resume with
Lookahead, batch_size=auto, lr-find, and 2 gloo ranks against one process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cifar_dist.config import load_config
from cifar_dist.config.schema import ConfigError
from cifar_dist.models import create_model
from cifar_dist.models.airbench import fit_whitening
from cifar_dist.train.checkpoint import load_checkpoint, step_checkpoints
from cifar_dist.train.fit import fit
from cifar_dist.train.model_init import whitening_images
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
FAST_CPU = REPO / "configs" / "cifar10_fast_cpu.yaml"


def short(data: Path, runs: Path, name: str, **extra: object) -> dict[str, object]:
    """configs/cifar10_fast_cpu.yaml on the 600-image synthetic set: batch 32, 15 steps/epoch."""
    return {
        "data.dir": str(data),
        "data.val_size": 100,
        "data.batch_size": 32,
        "data.eval_batch_size": 100,
        "train.progress": False,
        # torch's default (OMP_NUM_THREADS=1 under pytest): the config's 2 threads spin-wait
        # and run ~5x slower on a CI machine whose cores are busy with other tests
        "train.threads": 0,
        "log.dir": str(runs),
        "log.name": name,
        "log.plots": False,
        "log.wandb.mode": "disabled",
        **extra,
    }


def test_fast_cpu_config_runs_end_to_end(synth_cifar10: Path, tmp_path: Path) -> None:
    """10 epochs x 15 steps of the CPU recipe (amp auto, channels_last, whitening, Lookahead,
    6-view TTA) on the nano net (the width changes no code path; the wide net took ~3 min and
    airbench_net 82 s on an AVX2 CPU, this ~6 s): learns, keeps the fitted stem frozen and its
    bias frozen after 3 epochs."""
    over = {"train.epochs": 10, "model.name": "airbench_net_nano"}
    cfg = load_config(FAST_CPU, short(synth_cifar10, tmp_path, "fast", **over))
    res = fit(cfg)
    assert res["steps"] == 150 and res["val_acc"] >= 0.9, res
    ckpts = step_checkpoints(tmp_path / "fast" / "checkpoints")
    last, prev = (load_checkpoint(p) for p in (ckpts[-1], ckpts[-2]))
    ref = create_model(cfg.model.name).whiten
    fit_whitening(ref, whitening_images(cfg, cfg.model.whiten_init))
    torch.testing.assert_close(last["model"]["stem.0.weight"], ref.weight)  # fitted, frozen
    bias = last["model"]["stem.0.bias"]
    assert torch.count_nonzero(bias) > 0  # trained during the first 3 epochs ...
    assert torch.equal(bias, prev["model"]["stem.0.bias"])  # ... and frozen since
    slow = last["lookahead"]["slow"]
    for k, v in slow.items():  # the model ends on the averaged (slow) weights
        assert torch.equal(last["model"][k], v), k
    saved = yaml.safe_load((tmp_path / "fast" / "config.yaml").read_text())
    assert saved["model"]["whiten_init"] == 5000 and saved["train"]["tta_translate"] == 1


def test_resume_mid_run_with_lookahead_is_bit_identical(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    common = {
        "model.name": "airbench_net_nano",  # this test is about resume mechanics, not width
        "train.epochs": 2,
        "train.amp": "none",
        "train.channels_last": False,
        "train.deterministic": True,
        "train.lookahead_start_epochs": 0.0,
        "train.lookahead_every": 2,
        "model.whiten_bias_epochs": 1.0,
        "optim.name": "muon",
    }

    def run(name: str, **extra: object) -> None:
        fit(load_config(FAST_CPU, short(synth_cifar10, tmp_path, name, **common, **extra)))

    run("whole")
    run("split", **{"train.max_steps": 21})  # stops mid-epoch 2, between two averagings
    run("split", **{"train.resume": "auto"})
    whole, split = (
        load_checkpoint(tmp_path / n / "checkpoints/last.pt") for n in ("whole", "split")
    )
    assert whole["train_state"]["step"] == split["train_state"]["step"] == 30
    for k, v in whole["model"].items():
        assert torch.equal(v, split["model"][k]), k
    for k, v in whole["lookahead"]["slow"].items():
        assert torch.equal(v, split["lookahead"]["slow"][k]), k


def test_batch_size_auto_resolves_and_is_saved(synth_cifar10: Path, tmp_path: Path) -> None:
    """On CPU memory does not bind for this model: auto takes the cap (a power of two)."""
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "airbench_net_nano",
            "model.norm": "batch",
            "data.batch_size": "auto",
            "data.auto_batch_max": 100,
            "train.max_steps": 2,
        },
    )
    fit(load_config(None, over))
    saved = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 64


def test_whitening_needs_a_whitening_stem(synth_cifar10: Path, tmp_path: Path) -> None:
    over = short(synth_cifar10, tmp_path, "bad", **{"model.name": "resnet18", "train.max_steps": 1})
    with pytest.raises(ConfigError, match=r"model\.whiten_init"):
        fit(load_config(FAST_CPU, over))


def test_lr_find_cli_writes_plot_and_suggestion(synth_cifar10: Path, tmp_path: Path) -> None:
    over = short(synth_cifar10, tmp_path, "lrf", **{"model.name": "airbench_net_nano"})
    args = [f"--{k}={v}" for k, v in over.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "lr-find", "-c", str(FAST_CPU), "--steps", "30",
         "--start", "0.1", "--end", "1000", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert (tmp_path / "lrf" / "lr_find.png").stat().st_size > 1000
    assert 0.1 <= rec["suggested_lr"] <= 1000 and rec["lr_units"] == "per_1024"
    lrs = rec["lrs"]
    assert len(lrs) >= 3 and all(a < b for a, b in zip(lrs, lrs[1:]))
    assert "suggested optim.lr" in proc.stdout


@pytest.mark.distributed
def test_fast_trainer_ddp_matches_single_process(synth_cifar10: Path, tmp_path: Path) -> None:
    """Whitening stem, bias freeze, Lookahead, per-1024 units, dirac, bias-only norms: 2 gloo
    ranks x 16 == 1 process x 32 (float64, cross-rank BatchNorm; TTA eval sharded)."""
    from tests.forked_ranks import run_forked
    from tests.test_distributed import ENV, cli_args, step_losses, weights

    def over(name: str, norm: str) -> dict[str, object]:
        return tiny_overrides(
            synth_cifar10,
            tmp_path,
            **{
                "model.name": "airbench_net_nano",
                "model.norm": norm,
                "model.init": "dirac",
                "model.norm_weight": False,
                "model.whiten_init": 400,
                "model.whiten_bias_epochs": 0.5,  # frozen from step 8 of 15
                "optim.lr_units": "per_1024",
                "optim.lr": 2.0,
                "optim.momentum": 0.85,
                "optim.weight_decay": 0.01,
                "optim.decay_vectors": True,
                "optim.norm_bias_lr_scale": 16.0,
                "train.lookahead_every": 3,
                "train.tta": True,
                "train.tta_translate": 1,
                "train.dtype": "float64",
                "train.epochs": 2,
                "train.max_steps": 10,
                "data.crop_padding": 2,
                "data.flip": True,
                "log.every_steps": 1,
                "log.name": name,
            },
        )

    single = fit(load_config(None, over("single", "batch")))
    proc = run_forked(2, "train", *cli_args(over("ddp", "sync_batch")), timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Logged losses come from a float32 cross-entropy (trainer._loss), weights stay float64.
    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert len(a) == len(b) == 10 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa, wb = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["val_acc"] == pytest.approx(single["val_acc"], abs=1e-6)


@pytest.mark.parametrize("name", ["cifar10_fast_gpu", "cifar100_fast_gpu"])
def test_gpu_configs_run_on_cpu(tmp_path: Path, name: str) -> None:
    """The GPU recipes, device switched to CPU (compile off: its first compile costs ~35 s here),
    a few steps on synthetic data in the canonical format; they report the test split."""
    over = {
        "data.dir": str(tmp_path / "data"),
        "data.synthetic": 300,
        "data.batch_size": 32,
        "data.eval_batch_size": 30,
        "train.device": "cpu",
        "train.compile": False,
        "train.threads": 0,
        "train.max_steps": 3,
        "train.progress": False,
        "log.dir": str(tmp_path / "runs"),
        "log.name": name,
    }
    res = fit(load_config(REPO / "configs" / f"{name}.yaml", over))
    assert res["steps"] == 3 and "test_acc" in res and "val_acc" not in res
    assert math.isfinite(res["test_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_size_auto_probes_cuda_memory() -> None:
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.train.auto_batch import resolve_auto_batch
    from cifar_dist.utils.dist import DistInfo

    auto = {"data.batch_size": "auto", "data.auto_batch_max": 1 << 20}
    cfg = load_config(FAST_CPU, auto)
    dims = ParallelDims.from_config(cfg.parallel, 1)
    info = DistInfo(0, 0, 1, torch.device("cuda"), "")
    batch = resolve_auto_batch(cfg, info, dims).data.batch_size
    assert batch >= 256 and batch & (batch - 1) == 0  # a power of two, far above the minimum
    tight = load_config(FAST_CPU, {**auto, "data.auto_batch_headroom": 0.9})
    smaller = resolve_auto_batch(tight, info, dims).data.batch_size
    assert smaller < batch  # less memory allowed, smaller batch
