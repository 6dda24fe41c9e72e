"""Ray Tune sweeps on CPU: grid, Bayesian (Optuna TPE), ASHA, a diverging trial, a retried
trial resuming from its Tune checkpoint, a 2-worker Ray Train trial, the best config
reproduced by `cifar-dist train`, the W&B summary run, PBT, and a SIGTERM-interrupted sweep
resumed with Tuner.restore. One Ray instance (2 CPUs) serves the whole module."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cifar_dist.config.schema import ConfigError
from cifar_dist.tune import load_sweep
from tests.conftest import tiny_overrides

ray = pytest.importorskip("ray", reason="the tune extra (ray[tune]) is not installed")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def write_sweep(tmp: Path, data: Path, sweep: dict[str, Any], **base_extra: Any) -> Path:
    """A base run config (tiny model, 64 synthetic images) and a sweep file naming it."""
    base = tiny_overrides(
        data,
        tmp / "unused",
        **{"model.name": "airbench_net_nano", "data.subset": 64, "train.epochs": 2, **base_extra},
    )
    (tmp / "base.yaml").write_text(yaml.safe_dump(nested(base)))
    tree = {"base": "base.yaml", "dir": str(tmp / "sweeps"), **sweep}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run(path: Path, *overrides: str, trial_fn: Any = None) -> Any:
    from cifar_dist.tune.driver import run_sweep

    sweep, base, _ = load_sweep(path, list(overrides))
    return run_sweep(sweep, base, path, trial_fn=trial_fn)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def epochs_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["epoch"] for x in lines]


# ----- sweep files: strict, one line naming the key (no Ray) -----------------------------------
@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"spaec": {}}, "spaec: unknown key"),
        ({"space": {"optim.lrr": {"values": [0.1]}}}, "space.optim.lrr: not a run-config key"),
        ({"space": {"optim.lr": {"values": [-1.0]}}}, "space.optim.lr: -1.0 is refused (optim.lr"),
        ({"space": {"optim.lr": {"low": 0.1, "high": 1.0}}}, "space.optim.lr: search.algo=grid"),
        ({"search": {"algo": "bayes"}}, "search.num_samples: must be >= 1 for bayes"),
        ({"search": {"algo": "grid", "metric": "acc"}}, "search.metric: must be a per-epoch"),
        ({"space": {"log.name": {"values": ["a"]}}}, "space.log.name: is set by the sweep"),
        ({"trial": {"workers": 0}}, "trial.workers: must be >= 1"),
        ({"space": {"data.dir": {"values": ["a", "b"]}}}, "space.data.dir: the data is prepared"),
    ],
)
def test_bad_sweep_file_names_the_key(
    synth_cifar10: Path, tmp_path: Path, sweep: dict[str, Any], message: str
) -> None:
    tree = {"space": {"optim.lr": {"values": [0.1]}}, "search": {"algo": "grid"}, **sweep}
    path = write_sweep(tmp_path, synth_cifar10, tree)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        load_sweep(path)


def test_cli_overrides_split_between_sweep_and_run(synth_cifar10: Path, tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path, synth_cifar10, {"space": {"optim.lr": [0.1, 0.2]}, "search": {"algo": "grid"}}
    )
    sweep, base, _ = load_sweep(path, ["--space.optim.lr.values=[0.5]", "--train.epochs=3"])
    assert sweep.space["optim.lr"].values == [0.5]
    assert sweep.run == {"train.epochs": 3} and base.train.epochs == 3
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "tune", "-c", str(path), "--search.algo=bayes"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cifar-dist: error: search.num_samples: must be >= 1 for bayes"


def test_search_space_algorithms_and_asha(synth_cifar10: Path, tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from cifar_dist.tune import space

    space_tree = {
        "optim.lr": {"low": 1e-3, "high": 1.0, "log": True},
        "data.batch_size": {"low": 16, "high": 32, "integer": True},
        "optim.weight_decay": {"values": [0.0, 5e-4]},
    }
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            "space": space_tree,
            "search": {"algo": "random", "num_samples": 3},
            "asha": {"enabled": True, "max_t": 6},
        },
    )
    sweep, _, _ = load_sweep(path)
    domains = space.param_space(sweep)
    assert domains["optim.lr"].sampler.__class__.__name__ == "_LogUniform"
    # `high` is inclusive in the sweep file (Tune's randint excludes it)
    assert {domains["data.batch_size"].sample() for _ in range(300)} == set(range(16, 33))
    assert domains["optim.weight_decay"].categories == [0.0, 5e-4]
    assert space.search_algorithm(sweep).max_concurrent == 2  # the default, honoured by Tune
    sched = space.scheduler(sweep, epochs=2)
    assert isinstance(sched, ASHAScheduler) and sched._max_t == 6 and sched._time_attr == "epoch"
    sweep, _, _ = load_sweep(path, ["--search.algo=bayes", "--search.max_concurrent=3"])
    algo = space.search_algorithm(sweep)
    assert isinstance(algo, ConcurrencyLimiter) and algo.max_concurrent == 3
    assert isinstance(algo.searcher, OptunaSearch)


def test_report_sink_pairs_each_epoch_with_its_checkpoint(tmp_path: Path) -> None:
    from cifar_dist.tune.report import CKPT_NAME, ReportSink

    calls: list[tuple[dict[str, Any], bytes | None]] = []

    class FakeCheckpoint:  # ray's Checkpoint.from_directory, reading what Ray would copy
        @staticmethod
        def from_directory(d: str) -> bytes:
            return (Path(d) / CKPT_NAME).read_bytes()

    sink = ReportSink(lambda m, checkpoint: calls.append((m, checkpoint)), FakeCheckpoint)
    ckpt = tmp_path / "checkpoints" / "step_00000004.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"epoch-1-weights")
    sink.log({"step/loss": 1.0}, 2)  # per-step records are not reported
    sink.checkpoint(ckpt, 2)  # a mid-epoch checkpoint: nothing pending, nothing reported
    sink.log({"epoch": 1, "val_acc": 0.5, "note": "x"}, 4)
    assert calls == []  # held until its checkpoint exists
    sink.checkpoint(ckpt, 4)
    ((metrics, payload),) = calls
    assert payload == b"epoch-1-weights" and metrics["val_acc"] == 0.5 and metrics["epoch"] == 1
    assert "note" not in metrics and metrics["error"] == ""
    assert list(ckpt.parent.iterdir()) == [ckpt]  # the temporary copy is gone
    sink.log({"epoch": 2, "val_acc": 0.6}, 8)
    sink.checkpoint(None, 8)  # another rank's view: metrics, no checkpoint
    assert calls[-1][1] is None and calls[-1][0]["epoch"] == 2
    sink.diverged("training diverged: ...", "val_acc", "max")
    assert calls[-1][0]["val_acc"] == float("-inf") and calls[-1][0]["epoch"] == 2
    assert calls[-1][0]["diverged"] == 1.0 and calls[-1][0]["error"] == "training diverged: ..."
    sink.log({"epoch": 3, "val_acc": 0.7}, 12)
    sink.close()  # a trainer that never saved: the last epoch still reaches Tune
    assert calls[-1][0]["epoch"] == 3 and len(calls) == 4
    tag = tmp_path / "checkpoints" / "global_step16"  # DeepSpeed's save: a tag directory
    tag.mkdir()
    sink.log({"epoch": 4, "val_acc": 0.8}, 16)
    sink.checkpoint(tag, 16)  # reported, without a checkpoint a restart could not load
    assert calls[-1] == (calls[-1][0], None) and calls[-1][0]["epoch"] == 4 and len(calls) == 5


# ----- sweeps on Ray ---------------------------------------------------------------------------
def test_grid_sweep_wandb_runs_csv_and_best_config_reproduces(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    lrs = [0.01, 0.02, 0.05, 0.1]
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {"name": "grid4", "space": {"optim.lr": {"values": lrs}}, "search": {"algo": "grid"}},
        **{"log.wandb.mode": "offline"},
    )
    out = run(path)
    rows = csv_rows(out.csv)
    assert sorted(float(r["optim.lr"]) for r in rows) == lrs
    assert [r["status"] for r in rows] == ["completed"] * 4
    from tests.wandb_records import offline_run

    for r in rows:  # one W&B run per trial, grouped by sweep, with its config and its metrics
        run_dir = Path(r["run_dir"])
        rec = offline_run(run_dir)
        assert rec["run"].run_group == "grid4" and rec["run"].display_name == r["trial_id"]
        assert rec["config"]["optim"]["lr"] == pytest.approx(float(r["optim.lr"]))
        logged = [h["val_acc"] for h in rec["history"] if "val_acc" in h]
        jsonl = [json.loads(x)["val_acc"] for x in (run_dir / "metrics.jsonl").open()]
        assert logged == pytest.approx(jsonl) and len(logged) == 2
        assert float(r["val_acc"]) == pytest.approx(jsonl[-1])  # what Tune got = what ran
    assert {p.name for p in out.plots} == {"val_acc_vs_lr.png", "best_so_far.png"}
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert out.best.trial_id == best["trial_id"]
    check_summary_run(out.sweep_dir, rows, best)
    # The best config, run as a plain training run, reproduces its trial's metrics.
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "train", "-c", str(out.best_yaml)]
        + [f"--log.dir={tmp_path / 'repro'}", "--log.name=r", "--log.wandb.mode=disabled"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "repro/r/summary.json").read_text())
    assert summary["val_acc"] == pytest.approx(float(best["val_acc"]), abs=1e-6)
    assert summary["val_loss"] == pytest.approx(float(best["val_loss"]), rel=1e-4)


def check_summary_run(sweep_dir: Path, rows: list[dict[str, str]], best: dict[str, str]) -> None:
    """The sweep's W&B summary run: a trials table matching the CSV, the best trial named."""
    from tests.wandb_records import offline_run

    rec = offline_run(sweep_dir / "summary")
    assert rec["run"].run_group == sweep_dir.name and rec["run"].job_type == "sweep-summary"
    assert rec["config"]["sweep"]["space"]["optim.lr"]["values"] == [0.01, 0.02, 0.05, 0.1]
    s = rec["summary"]
    assert s["best_trial_id"] == best["trial_id"] and s["best_run_dir"] == best["run_dir"]
    assert s["best_val_acc"] == pytest.approx(float(best["val_acc"]))
    assert s["best/optim.lr"] == pytest.approx(float(best["optim.lr"]))
    assert s["best_wandb_run_id"] == offline_run(Path(best["run_dir"]))["run"].run_id
    assert s["trials"] == 4 and s["trials_completed"] == 4 and s["interrupted"] is False
    (table_file,) = (sweep_dir / "summary").glob("wandb/offline-run-*/files/media/table/trials_*")
    table = json.loads(table_file.read_text())
    cols = table["columns"]
    assert cols[:3] == ["trial_id", "status", "optim.lr"]  # searched keys as plain columns
    by_id = {r[0]: dict(zip(cols, r, strict=True)) for r in table["data"]}
    assert set(by_id) == {r["trial_id"] for r in rows}
    for r in rows:
        t = by_id[r["trial_id"]]
        assert isinstance(t["optim.lr"], float)  # numeric: a parallel-coordinates axis
        assert t["optim.lr"] == pytest.approx(float(r["optim.lr"]))
        assert t["val_acc"] == pytest.approx(float(r["val_acc"]))
        assert t["val_loss"] == pytest.approx(float(r["val_loss"]))
        assert t["status"] == r["status"] and t["run_dir"] == r["run_dir"]


