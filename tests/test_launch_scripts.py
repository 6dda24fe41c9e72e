"""Exit code 75 after a checkpointed pre-emption, through every launcher script: DeepSpeed's
launcher for real (2 CPU ranks), the sbatch scripts and torchrun.sh's mapping with stand-ins
for srun/scontrol/torchrun (no Slurm here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.test_distributed import run_deepspeed_script

ROOT = Path(__file__).resolve().parents[1]
PREEMPTED = 75


@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_script_exits_75_after_sigterm_on_one_rank(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    """SIGTERM reaches rank 1 alone (fault hook) under launch/deepspeed.sh: both ranks stop after
    the same step, DeepSpeed writes its checkpoint, the script exits 75."""
    over = tiny_overrides(
        synth_cifar10,
        tmp_path,
        **{
            "model.name": "vit_nano",
            "parallel.engine": "deepspeed",
            "train.epochs": 2,
            "train.ckpt_every_steps": 0,
            "log.name": "ds",
        },
    )
    proc = run_deepspeed_script(over, CIFAR_DIST_FAULT="1:3:sigterm", TMPDIR=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == PREEMPTED, out[-4000:]
    assert out.count("stopped by signal at step 4") == 2, out[-4000:]
    assert (tmp_path / "ds/checkpoints/step_00000004").is_dir()
    assert (tmp_path / "ds/PREEMPTED").is_file()
    assert not list(tmp_path.glob("cifar-dist-preempt.*"))  # the script's own marker: removed


FAKE_SRUN = """#!/bin/bash
# stand-in for srun/torchrun: MODE=preempt writes the marker like local rank 0 and fails like
# torchrun (1); MODE=crash fails without it; MODE=ok succeeds.
case $MODE in
  preempt) echo '{"step": 7}' > "$CIFAR_DIST_PREEMPT_MARKER"; exit 1 ;;
  crash) exit 1 ;;
  *) exit 0 ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show ]]; then echo node0; exit 0; fi
echo "$*" >> "$SCONTROL_LOG"
"""


def _fake_bin(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp / "venv/bin").mkdir(parents=True)
    (tmp / "venv/bin/activate").write_text("")
    return bin_dir


@pytest.mark.parametrize(
    "script", ["train.sbatch", "train_multinode.sbatch", "deepspeed_multinode.sbatch"]
)
@pytest.mark.parametrize(
    ("mode", "rc", "requeued"), [("preempt", 75, True), ("crash", 1, False), ("ok", 0, False)]
)
def test_sbatch_requeues_and_exits_75_on_the_marker(
    tmp_path: Path, script: str, mode: str, rc: int, requeued: bool
) -> None:
    bin_dir = _fake_bin(tmp_path)
    log = tmp_path / "scontrol.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        "CONFIG": str(ROOT / "configs/debug_cpu.yaml"),
        "VENV": str(tmp_path / "venv"),
        "MODE": mode,
        "SCONTROL_LOG": str(log),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == rc, proc.stderr
    assert (log.exists() and "requeue 42" in log.read_text()) == requeued, proc.stderr
    assert not (tmp_path / "runs/.preempted-42").exists()


@pytest.mark.parametrize(("mode", "rc"), [("preempt", 75), ("crash", 1), ("ok", 0)])
def test_torchrun_script_maps_1_to_75_only_with_the_marker(
    tmp_path: Path, mode: str, rc: int
) -> None:
    bin_dir = _fake_bin(tmp_path)
    proc = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), "-c", str(ROOT / "configs/debug_cpu.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            **os.environ,
            "TORCHRUN": str(bin_dir / "torchrun"),
            "PYTHON": sys.executable,
            "CHECK_CONFIG": "0",  # the pre-check: the test below
            "NPROC": "2",
            "MODE": mode,
            "TMPDIR": str(tmp_path),
            "LOG_DIR": str(tmp_path / "logs"),
        },
    )
    assert proc.returncode == rc, proc.stderr
    assert not list(tmp_path.glob("cifar-dist-preempt.*"))


@pytest.mark.parametrize(
    ("script", "launcher"), [("torchrun", "TORCHRUN"), ("deepspeed", "DEEPSPEED")]
)
def test_launch_script_stops_a_config_error_in_one_line_before_launching(
    tmp_path: Path, script: str, launcher: str
) -> None:
    """The scripts load the config once first: a bad key exits 2 with the CLI's one line (not
    N ranks' copies and the launcher's traceback); the launcher (a stand-in that would exit 0)
    never starts."""
    bin_dir = _fake_bin(tmp_path)
    proc = subprocess.run(
        ["bash", str(ROOT / f"launch/{script}.sh"), "--optim.lrr=0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, launcher: str(bin_dir / "torchrun"), "PYTHON": sys.executable,
             "NPROC": "2", "MODE": "ok", "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("cifar-dist: error: optim.lrr: unknown key (known: "), line
