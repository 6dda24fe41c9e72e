"""Data parallelism on CPU: 2 gloo ranks under torchrun against single-process references."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.train.checkpoint import load_checkpoint, step_checkpoints
from cifar_dist.train.fit import fit
from tests.conftest import tiny_overrides
from tests.forked_ranks import run_forked

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
# CHECK_CONFIG=0: the launch scripts' config pre-check (~4 s a launch) has its own test
# (test_launch_scripts.py); these runs use configs that load.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
    "CHECK_CONFIG": "0",
}


def torchrun_cmd(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
        "-m",
        "cifar_dist",
        *args,
    ]


def run_torchrun(
    nproc: int, *args: str, restarts: int = 0, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(nproc, *args, restarts=restarts),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def run_deepspeed_script(over: dict[str, object], **env: str) -> subprocess.CompletedProcess:
    """`cifar-dist train` through launch/deepspeed.sh (DeepSpeed's own launcher), 2 ranks."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        ["bash", str(root / "launch/deepspeed.sh"), *cli_args(over)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**ENV, "NPROC": "2", "PYTHONPATH": str(root), **env},
    )


def cli_args(over: dict[str, object]) -> list[str]:
    return [f"--{k}={v}" for k, v in over.items()]


def step_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return [json.loads(x)["step/loss"] for x in lines]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _base(data: Path, runs: Path, name: str, **extra: object) -> dict[str, object]:
    return tiny_overrides(
        data,
        runs,
        **{
            "model.name": "airbench_net_nano",
            "train.max_steps": 20,
            "train.epochs": 2,
            "log.every_steps": 1,
            "log.name": name,
            "data.crop_padding": 4,
            "data.flip": True,
            "optim.momentum": 0.9,
            **extra,
        },
    )


def assert_same_run(single: Path, ddp: Path, tol: float = 1e-5) -> None:
    a, b = step_losses(single), step_losses(ddp)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)
    wa, wb = weights(single), weights(ddp)
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=k)


# ReLU/max-pool CNNs amplify float32 rounding (different summation orders) by ~10x per step:
# 20 steps then differ by more than 1e-5 even between two single-process runs that only differ
# in gradient accumulation. The ViT (smooth everywhere) does not; the BatchNorm CNN is compared
# in float64, where the same amplification stays far below the tolerance.
@pytest.mark.parametrize(
    ("model", "single_norm", "ddp_norm", "dtype"),
    [
        ("vit_nano", "group", "group", "float32"),
        ("airbench_net_nano", "batch", "sync_batch", "float64"),
    ],
)
def test_ddp_matches_single_process(
    synth_cifar10: Path, tmp_path: Path, model: str, single_norm: str, ddp_norm: str, dtype: str
) -> None:
    """2 ranks x 16 == 1 process x 32: per-step loss and final weights (SyncBN vs full-batch BN)."""
    common = {"model.name": model, "train.dtype": dtype}
    fit(
        load_config(
            None, _base(synth_cifar10, tmp_path, "single", **{"model.norm": single_norm, **common})
        )
    )
    proc = run_forked(
        2,
        "train",
        *cli_args(_base(synth_cifar10, tmp_path, "ddp", **{"model.norm": ddp_norm, **common})),
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(tmp_path / "single", tmp_path / "ddp")
    # parallel.json: two whole replicas; a ring all-reduce sends 2 (n-1)/n of the gradients
    rep = json.loads((tmp_path / "ddp" / "parallel.json").read_text())
    n = rep["params_total"]
    assert [(r["dp"], r["local"], r["sharded_local"]) for r in rep["ranks"]] == [
        (0, n, 0),
        (1, n, 0),
    ]
    assert rep["comm_bytes_per_step"] == n * rep["bytes_per_element"]


def test_distributed_eval_equals_single(synth_cifar10: Path, tmp_path: Path) -> None:
    """Sharded evaluation on 2 ranks counts every sample once, also for an odd-sized split."""
    fit(load_config(None, _base(synth_cifar10, tmp_path, "m", **{"train.max_steps": 5})))
    ckpt = str(tmp_path / "m/checkpoints/last.pt")
    odd = ["--data.val_size=101", "--data.eval_batch_size=20"]
    single = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "eval", "--checkpoint", ckpt, *odd],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    ddp = run_torchrun(2, "eval", "--checkpoint", ckpt, *odd)
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = json.loads(single.stdout), json.loads(ddp.stdout)
    for split in ("val", "test"):
        assert a[f"{split}_acc"] == b[f"{split}_acc"]  # the same correct count
        assert a[f"{split}_loss"] == pytest.approx(b[f"{split}_loss"], abs=1e-6)
    assert round(a["val_acc"] * 101) == pytest.approx(a["val_acc"] * 101, abs=1e-4)


# One uninterrupted 2-rank run (2 epochs of 15 steps, checkpoint every 4) that the fault tests
# below must reproduce bit for bit after their interruption and resume.
FAULT_RUN = {
    "train.ckpt_every_steps": 4,
    "train.resume": "auto",
    "train.max_steps": 0,
    "train.epochs": 2,
    "model.norm": "batch",
}


