"""Single-process trainer behaviour: memorisation, accumulation, resume, CLI run directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.train.checkpoint import load_checkpoint
from cifar_dist.train.fit import fit
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_memorises_256_images(synth_cifar10: Path, tmp_path: Path) -> None:
    """With augmentation and regularisation off, a model fits 256 images to >= 99% train accuracy."""
    from cifar_dist.data import load_splits
    from cifar_dist.data.loaders import build_loaders
    from cifar_dist.train.metrics import evaluate

    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "data.subset": 256,
            # 5 epochs of 8 steps: passes from 4 (3 give 34%); 10 epochs of 64 took twice as long.
            "data.batch_size": 32,
            "model.name": "airbench_net",
            "model.norm": "batch",
            "optim.lr": 0.05,
            "schedule.name": "onecycle",
            "train.epochs": 5,
        },
    )
    cfg = load_config(None, over)
    fit(cfg)
    model_state = _weights(tmp_path / "t")
    from cifar_dist.train.common import build_model

    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(model_state)
    splits = load_splits(cfg.data)
    # Evaluate on the (un-augmented) training images themselves.
    _, evals = build_loaders(
        cfg.data,
        {"train": splits["train"], "memo": splits["train"]},
        micro_batch=32,
        eval_batch=128,
        rank=0,
        world_size=1,
        seed=0,
        num_classes=10,
    )
    acc = evaluate(model, evals["memo"], 10, torch.device("cpu"))["acc"]
    assert acc >= 0.99, acc


def test_grad_accumulation_matches_full_batch(synth_cifar10: Path, tmp_path: Path) -> None:
    """4 micro-batches of 8 give the same update as one batch of 32 (GroupNorm: no batch coupling)."""
    common = {
        "model.name": "airbench_net_nano",
        "model.norm": "group",
        "train.max_steps": 1,
        "optim.momentum": 0.9,
    }
    fit(
        load_config(None, tiny_overrides(synth_cifar10, tmp_path, **common, **{"log.name": "full"}))
    )
    fit(
        load_config(
            None,
            tiny_overrides(
                synth_cifar10, tmp_path, **common, **{"log.name": "accum", "train.grad_accum": 4}
            ),
        )
    )
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "accum")
    init = load_config(None, tiny_overrides(synth_cifar10, tmp_path, **common))
    from cifar_dist.train.common import build_model

    torch.manual_seed(init.train.seed)
    w0 = build_model(init, torch.device("cpu")).state_dict()
    moved = max((a[k] - w0[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert moved > 1e-4  # the step did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_resume_is_bit_identical(
    synth_cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopping mid-epoch and resuming continues at the saved step (not from scratch) and ends
    with exactly the weights of an uninterrupted run."""
    common = {
        "train.epochs": 2,
        "model.name": "airbench_net_nano",
        "model.norm": "batch",
        "data.crop_padding": 4,
        "data.flip": True,
        "schedule.name": "onecycle",
        "train.ema_decay": 0.9,
        "log.every_steps": 1,
    }
    fit(
        load_config(
            None, tiny_overrides(synth_cifar10, tmp_path, **common, **{"log.name": "whole"})
        )
    )
    fit(
        load_config(
            None,
            tiny_overrides(
                synth_cifar10, tmp_path, **common, **{"log.name": "split", "train.max_steps": 20}
            ),
        )
    )
    assert load_checkpoint(tmp_path / "split/checkpoints/last.pt")["train_state"]["step"] == 20
    capsys.readouterr()
    res = fit(
        load_config(
            None,
            tiny_overrides(
                synth_cifar10, tmp_path, **common, **{"log.name": "split", "train.resume": "auto"}
            ),
        )
    )
    # 15 steps per epoch: step 20 is in the 2nd epoch; the second call runs the last 10 steps.
    assert "resumed at epoch 2, step 20" in capsys.readouterr().out
    assert (res["start_step"], res["steps_this_run"], res["steps"]) == (20, 10, 30)
    whole, split = (
        load_checkpoint(tmp_path / "whole/checkpoints/last.pt"),
        load_checkpoint(tmp_path / "split/checkpoints/last.pt"),
    )
    for k, v in whole["model"].items():
        assert torch.equal(v, split["model"][k]), k
    for k, v in whole["ema"].items():
        assert torch.equal(v, split["ema"][k]), k
    epochs = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["train_loss"] == resumed[-1]["train_loss"]