def test_bayes_sweep_samples_within_the_space(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            "space": {"optim.lr": {"low": 1e-3, "high": 0.3, "log": True}},
            "search": {"algo": "bayes", "num_samples": 6, "startup_trials": 3, "seed": 1},
        },
        **{"train.epochs": 1},
    )
    out = run(path)
    rows = csv_rows(out.csv)
    lrs = [float(r["optim.lr"]) for r in rows]
    assert len(rows) == 6 and len(set(lrs)) == 6
    assert all(1e-3 <= lr <= 0.3 for lr in lrs)
    assert all(r["status"] == "completed" for r in rows)
    best = yaml.safe_load(out.best_yaml.read_text())
    assert best["optim"]["lr"] == pytest.approx(out.best.params["optim.lr"])


def test_asha_stops_a_learning_rate_ten_times_too_high(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    # Grid order puts lr=0.3 (10x the good 0.03) last: it reaches rung 1 after the others.
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            "space": {"optim.lr": {"values": [0.01, 0.03, 0.3]}},
            "search": {"algo": "grid"},
            "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        },
        # 128 images: enough learning in one epoch to rank the learning rates at rung 1
        **{"train.epochs": 4, "data.subset": 128},
    )
    rows = {float(r["optim.lr"]): r for r in csv_rows(run(path).csv)}
    bad = rows[0.3]
    assert bad["status"] == "stopped" and int(bad["epochs"]) < 4
    assert len(epochs_logged(Path(bad["run_dir"]))) < 4  # training really stopped
    assert any(r["status"] == "completed" and r["epochs"] == "4" for r in rows.values())