@pytest.fixture(scope="module")
def clean_run(synth_cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("fault_runs")
    proc = run_torchrun(2, "train", *cli_args(_base(synth_cifar10, runs, "clean", **FAULT_RUN)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "clean"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("kind", ["kill", "collective"])
def test_elastic_restart_after_sigkill_is_bit_identical(
    synth_cifar10: Path, tmp_path: Path, clean_run: Path, kind: str
) -> None:
    """Rank 1 is SIGKILLed mid-epoch, between steps (kill) or with its all-reduce of step 10's
    flags in flight while rank 0 waits in the matching one (collective); torchrun restarts both;
    the run resumes from its last checkpoint (step 8) and ends with exactly the clean weights."""
    faulty = run_torchrun(
        2,
        "train",
        *cli_args(_base(synth_cifar10, tmp_path, "faulty", **FAULT_RUN)),
        restarts=1,
        env={"CIFAR_DIST_FAULT": f"1:10:{kind}"},
    )
    out = faulty.stdout + faulty.stderr
    assert faulty.returncode == 0, out[-3000:]
    assert "resumed at epoch 1, step 8" in out
    summary = json.loads((tmp_path / "faulty/summary.json").read_text())
    assert (summary["start_step"], summary["steps_this_run"]) == (8, 22)
    assert_same_weights(clean_run, tmp_path / "faulty")


@pytest.mark.parametrize("signal_after", [10, 0])
def test_sigterm_on_one_rank_stops_both_and_resumes_bit_identical(
    synth_cifar10: Path, tmp_path: Path, clean_run: Path, signal_after: int
) -> None:
    """SIGTERM reaches rank 1 alone after step 10 (mid-epoch), or during set-up (0, before the
    data is built): both ranks stop after the next step (the flag is all-reduced), write one
    checkpoint and exit 75; plain torchrun reports 1 (any failed worker) and the run dir's
    PREEMPTED marker says why. The resume continues at that step and ends with exactly the
    weights of the uninterrupted run."""
    stop = signal_after + 1
    args = cli_args(_base(synth_cifar10, tmp_path, "term", **FAULT_RUN))
    first = run_torchrun(2, "train", *args, env={"CIFAR_DIST_FAULT": f"1:{signal_after}:sigterm"})
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-3000:]  # torchrun's code for a failed worker
    assert out.count(f"stopped by signal at step {stop}") == 2, out[-3000:]
    assert "exitcode  : 75" in out  # what each worker returned, in torchrun's failure report
    marker = json.loads((tmp_path / "term/PREEMPTED").read_text())
    assert (marker["step"], marker["exit_code"]) == (stop, 75)
    assert load_checkpoint(tmp_path / "term/checkpoints/last.pt")["train_state"]["step"] == stop
    second = run_torchrun(2, "train", *args)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"resumed at epoch 1, step {stop}" in out
    assert not (tmp_path / "term/PREEMPTED").exists()  # cleared by the new start
    summary = json.loads((tmp_path / "term/summary.json").read_text())
    assert (summary["start_step"], summary["steps_this_run"], summary["steps"]) == (
        stop,
        30 - stop,
        30,
    )
    assert_same_weights(clean_run, tmp_path / "term")


def test_launcher_script_exits_75_after_sigterm(synth_cifar10: Path, tmp_path: Path) -> None:
    """launch/torchrun.sh, SIGTERMed as a whole process group mid-run (as a scheduler does):
    the workers checkpoint and the script maps torchrun's 1 to the documented 75."""
    over = _base(
        synth_cifar10,
        tmp_path,
        "term",
        **{"train.max_steps": 0, "train.epochs": 50, "train.ckpt_every_steps": 0},
    )
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch/torchrun.sh"), *cli_args(over)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ENV, "NPROC": "2", "LOG_DIR": str(tmp_path / "logs"), "TMPDIR": str(tmp_path)},
        start_new_session=True,
    )
    steps = tmp_path / "term/steps.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        steps.exists() and len(steps.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    assert not step_checkpoints(tmp_path / "term/checkpoints")  # nothing saved before the signal
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert out.count("checkpoint saved") == 2, out[-3000:]
    state = load_checkpoint(tmp_path / "term/checkpoints/last.pt")
    assert state["train_state"]["step"] >= 3
    assert (tmp_path / "term/PREEMPTED").exists()
    assert not list(tmp_path.glob("cifar-dist-preempt.*"))  # the script's marker is cleaned up


def test_mesh_mismatch_fails_fast_on_every_rank(synth_cifar10: Path, tmp_path: Path) -> None:
    t0 = time.time()
    proc = run_torchrun(
        2,
        "train",
        *cli_args(tiny_overrides(synth_cifar10, tmp_path)),
        "--parallel.dp=3",
        timeout=180,
    )
    assert proc.returncode != 0
    line = "cifar-dist: error: parallel: dp*tp*pp = 3*1*1 = 3 != world size 2"
    assert (proc.stdout + proc.stderr).count(line) == 2, proc.stderr[-3000:]
    assert time.time() - t0 < 120
