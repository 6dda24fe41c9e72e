import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_dist.config import ConfigError, load_config
from cifar_dist.config.load import config_from_dict, config_to_dict, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"optim": {"lr": 0.3, "momentum": 0.8}, "train": {"epochs": 7}}))
    cfg = load_config(f, ["--optim.lr=0.01", "--train.amp", "bf16"])
    assert cfg.optim.lr == 0.01  # CLI beats YAML
    assert cfg.optim.momentum == 0.8  # YAML beats default
    assert cfg.train.epochs == 7
    assert cfg.train.amp == "bf16"
    assert cfg.optim.weight_decay == 5e-4  # default


def test_round_trip_through_dict() -> None:
    cfg = load_config(None, ["--schedule.milestones=[0.2,0.9]", "--log.wandb.tags=[a,b]"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_int_accepted_for_float_but_not_reverse() -> None:
    assert load_config(None, ["--optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["--data.batch_size=3.5"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--optim.lrr=0.1", "optim.lrr: unknown key"),
        ("--nosuch.x=1", "nosuch: unknown key"),
        ("--optim.lr=fast", "optim.lr: expected a number"),
        ("--train.compile=yes please", "train.compile: expected true/false"),
        ("--optim.lr=-1", "optim.lr: must be > 0"),
        ("--train.amp=fp8", "train.amp: 'fp8' is not one of"),
        ("--data.val_size=-5", "data.val_size: must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key)


def test_overrides_parse_yaml_scalars() -> None:
    tree = parse_overrides(["--a.b=0.5", "--a.c", "true", "--d=[1,2]", "--e"])
    assert tree == {"a": {"b": 0.5, "c": True}, "d": [1, 2], "e": True}
    # PyYAML reads 1e-3 as a string; float fields still accept it.
    assert load_config(None, ["--optim.lr=1e-3"]).optim.lr == 1e-3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--optim.lrr=0.1"], "optim.lrr"),
        (["--optim.lr=abc"], "optim.lr"),
        (["--train.epochs=0"], "train.epochs"),
    ],
)
def test_cli_bad_config_is_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    """Exit code != 0 and exactly one stderr line naming the key, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_dist",
            "train",
            "-c",
            str(REPO / "configs/debug_cpu.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr


def test_every_shipped_config_loads() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        load_config(c)