def flaky_trial(config: dict[str, Any], ctx: Any) -> None:
    """run_trial, but for lr=0.03 the first attempt crashes right after reporting epoch 1 (and
    its checkpoint), as if the node died; Tune retries it from that checkpoint."""
    from ray import tune

    from cifar_dist.tune.trainable import run_trial

    real = tune.report
    if config["optim.lr"] == 0.03 and tune.get_checkpoint() is None:

        def report(metrics: dict[str, Any], *, checkpoint: Any = None) -> None:
            real(metrics, checkpoint=checkpoint)
            raise RuntimeError("injected failure after epoch 1")

        tune.report = report
    try:
        run_trial(config, ctx)
    finally:
        tune.report = real


def test_diverging_trial_ends_cleanly_and_crashed_trial_resumes(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    """One sweep, two failure kinds: lr=1e30 overflows to NaN (ends as `diverged`, not retried);
    lr=0.03 crashes after epoch 1 (retried from its Tune checkpoint). The sweep completes."""
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            "space": {"optim.lr": {"values": [0.03, 1.0e30]}},
            "search": {"algo": "grid"},
            "run": {"train.max_nonfinite": 2},
            "trial": {"max_failures": 1},
        },
        # 4 steps per epoch: the 1e30 step overflows the weights, the next two losses are NaN
        **{"train.epochs": 2, "data.subset": 128},
    )
    out = run(path, trial_fn=flaky_trial)
    rows = {float(r["optim.lr"]): r for r in csv_rows(out.csv)}
    bad = rows[1.0e30]
    assert bad["status"] == "diverged" and bad["epochs"] == "0"
    assert bad["error"].startswith("training diverged: 2 consecutive non-finite")
    assert (Path(bad["run_dir"]) / "metrics.jsonl").read_text() == ""  # one attempt, no epoch
    good = rows[0.03]
    assert good["status"] == "completed" and good["epochs"] == "2"
    # Epoch 1 from the first attempt, then epoch 2 from the resumed one (not 1, 1, 2).
    assert epochs_logged(Path(good["run_dir"])) == [1, 2]
    assert out.best.params == {"optim.lr": 0.03}


