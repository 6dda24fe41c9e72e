"""`cifar-dist train --help` (every key, from the schema docstrings), `--print-config`, `base:`
inheritance of run configs, and `cifar-dist predict` on image files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_dist.config import ConfigError, load_config
from cifar_dist.config.describe import describe_keys, field_docs
from cifar_dist.config.schema import Config, OptimConfig

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cifar_dist", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_docstrings_are_read_from_the_schema_source() -> None:
    docs = field_docs(OptimConfig)
    assert docs["lr"].startswith("Peak learning rate at `base_batch_size`")
    assert docs["weight_decay"].startswith("Decoupled (AdamW) or L2 (SGD) weight decay")
    keys = {k.key: k for k in describe_keys(Config)}
    assert keys["optim.lr"].type == "float" and keys["optim.lr"].default == 0.1
    assert keys["data.batch_size"].type == "int|auto"
    assert keys["log.wandb.mode"].type == "|offline|online|disabled"  # nested sections flattened
    assert keys["schedule.milestones"].default == [0.5, 0.75]  # default_factory values
    assert all(k.doc for k in keys.values()), [k for k in keys if not keys[k].doc]


def test_train_and_tune_help_list_every_key() -> None:
    proc = cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())  # help text is wrapped
    assert "--optim.lr (float, default 0.1) Peak learning rate at `base_batch_size`" in out
    assert "--print-config" in out
    for k in describe_keys(Config):
        assert f"--{k.key} (" in out, k.key
    tune = " ".join(cli("tune", "--help").stdout.split())
    assert "--search.scheduler (fifo|asha|pbt, default fifo)" in tune
    assert "--pbt.interval (int, default 1) Epochs between exploit/explore steps" in tune
    assert "--resume SWEEP_DIR" in tune and "--optim.lr (float, default 0.1)" in tune


def test_print_config_round_trips_and_does_not_train(tmp_path: Path) -> None:
    args = ["-c", str(REPO / "configs/ds_zero3.yaml"), "--optim.lr=0.3", "--log.dir=runs_here"]
    proc = cli("train", *args, "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert load_config(None, printed) == load_config(args[1], args[2:])
    assert printed["deepspeed"]["zero_stage"] == 3 and printed["optim"]["lr"] == 0.3
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_base_inheritance_override_chain_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        yaml.safe_dump({"optim": {"lr": 0.3, "momentum": 0.8}, "train": {"epochs": 7}})
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    # relative to the including file, not to the current directory
    (sub / "b.yaml").write_text("base: ../a.yaml\noptim:\n  lr: 0.01\n")
    (sub / "c.yaml").write_text("base: b.yaml\ntrain:\n  epochs: 2\n")
    cfg = load_config(sub / "c.yaml", ["--optim.momentum=0.5"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.01, 0.5, 2)
    cfg = load_config(sub / "b.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.01, 0.8, 7)
    (sub / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: base: missing\.yaml not found$"):
        load_config(sub / "d.yaml")


def test_base_cycle_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\noptim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="base: inheritance cycle"):
        load_config(tmp_path / "x.yaml")
    proc = cli("train", "-c", str(tmp_path / "x.yaml"), "--print-config")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    x, y = tmp_path / "x.yaml", tmp_path / "y.yaml"
    assert (
        line == f"cifar-dist: error: config file {x}: base: inheritance cycle ({x} -> {y} -> {x})"
    )


def test_ds_zero_configs_inherit_from_zero2() -> None:
    z2 = load_config(REPO / "configs/ds_zero2.yaml")
    for stage in (1, 3):
        path = REPO / f"configs/ds_zero{stage}.yaml"
        cfg = load_config(path)
        assert cfg.deepspeed.zero_stage == stage
        assert cfg.deepspeed.__class__(**{**vars(cfg.deepspeed), "zero_stage": 2}) == z2.deepspeed
        assert (cfg.data, cfg.model, cfg.optim, cfg.train) == (
            z2.data,
            z2.model,
            z2.optim,
            z2.train,
        )
        assert path.read_text().startswith(f"# ResNet-18 with DeepSpeed ZeRO-{stage} (")


def test_tune_print_config_shows_the_resolved_sweep_and_base(tmp_path: Path) -> None:
    from cifar_dist.tune.load import _normalise, build_sweep, load_sweep

    sweep_file = REPO / "configs/tune/lr_bs_bayes.yaml"
    proc = cli(
        "tune",
        "-c",
        str(sweep_file),
        "--search.num_samples=3",
        "--train.epochs=1",
        "--print-config",
    )
    assert proc.returncode == 0, proc.stderr
    sweep_tree, base_tree = yaml.safe_load_all(proc.stdout)
    sweep, base, _ = load_sweep(sweep_file, ["--search.num_samples=3", "--train.epochs=1"])
    assert build_sweep(_normalise(sweep_tree)) == sweep and sweep.search.num_samples == 3
    assert load_config(None, base_tree) == base and base.train.epochs == 1


def test_predict_prints_top_k_classes_and_one_line_per_unreadable_image(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from cifar_dist.data.augment import eval_transform
    from cifar_dist.data.synth import class_names
    from cifar_dist.train.common import build_model
    from cifar_dist.train.fit import fit
    from tests.conftest import tiny_overrides

    cfg = load_config(
        None,
        tiny_overrides(
            synth_cifar10, tmp_path / "runs", **{"model.name": "airbench_net", "data.subset": 64}
        ),
    )
    fit(cfg)
    (ckpt,) = sorted((tmp_path / "runs/t/checkpoints").glob("step_*.pt"))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    images = [str(tmp_path / n) for n in ("a.png", "broken.png", "b.png")]
    proc = cli("predict", "--checkpoint", str(ckpt), "--top-k", "3", *images)
    assert proc.returncode == 2  # one image could not be read
    (err,) = proc.stderr.strip().splitlines()
    assert err.startswith(f"cifar-dist: error: {tmp_path / 'broken.png'}: not a readable image")
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [images[0], images[2]]
    names = class_names("cifar10")
    for ln in lines:
        top = [
            (c.rsplit(" ", 1)[0], float(c.rsplit(" ", 1)[1])) for c in ln.split(": ")[1].split(", ")
        ]
        assert len(top) == 3 and all(n in names for n, _ in top)
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    # the same numbers as the checkpoint's model on the eval transform of the image
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    x = eval_transform("cifar10")(torch.from_numpy(small).permute(2, 0, 1)).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x), 1)[0]
    p, idx = probs.topk(3)
    expected = ", ".join(
        f"{names[i]} {v:.3f}" for v, i in zip(p.tolist(), idx.tolist(), strict=True)
    )
    assert lines[0] == f"{images[0]}: {expected}"
