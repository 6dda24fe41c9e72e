"""The config smoke matrix: every shipped config, shortened, under the launcher its header names.

Header convention (configs/README.md): every YAML file in configs/ and configs/tune/ carries, in
its leading comment block, one or more machine-readable launch lines, each a way to run it on
CPU that the smoke test exercises:

    # launch: single                          cifar-dist train -c FILE (one process)
    # launch: torchrun --nproc_per_node=N     N gloo ranks under torchrun
    # launch: deepspeed NPROC=N               launch/deepspeed.sh, N gloo ranks
    # launch: tune                            cifar-dist tune -c FILE (one tiny trial)

`shorten_train` / `shorten_tune` turn a config into seconds of work (synthetic data, CPU, one
epoch of 2 optimiser steps, a few evaluation images) without touching the options that make
it that config (model, norm, parallel layout, engine, recipe tricks, schedule, amp).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LAUNCH = re.compile(r"^#\s*launch:\s*(?P<spec>.*?)\s*$")
SPECS = {
    "single": re.compile(r"^single$"),
    "torchrun": re.compile(r"^torchrun --nproc_per_node=(?P<n>[1-9]\d*)$"),
    "deepspeed": re.compile(r"^deepspeed NPROC=(?P<n>[1-9]\d*)$"),
    "tune": re.compile(r"^tune$"),
}
# Shortened runs: global batch (rounded up to what the layout divides), validation images,
# and the synthetic data the session writes once (enough for 2 steps of the largest batch).
BATCH, VAL, SYNTH_TRAIN, SYNTH_TEST = 32, 32, 256, 64
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(REPO),
    "RAY_USAGE_STATS_ENABLED": "0",
    "CHECK_CONFIG": "0",  # the launch scripts' config pre-check: tests/test_launch_scripts.py
}


@dataclass(frozen=True)
class Launch:
    kind: str  # single | torchrun | deepspeed | tune
    nproc: int = 1

    @property
    def label(self) -> str:
        return {
            "single": "single",
            "torchrun": f"torchrun --nproc_per_node={self.nproc}",
            "deepspeed": f"deepspeed NPROC={self.nproc}",
            "tune": "tune",
        }[self.kind]


def config_files() -> list[Path]:
    return sorted([*CONFIGS.glob("*.yaml"), *(CONFIGS / "tune").glob("*.yaml")])


def header(path: Path) -> list[str]:
    """The leading comment block (the lines before the first YAML content)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line)
    return out


def launches(path: Path) -> list[Launch]:
    """The file's header launch lines; ValueError naming the file for a malformed one."""
    found = []
    for line in header(path):
        m = LAUNCH.match(line)
        if not m:
            continue
        spec = m.group("spec")
        for kind, pattern in SPECS.items():
            hit = pattern.match(spec)
            if hit:
                found.append(Launch(kind, int(hit.groupdict().get("n") or 1)))
                break
        else:
            raise ValueError(f"{path}: unknown launch line {line!r} (see tests/smoke_matrix.py)")
    return found


def is_sweep(path: Path) -> bool:
    return path.parent.name == "tune"


def _batch(cfg: Any, nproc: int) -> int:
    """BATCH rounded up to a multiple of what one step splits into (data-parallel replicas x
    accumulation x torch-pipeline micro-batches; DeepSpeed's pipeline micro-batches are
    train.grad_accum)."""
    p = cfg.parallel
    dp = p.dp if p.dp > 0 else max(1, nproc // (p.tp * p.pp))
    torch_pipe = p.pp > 1 and p.engine == "torch"
    unit = dp * cfg.train.grad_accum * (p.microbatches if torch_pipe else 1)
    return unit * math.ceil(BATCH / unit)


def run_overrides(cfg: Any, data_dir: Path, nproc: int) -> dict[str, object]:
    """What makes a run of `cfg` take seconds on CPU; the keys a sweep lets a trial fix."""
    batch = _batch(cfg, nproc)
    over: dict[str, object] = {
        "data.dir": str(data_dir),
        "data.val_size": VAL if cfg.data.val_size else 0,  # keep "train on all, report test"
        "data.subset": 2 * batch,  # one epoch = 2 optimiser steps
        "data.batch_size": batch,
        "data.eval_batch_size": VAL,
        "data.num_workers": 0,
        "train.epochs": 1,
        "train.compile": False,  # CPU: compiling would dominate a 2-step run
        "train.threads": 0,  # torch's default under OMP_NUM_THREADS=1 (CI cores are shared)
        "train.progress": False,
        "log.wandb.mode": "disabled",
    }
    if cfg.train.amp == "fp16":  # fp16 needs a GradScaler on a GPU; bf16 is the CPU's
        over["train.amp"] = "bf16"
    return over


def shorten_train(cfg: Any, data_dir: Path, run_dir: Path, name: str, nproc: int) -> list[str]:
    over = {
        **run_overrides(cfg, data_dir, nproc),
        "train.device": "cpu",
        "log.dir": str(run_dir),
        "log.name": name,
    }
    return [f"--{k}={v}" for k, v in over.items()]


def shorten_tune(path: Path, data_dir: Path, sweep_dir: Path) -> list[str]:
    """Run overrides for every trial plus sweep keys that leave exactly one trial."""
    from cifar_dist.tune import load_sweep

    sweep, base, _ = load_sweep(path)
    over = run_overrides(base, data_dir, sweep.trial.workers)
    args = [f"--{k}={v}" for k, v in over.items()]
    args += [f"--dir={sweep_dir}", "--search.num_samples=1", "--search.max_concurrent=1"]
    for key, spec in sweep.space.items():
        if key in over:  # a searched key we also shorten (data.batch_size): our value
            args.append(f"--space.{key}.values=[{over[key]}]")
        elif spec.values:  # grid/choice: the first value only
            args.append(f"--space.{key}.values=[{spec.values[0]}]")
    return args


def command(path: Path, launch: Launch, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run `path` the way its launch line says."""
    rel = str(path.relative_to(REPO))
    py = sys.executable
    if launch.kind == "single":
        return [py, "-m", "cifar_dist", "train", "-c", rel, *args], ENV
    if launch.kind == "tune":
        return [py, "-m", "cifar_dist", "tune", "-c", rel, *args], ENV
    if launch.kind == "torchrun":
        run = [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={launch.nproc}",
        ]
        return [*run, "-m", "cifar_dist", "train", "-c", rel, *args], ENV
    script = str(REPO / "launch" / "deepspeed.sh")
    return ["bash", script, "-c", rel, *args], {**ENV, "NPROC": str(launch.nproc)}


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in its own session; on timeout the whole process group is killed (a
    launcher's workers would otherwise outlive it, stuck in a collective)."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[killed after {timeout:.0f} s]"
        return subprocess.CompletedProcess(argv, -9, out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
