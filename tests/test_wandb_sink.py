"""The W&B sink: offline by default, group/tags/config/git SHA, per-epoch metrics, plots as
images, final summary, rank 0 only, and the API key never written anywhere."""

from __future__ import annotations

import json
import math
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
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_sink.resolve_settings(WandbConfig())["mode"] == "offline"
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
            "log.wandb.worst_images": 5,
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
    assert rec["summary"]["final/test_acc"] == pytest.approx(summary["test_acc"])
    chart = [h for h in rec["history"] if any(k.startswith("confusion_matrix") for k in h)]
    assert chart, "no interactive confusion matrix logged"
    tables = list(run_dir.glob("wandb/offline-run-*/files/media/table/confusion_matrix*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert len(table["data"]) == 10 * 10 and sum(r[2] for r in table["data"]) > 0
    _assert_worst_images_table(run_dir, summary)
    out = capsys.readouterr().out
    assert f"wandb sync {run_dir / 'wandb'}" in out and "offline run in" in out
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"


def _assert_worst_images_table(run_dir: Path, summary: dict) -> None:
    """The 5 highest-loss validation images, worst first, each above the mean loss."""
    (part,) = run_dir.glob("wandb/offline-run-*")
    arts = [a for a in offline_run_part(part)["artifacts"] if a.name.endswith("worst_val_images")]
    assert len(arts) == 1 and arts[0].type == "run_table"
    pngs = [f.path for f in arts[0].manifest.contents if f.path.endswith(".png")]
    assert len(pngs) == 5
    tables = list(run_dir.glob("wandb/offline-run-*/files/media/table/worst_val_images*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    cols = ["image", "true", "predicted", "confidence", "true_class_prob", "loss"]
    assert table["columns"] == cols
    rows = [dict(zip(cols, r, strict=True)) for r in table["data"]]
    assert len(rows) == 5
    losses = [r["loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] >= summary["val_loss"]
    for r in rows:
        assert r["image"] == "Image"  # the PNGs travel in the table's run_table artifact
        assert r["true"] != r["predicted"] or r["confidence"] == r["true_class_prob"]
        assert 0 < r["true_class_prob"] <= r["confidence"] <= 1
        assert r["loss"] == pytest.approx(-math.log(r["true_class_prob"]), rel=1e-4)


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


def test_settings_precedence_flag_over_env_over_default() -> None:
    env = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "team-env"}
    assert wandb_sink.resolve_settings(WandbConfig(), {}) == {
        "mode": "offline",
        "project": "cifar-dist",
        "entity": None,
    }
    assert wandb_sink.resolve_settings(WandbConfig(), env) == {
        "mode": "disabled",
        "project": "from-env",
        "entity": "team-env",
    }
    explicit = WandbConfig(mode="offline", project="from-flag", entity="team-flag")
    assert wandb_sink.resolve_settings(explicit, env) == {
        "mode": "offline",
        "project": "from-flag",
        "entity": "team-flag",
    }


def test_env_project_is_used_and_disabled_env_builds_no_sink(
    synth_cifar10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = tiny_overrides(synth_cifar10, tmp_path)
    over.pop("log.wandb.mode")  # unset: the environment decides
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(None, over)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    sinks = build_sinks(cfg, run_dir, is_main=True, config_dict={})
    assert not any(isinstance(s, wandb_sink.WandbSink) for s in sinks.sinks)
    sinks.close()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    sink = wandb_sink.make_wandb_sink(cfg, run_dir, {})
    assert sink is not None
    assert sink.run.project == "env-project"
    sink.close()


def test_resume_continues_one_wandb_run_with_metrics_and_artifacts(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    """A job stopped mid-training and resumed (resume=auto, a Slurm requeue) logs to the same
    W&B run id, its step history continues, and the final checkpoint is an aliased artifact."""
    common = {
        "model.name": "airbench_net",
        "data.subset": 64,
        "train.epochs": 2,
        "log.name": "wbr",
        "log.every_steps": 1,
        "log.plots": False,
        "log.wandb.mode": "offline",
    }
    fit(
        load_config(
            None, tiny_overrides(synth_cifar10, tmp_path, **common, **{"train.max_steps": 3})
        )
    )
    run_dir = tmp_path / "wbr"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    fit(
        load_config(
            None, tiny_overrides(synth_cifar10, tmp_path, **common, **{"train.resume": "auto"})
        )
    )
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    parts = sorted(run_dir.glob("wandb/offline-run-*"), key=lambda p: p.name)
    assert len(parts) == 2
    recs = [offline_run_part(p) for p in parts]
    assert [r["run"].run_id for r in recs] == [run_id, run_id]
    steps = [[h["_step"] for h in r["history"] if "_step" in h] for r in recs]
    assert steps[0] and steps[1] and min(steps[1]) > max(steps[0])
    epochs = [h["epoch"] for r in recs for h in r["history"] if "val_acc" in h]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 2
    metrics = {m.name or m.glob_name: m for m in recs[1]["metrics"]}
    assert metrics["val_acc"].step_metric == "epoch"
    assert metrics["val_acc"].summary.max
    assert metrics["val_loss"].summary.min
    arts = [a for a in recs[1]["artifacts"] if a.type == "model"]  # also: the confusion table
    assert len(arts) == 1 and arts[0].name == f"model-{run_id}"  # one name: versions v0, v1...
    assert {"last", "latest"} <= set(arts[0].aliases)
    assert any(f.path.endswith("last.pt") for f in arts[0].manifest.contents)


def offline_run_part(part: Path) -> dict:
    from tests.wandb_records import finished_records

    found = list(part.glob("run-*.wandb"))
    assert len(found) == 1
    out: dict = {"run": None, "history": [], "metrics": [], "artifacts": []}
    for rec in finished_records(found[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
        elif kind == "history":
            out["history"].append(
                {
                    (i.key or ".".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "metric":
            out["metrics"].append(rec.metric)
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
    return out


def test_tensorboard_sink_writes_the_scalars(synth_cifar10: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "airbench_net",
            "data.subset": 64,
            "train.epochs": 2,
            "log.every_steps": 1,
            "log.tensorboard": True,
        },
    )
    summary = fit(load_config(None, over))
    acc = EventAccumulator(str(tmp_path / "t" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val_acc", "train_loss", "step/loss", "final/test_acc"} <= tags
    steps = json.loads((tmp_path / "t" / "steps.jsonl").read_text().splitlines()[0])
    first = acc.Scalars("step/loss")[0]
    assert (first.step, first.value) == (steps["step"], pytest.approx(steps["step/loss"]))
    assert [e.value for e in acc.Scalars("final/test_acc")] == [pytest.approx(summary["test_acc"])]
    assert len(acc.Scalars("val_acc")) == 2


def test_summary_keeps_best_val_acc_and_run_id_only_reused_on_resume(tmp_path: Path) -> None:
    """The final metrics go under final/ (a plain val_acc would overwrite define_metric's max);
    a fresh run in the same run directory starts a new W&B run, a resumed one continues it."""
    cfg = load_config(None, cfg_overrides(tmp_path))
    sink = wandb_sink.make_wandb_sink(cfg, tmp_path / "r", {})
    assert sink is not None and sink.run.job_type == "train"
    for epoch, acc in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        sink.log({"epoch": epoch, "val_acc": acc, "val_loss": 1 / acc}, step=10 * epoch)
    sink.summary({"val_acc": 0.6, "test_acc": 0.55})
    first = sink.run.id
    sink.close()
    summary = offline_run(tmp_path / "r")["summary"]
    assert summary["val_acc"] == {"max": pytest.approx(0.7)}
    assert summary["final/val_acc"] == pytest.approx(0.6)
    assert summary["final/test_acc"] == pytest.approx(0.55)
    ids = []
    for resume in ("", "auto"):
        again = load_config(None, {**cfg_overrides(tmp_path), "train.resume": resume})
        s = wandb_sink.make_wandb_sink(again, tmp_path / "r", {})
        assert s is not None
        ids.append(s.run.id)
        s.close()
    assert ids[0] != first, "a fresh run reused the stored W&B run id"
    assert ids[1] == ids[0], "a resumed run did not continue the stored W&B run"


def cfg_overrides(tmp_path: Path) -> dict:
    return {"log.wandb.mode": "offline", "log.dir": str(tmp_path)}


def test_jsonl_sink_drops_repeated_steps_on_resume_only(tmp_path: Path) -> None:
    from cifar_dist.logging.sinks import JsonlSink

    def write(dedupe: bool, steps: list[int]) -> None:
        sink = JsonlSink(tmp_path, dedupe)
        for s in steps:
            sink.log({"epoch": s // 10, "val_acc": 0.1}, s)
            sink.log({"step/loss": 1.0}, s)
        sink.close()

    def logged(name: str) -> list[int]:
        lines = (tmp_path / name).read_text().splitlines()
        return [json.loads(x)["step"] for x in lines]

    write(False, [10, 20, 30])  # the first attempt got to step 30; its checkpoint was at 20
    write(True, [30, 40])  # resumed from step 20: step 30 again
    assert logged("metrics.jsonl") == logged("steps.jsonl") == [10, 20, 30, 40]
    write(False, [10])  # a fresh run in the same directory appends (no resume, no dedupe)
    assert logged("metrics.jsonl") == [10, 20, 30, 40, 10]