def test_nonfinite_steps_stop_the_run(synth_cifar10: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_dist",
            "train",
            *[f"--{k}={v}" for k, v in tiny_overrides(synth_cifar10, tmp_path).items()],
            "--model.name=airbench_net",
            "--optim.lr=1e30",
            "--train.max_nonfinite=3",
            "--optim.momentum=0.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "3 consecutive non-finite" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_command_reproduces_summary(synth_cifar10: Path, tmp_path: Path) -> None:
    """`cifar-dist eval` of the final checkpoint gives the run's own final metrics (EMA + TTA)."""
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{"model.name": "airbench_net_nano", "train.ema_decay": 0.5, "train.tta": True},
    )
    summary = fit(load_config(None, over))
    from cifar_dist.train.eval_checkpoint import evaluate_checkpoint

    res = evaluate_checkpoint(tmp_path / "t/checkpoints/last.pt")
    assert res["val_acc"] == summary["val_acc"]
    assert res["test_acc"] == summary["test_acc"]
    assert res["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)


def test_cli_debug_config_writes_run_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_dist",
            "train",
            "-c",
            str(REPO / "configs/debug_cpu.yaml"),
            f"--data.dir={tmp_path / 'data'}",
            f"--log.dir={tmp_path / 'runs'}",
            "--log.name=dbg",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**__import__("os").environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/dbg"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "curves.png",
        "lr_schedule.png",
        "confusion_matrix.png",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_acc", "test_acc", "wall_s", "samples_per_s", "git_sha"):
        assert key in summary
    cfg = load_config(REPO / "configs/debug_cpu.yaml")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == cfg.train.epochs
    assert list(run.glob("wandb/offline-run-*")), "W&B offline run directory missing"
    assert "wandb sync" in proc.stdout + proc.stderr


def test_early_stopping_on_flat_validation_loss(synth_cifar10: Path, tmp_path: Path) -> None:
    """lr ~ 0 and GroupNorm (no running stats): val loss never improves after epoch 1, so with
    patience 2 the run stops after epoch 3 of 6."""
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "airbench_net_nano",
            "optim.lr": 1e-12,
            "train.epochs": 6,
            "train.early_stopping": 2,
            "data.subset": 64,
        },
    )
    summary = fit(load_config(None, over))
    lines = (tmp_path / "t/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and summary["epochs"] == 3


def test_bf16_autocast_channels_last_steps(synth_cifar10: Path, tmp_path: Path) -> None:
    """The CPU mixed-precision path trains: finite loss, weights move, metrics computed."""
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "airbench_net_nano",
            "train.amp": "bf16",
            "train.channels_last": True,
            "train.max_steps": 2,
            "log.every_steps": 1,
        },
    )
    summary = fit(load_config(None, over))
    losses = [
        json.loads(x)["step/loss"] for x in (tmp_path / "t/steps.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(math.isfinite(v) and v < 10 for v in losses)
    assert 0.0 <= summary["val_acc"] <= 1.0


def test_amp_auto_resolves_by_device_and_is_recorded(
    synth_cifar10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.amp=auto: bf16 exactly where the device has native bf16 (float32 runs only), and
    the run's config.yaml records what ran, not "auto"."""
    from cifar_dist.train import common

    cfg = load_config(None, ["--train.amp=auto"])
    cpu = torch.device("cpu")
    for native, dtype, want in [
        (True, "float32", "bf16"),
        (False, "float32", "none"),
        (True, "float64", "none"),
    ]:
        monkeypatch.setattr(common, "native_bf16", lambda _d, n=native: n)
        got = common.resolve_amp(
            load_config(None, ["--train.amp=auto", f"--train.dtype={dtype}"]), cpu
        )
        assert got.train.amp == want, (native, dtype)
    assert common.resolve_amp(load_config(None, ["--train.amp=bf16"]), cpu).train.amp == "bf16"
    monkeypatch.undo()
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    assert common.resolve_amp(cfg, cpu).train.amp == expected  # this machine's oneDNN
    over = tiny_overrides(synth_cifar10, tmp_path, **{"train.amp": "auto", "train.max_steps": 1})
    fit(load_config(None, over))
    assert load_config(tmp_path / "t" / "config.yaml").train.amp == expected


def _resolve_amp_on_rank(rank: int, init: str, out: Any) -> None:
    """Forked rank: only rank 0 claims native bf16; report what train.amp=auto becomes."""
    import torch.distributed as dist

    from cifar_dist.train import common

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    common.native_bf16 = lambda _device: rank == 0
    cfg = common.resolve_amp(load_config(None, ["--train.amp=auto"]), torch.device("cpu"))
    out.put((rank, cfg.train.amp))
    dist.destroy_process_group()


def test_amp_auto_is_agreed_by_all_ranks(tmp_path: Path) -> None:
    """Two ranks, only one with native bf16: both resolve train.amp=auto to none (a job on
    mixed nodes must not autocast on some ranks only)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children inherit the imports: no torch start-up each
    out = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_resolve_amp_on_rank, args=(r, init, out)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert got == {0: "none", 1: "none"}, got


@pytest.mark.parametrize("loader", ["device", "ffcv"])
def test_fast_loaders_train_end_to_end(synth_cifar10: Path, tmp_path: Path, loader: str) -> None:
    """data.loader=device|ffcv is wired through fit(): trains, evaluates, checkpoints."""
    if loader == "ffcv":
        pytest.importorskip("ffcv", reason="ffcv extra not installed (needs libturbojpeg/OpenCV)")
    extra = {"data.flip_mode": "alternating"} if loader == "device" else {}
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "airbench_net_nano",
            "data.loader": loader,
            "data.cutout": 8,
            "data.flip": True,
            "data.crop_padding": 2,
            "train.max_steps": 3,
            **extra,
        },
    )
    summary = fit(load_config(None, over))
    assert summary["steps"] == 3 and 0.0 <= summary["val_acc"] <= 1.0
    assert load_checkpoint(tmp_path / "t/checkpoints/last.pt")["train_state"]["step"] == 3