def test_trial_with_two_ray_train_workers(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            "space": {"optim.lr": {"values": [0.03]}},
            "search": {"algo": "grid"},
            "trial": {"workers": 2},
        },
        **{"log.wandb.mode": "offline"},
    )
    out = run(path)
    (row,) = csv_rows(out.csv)
    assert row["status"] == "completed" and row["epochs"] == "2"
    run_dir = Path(row["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2  # the trainer saw Ray Train's 2-rank process group
    assert float(row["val_acc"]) == pytest.approx(summary["val_acc"])
    from tests.wandb_records import offline_run

    assert offline_run(run_dir)["run"].run_group == out.sweep_dir.name  # one run: rank 0 only


# ----- reuse of trial processes, PBT, interrupted sweeps, the W&B summary run -----------------
def test_trial_processes_are_not_reused_for_deepspeed(synth_cifar10: Path, tmp_path: Path) -> None:
    from cifar_dist.config.load import load_config
    from cifar_dist.tune.driver import reuse_actors

    path = write_sweep(
        tmp_path, synth_cifar10, {"space": {"optim.lr": [0.1]}, "search": {"algo": "grid"}}
    )
    sweep, base, _ = load_sweep(path)
    assert reuse_actors(sweep, base)  # torch trials share a process: no torch import per trial
    ds = load_config(None, {"parallel.engine": "deepspeed"})
    assert not reuse_actors(sweep, ds)  # DeepSpeed: one run per process
    sweep, _, _ = load_sweep(path, ["--space.parallel.engine.values=[torch, deepspeed]"])
    assert not reuse_actors(sweep, base)  # searched engine: some trials may be DeepSpeed
    sweep, _, _ = load_sweep(path, ["--trial.workers=2"])
    assert reuse_actors(sweep, ds)  # Ray Train workers are fresh processes per trial


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--search.algo=bayes", "--search.num_samples=2"], "search.algo: bayes cannot"),
        (["--space.data.batch_size.values=[16]"], "space.data.batch_size: search.scheduler=pbt"),
        (["--schedule.name=onecycle"], "schedule.name: onecycle; search.scheduler=pbt needs"),
        (["--asha.enabled=true"], "asha.enabled: ASHA and PBT"),
    ],
)
def test_pbt_refuses_what_it_cannot_change(
    synth_cifar10: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    tree = {"space": {"optim.lr": [0.1]}, "search": {"algo": "grid", "scheduler": "pbt"}}
    path = write_sweep(tmp_path, synth_cifar10, tree)
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        load_sweep(path, overrides)


EPOCHS = 3


def test_pbt_exploits_a_better_trial_with_its_checkpoint_and_new_values(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            # 2 trials side by side; synchronous PBT: at every epoch both wait for each other
            # and the worse copies the better (asynchronous PBT exploits only when a worse trial
            # happens to report while a better one is live with a checkpoint)
            "space": {"optim.lr": {"low": 0.002, "high": 0.2, "log": True}},
            "search": {
                "algo": "random",
                "num_samples": 2,
                "scheduler": "pbt",
                "metric": "train_loss",
                "mode": "min",
            },
            "pbt": {"interval": 1, "quantile_fraction": 0.5, "synch": True},
        },
        **{"train.epochs": EPOCHS, "data.subset": 128},
    )
    out = run(path)
    rows = csv_rows(out.csv)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    exploited = [r for r in out.rows if r.donors]
    assert exploited, "no trial was exploited"
    assert (out.sweep_dir / "ray" / "pbt_global.txt").read_text().strip()  # Tune's own record
    from cifar_dist.tune.pbt import adoptions

    ids = {r.trial_id for r in out.rows}
    for row in exploited:
        assert set(row.donors) <= ids - {row.trial_id}
        assert next(r for r in rows if r["trial_id"] == row.trial_id)["pbt_donors"]
        run_dir = Path(row.run_dir)
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["epoch"] == EPOCHS
        steps = adoptions(run_dir)
        for a, nxt in zip(steps, [*steps[1:], {"at_record": len(records)}]):
            # It went on at the epoch after the donor's checkpoint ...
            after = records[a["at_record"] : nxt["at_record"]]
            assert after and after[0]["epoch"] == a["epoch"] + 1
            assert [r["epoch"] for r in after] == list(range(a["epoch"] + 1, EPOCHS + 1))[
                : len(after)
            ]
            # ... with the perturbed lr, not the donor's (constant schedule, torch units: the
            # epoch record's lr is optim.lr).
            old_lr, new_lr = a["changed"]["optim.lr"]
            assert new_lr != pytest.approx(old_lr)
            assert all(r["lr"] == pytest.approx(new_lr) for r in after)
        assert row.params["optim.lr"] == pytest.approx(steps[-1]["changed"]["optim.lr"][1])


