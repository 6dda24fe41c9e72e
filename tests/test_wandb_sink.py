"""The W&B sink: offline by default, group/tags/config/git SHA, per-epoch metrics, plots as
images, final summary, rank 0 only, and the API key never written anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_dist.config import load_config
from cifar_dist.config.schema import WandbConfig
from cifar_dist.logging import wandb_sink
from cifar_dist.logging.sinks import MultiSink, build_sinks
from cifar_dist.train.fit import fit
from tests.conftest import tiny_overrides
from tests.wandb_records import offline_run

pytest.importorskip("wandb", reason="the wandb extra is not installed")

SECRET = "cifar-dist-test-key-0123456789abcdef0123456789abcdef"  # not a real key


def test_online_without_a_key_falls_back_to_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    assert WandbConfig().mode == "offline"
    assert wandb_sink.resolve_mode("online") == "offline"
    assert "no API key" in capsys.readouterr().out
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_sink.resolve_mode("online") == "online"


def test_offline_run_has_config_metrics_plots_summary_and_no_key(
    synth_cifar10: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A key in the environment must not end up in any file the run writes (offline: no upload).
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "airbench_net",
            "data.subset": 64,
            "train.epochs": 2,
            "log.name": "wb",
            "log.plots": True,
            "log.wandb.mode": "offline",
            "log.wandb.group": "g-test",
            "log.wandb.tags": ["t1", "t2"],
            "optim.lr": 0.0123,
        },
    )
    summary = fit(load_config(None, over))
    run_dir = tmp_path / "wb"
    rec = offline_run(run_dir)
    run = rec["run"]
    assert (run.display_name, run.run_group, list(run.tags)) == ("wb", "g-test", ["t1", "t2"])
    assert rec["config"]["optim"]["lr"] == pytest.approx(0.0123)
    assert rec["config"]["git_sha"] == summary_git_sha(run_dir)
    epochs = [h for h in rec["history"] if "val_acc" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert epochs[-1]["val_acc"] == pytest.approx(summary["val_acc"])
    # Images arrive as nested keys: ("plots/curves", "_type") = "image-file", plus the PNG.
    images = {
        k.removesuffix("._type") for h in rec["history"] for k, v in h.items() if v == "image-file"
    }
    assert {"plots/curves", "plots/confusion_matrix", "plots/lr_schedule"} <= images
    pngs = {
        p.name.split("_")[0]
        for p in run_dir.glob("wandb/offline-run-*/files/media/images/plots/*.png")
    }
    assert {"curves", "confusion", "lr"} <= pngs
    assert rec["summary"]["test_acc"] == pytest.approx(summary["test_acc"])
    out = capsys.readouterr().out
    assert f"wandb sync {run_dir / 'wandb'}" in out and "offline run in" in out
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"


def summary_git_sha(run_dir: Path) -> str:
    import json

    return json.loads((run_dir / "summary.json").read_text())["git_sha"]


def test_only_rank_zero_builds_a_wandb_sink(synth_cifar10: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None, tiny_overrides(synth_cifar10, tmp_path, **{"log.wandb.mode": "offline"})
    )
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    other = build_sinks(cfg, run_dir, is_main=False, config_dict={})
    assert not isinstance(other, MultiSink)
    assert not (run_dir / "wandb").exists()
    main = build_sinks(cfg, run_dir, is_main=True, config_dict={})
    try:
        assert any(isinstance(s, wandb_sink.WandbSink) for s in main.sinks)
    finally:
        main.close()


def test_online_init_failure_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key but no reachable server: wandb.init(mode='online') raises after its retries
    (~20 s here, so it is simulated); the run goes on with an offline W&B run."""
    import wandb

    real_init = wandb.init
    modes: list[str] = []

    def init(*args: object, mode: str = "offline", **kwargs: object) -> object:
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("Timed out while retrying: connection refused")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setattr(wandb, "init", init)
    cfg = load_config(None, {"log.wandb.mode": "online", "log.dir": str(tmp_path)})
    sink = wandb_sink.make_wandb_sink(cfg, tmp_path / "r", {})
    assert sink is not None
    sink.close()
    assert modes == ["online", "offline"]
    assert "online init failed (Timed out" in capsys.readouterr().out
    assert list((tmp_path / "r").glob("wandb/offline-run-*"))