INTERRUPT_LR = 0.03  # the third of four grid points


def interrupting_trial(config: dict[str, Any], ctx: Any) -> None:
    """run_trial, but the first attempt of the trial for INTERRUPT_LR, having reported epoch 1
    (with its checkpoint) and logged epoch 2 to its metrics.jsonl, sends SIGTERM to the sweep
    driver (as Slurm does on pre-emption) instead of reporting epoch 2, and waits to be stopped.
    """
    import signal
    import time

    from ray import tune

    from cifar_dist.tune.trainable import run_trial

    real = tune.report
    if config["optim.lr"] == INTERRUPT_LR and tune.get_checkpoint() is None:

        def report(metrics: dict[str, Any], *, checkpoint: Any = None) -> None:
            if metrics.get("epoch") == 2:
                os.kill(int(os.environ["CIFAR_DIST_TEST_DRIVER_PID"]), signal.SIGTERM)
                time.sleep(120)  # the driver stops this trial
            real(metrics, checkpoint=checkpoint)

        tune.report = report
    try:
        run_trial(config, ctx)
    finally:
        tune.report = real


DRIVER = """
import os, sys
from pathlib import Path
from cifar_dist.tune import load_sweep
from cifar_dist.tune.driver import run_sweep
from tests.test_tune import interrupting_trial
os.environ["CIFAR_DIST_TEST_DRIVER_PID"] = str(os.getpid())
sweep, base, _ = load_sweep(sys.argv[1])
out = run_sweep(sweep, base, Path(sys.argv[1]), trial_fn=interrupting_trial)
print("INTERRUPTED" if out.interrupted else "FINISHED", out.sweep_dir)
"""


def test_interrupted_sweep_resumes_unfinished_trials_from_their_checkpoints(
    ray_session: Any, synth_cifar10: Path, tmp_path: Path
) -> None:
    lrs = [0.01, 0.02, INTERRUPT_LR, 0.05]
    path = write_sweep(
        tmp_path,
        synth_cifar10,
        {
            "name": "cut",
            "space": {"optim.lr": {"values": lrs}},
            "search": {"algo": "grid", "max_concurrent": 1},  # trials in grid order
            "ray": {"num_cpus": 1},
        },
    )
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("INTERRUPTED"), proc.stdout[-2000:]
    sweep_dir = tmp_path / "sweeps" / "cut"
    before = {r["trial_id"]: r for r in csv_rows(sweep_dir / "sweep_results.csv")}
    done = {k: r for k, r in before.items() if r["status"] == "completed"}
    assert sorted(float(r["optim.lr"]) for r in done.values()) == lrs[:2]
    (cut,) = [r for r in before.values() if float(r["optim.lr"]) == INTERRUPT_LR]
    assert cut["status"] == "unfinished" and cut["epochs"] == "1"  # Tune got epoch 1 only
    assert epochs_logged(Path(cut["run_dir"])) == [1, 2]  # the trial itself had logged epoch 2
    finished_logs = {k: (Path(r["run_dir"]) / "metrics.jsonl").read_text() for k, r in done.items()}
    from cifar_dist.tune.driver import resume_sweep

    # Tune wants the same trainable back; the cut trial now has a checkpoint, so it goes on.
    _, out = resume_sweep(sweep_dir, trial_fn=interrupting_trial)
    assert not out.interrupted, [(r.trial_id, r.status, r.epochs, r.error) for r in out.rows]
    rows = csv_rows(out.csv)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4  # no trial twice
    assert sorted(float(r["optim.lr"]) for r in rows) == lrs
    assert all(r["status"] == "completed" and r["epochs"] == "2" for r in rows)
    for r in rows:
        # every trial logged epochs 1 and 2 exactly once: the cut trial went on from its
        # epoch-1 checkpoint, and its unreported epoch-2 record was dropped before the rerun
        assert epochs_logged(Path(r["run_dir"])) == [1, 2], r
    for trial_id, text in finished_logs.items():  # finished trials were not run again
        assert (Path(before[trial_id]["run_dir"]) / "metrics.jsonl").read_text() == text


def test_resume_needs_a_sweep_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "tune", "--resume", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"cifar-dist: error: {tmp_path / 'nope'}: no sweep.yaml; --resume takes a sweep directory"
    )


def test_trial_config_is_a_tune_trial_run_resumed_only_from_a_checkpoint(tmp_path: Path) -> None:
    """Trials log W&B runs of job_type tune-trial whatever the base says; a restored trial
    (a checkpoint to resume from) resumes, so it keeps the W&B run id of its run directory."""
    from cifar_dist.tune.trainable import TrialContext, trial_config

    base = {"log.wandb.job_type": "train", "log.wandb.mode": "disabled"}
    ctx = TrialContext(base, str(tmp_path), "g", ["sweep"], "val_acc", "max")
    fresh = trial_config(ctx, {"optim.lr": 0.1}, "t0", "")
    assert fresh.log.wandb.job_type == "tune-trial" and fresh.log.wandb.group == "g"
    assert (fresh.log.dir, fresh.log.name, fresh.train.resume) == (str(tmp_path), "t0", "")
    restored = trial_config(ctx, {"optim.lr": 0.1}, "t0", str(tmp_path / "ckpt.pt"))
    assert restored.train.resume == str(tmp_path / "ckpt.pt")
