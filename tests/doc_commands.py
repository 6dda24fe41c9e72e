"""Every fenced command in README.md and docs/*.md, and what the doc check does with it.

A command is a line of a ```bash / sh / shell / console block (comments stripped, `\\`
continuations joined), or a line of an untagged block that starts like a command. Each one must
be classified in CLASSIFIED, keyed by its text; adding a command to the docs means adding one
line here:

  Run()         run it, shortened (tests/test_doc_commands.py): CPU, synthetic data, 2 steps;
                `runs/` and `/tmp/` paths moved into a temporary directory.
  Check(why)    it cannot run here as written (GPUs, 8 processes) or it repeats a config smoke
                run: its arguments are parsed and its config (or sweep) is loaded, no training;
                a benchmark script must answer --help.
  Skip(why)     nothing to run here (Slurm, docker, multi-node, package installs, downloads).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
# An untagged block's line is a command when it starts like one.
COMMAND_START = re.compile(
    r"^(\$ )?([A-Z_]+=\S+ )*((cifar-dist|torchrun|deepspeed|python[\d.]*|bash|sh|sbatch|srun|"
    r"docker|pip3?|apt-get|pytest|ray|wandb|mkdir)(\s|$)|(\.venv|launch|scripts|benchmarks)/\S)"
)
REPO_DIRS = ("configs/", "launch/", "slurm/", "docker/", "scripts/", "benchmarks/")


@dataclass(frozen=True)
class Run:
    extra: str = ""  # arguments appended after the shortening ones (e.g. compress flags)


@dataclass(frozen=True)
class Check:
    why: str


@dataclass(frozen=True)
class Skip:
    why: str


SMOKE = "runs in the config smoke matrix (tests/test_config_smoke.py)"
GPU8 = "8 GPUs; the same config runs on CPU in the config smoke matrix"
SLURM = "Slurm (sbatch); not available here"
INSTALL = "installs packages"

CLASSIFIED: dict[str, Run | Check | Skip] = {
    # README.md
    "bash scripts/setup.sh && CIFAR_DIST_SOURCE=../shared/data/cifar10-jpeg .venv/bin/cifar-dist train -c configs/cifar10_cpu.yaml": Skip(
        f"{INSTALL}, then the 30-minute main job (its config {SMOKE})"
    ),
    "bash scripts/setup.sh && .venv/bin/python -m pytest": Skip(
        f"{INSTALL}, then the suite itself"
    ),
    "cifar-dist train -c configs/debug_cpu.yaml": Run(),
    "cifar-dist train -c configs/cifar10_cpu.yaml --optim.lr=0.1": Run(),
    "cifar-dist train -c configs/cifar10_cpu.yaml --log.name=r1 --train.resume=auto": Run(),
    "cifar-dist eval --checkpoint runs/r1/checkpoints/last.pt": Run(),
    "cifar-dist train -c configs/cifar10_fast_cpu.yaml": Check(SMOKE),
    "cifar-dist lr-find -c configs/cifar10_fast_cpu.yaml --start 0.5 --end 500": Run(),
    ".venv/bin/python benchmarks/time_to_accuracy.py -c configs/cifar10_fast_gpu.yaml --seeds 10": Check(
        "a benchmark (10 full runs; appends to docs/benchmarks.md)"
    ),
    "cifar-dist data import ../shared/data/cifar10-jpeg": Skip(
        "imports the real 60k-image JPEG shards (minutes); tests/test_data_sources.py imports synthetic shards"
    ),
    "cifar-dist data verify": Run(),
    "cifar-dist data synth --out /tmp/synth --dataset cifar100": Run("--n-train=100 --n-test=20"),
    "torchrun --nproc_per_node=8 -m cifar_dist train -c configs/resnet18_ddp.yaml": Check(GPU8),
    "NPROC=2 bash launch/torchrun.sh -c configs/debug_cpu.yaml --train.device=cpu": Run(),
    "sbatch slurm/train.sbatch": Skip(SLURM),
    "deepspeed --num_gpus 8 --module cifar_dist train -c configs/ds_zero2.yaml": Check(GPU8),
    "NPROC=2 launch/deepspeed.sh -c configs/ds_pipe2.yaml --train.device=cpu": Check(SMOKE),
    "cifar-dist ds-consolidate runs/r1/checkpoints": Check(
        "needs a DeepSpeed run directory (r1 above is a torch run); tests/test_deepspeed.py consolidates one"
    ),
    "torchrun --nproc_per_node=2 -m cifar_dist train -c configs/vit_pp2.yaml": Check(
        "the smoke matrix runs this config on 4 ranks (dp=2 x pp=2) and pp=2 alone on "
        "vit_pp2_interleaved.yaml and resnet18_pp2.yaml"
    ),
    "torchrun --nproc_per_node=4 -m cifar_dist train -c configs/vit_dp2_tp2.yaml": Check(SMOKE),
    "bash scripts/setup.sh dev,wandb,compress,tune": Skip(INSTALL),
    "cifar-dist tune -c configs/tune/debug_grid.yaml": Check(SMOKE),
    "cifar-dist tune -c configs/tune/lr_bs_bayes.yaml --data.dir=/data": Check(SMOKE),
    "cifar-dist tune -c configs/tune/lr_asha.yaml": Check(SMOKE),
    "cifar-dist tune -c configs/tune/lr_bs_grid.yaml --trial.workers=2": Check(
        "Ray Train trials of 2 DDP workers; tests/test_tune.py runs one"
    ),
    "sbatch slurm/ray_cluster.sbatch": Skip(SLURM),
    "cifar-dist compress --checkpoint runs/r1/checkpoints/last.pt --fuse --int8 --prune 0.4 --export onnx": Run(
        "--finetune-epochs=0 --calib-batches=1 --latency-iters=2 --eval-batches=1"
    ),
    # docs/benchmarks.md
    ".venv/bin/python benchmarks/parallel_variants.py --cnn --json runs/parallel_variants_cnn.json": Check(
        "a benchmark (CNN tensor-parallel and pipeline rows, 2- and 4-rank runs)"
    ),
    ".venv/bin/python benchmarks/parallel_variants.py --json runs/parallel_variants.json": Check(
        "a benchmark (~7 minutes of 2- and 4-rank runs)"
    ),
    # docs/deepspeed.md
    'DS_BUILD_OPS=0 pip install -e ".[deepspeed]"': Skip(INSTALL),
    "launch/deepspeed.sh -c configs/ds_zero2.yaml": Check(SMOKE),
    "HOSTFILE=launch/hostfile MASTER_ADDR=node0 launch/deepspeed.sh -c configs/ds_zero3.yaml": Skip(
        "several nodes over pdsh/ssh"
    ),
    "sbatch slurm/deepspeed_multinode.sbatch": Skip(SLURM),
    "torchrun --nproc_per_node=8 -m cifar_dist train -c configs/ds_zero2.yaml": Check(GPU8),
    "NPROC=2 launch/deepspeed.sh -c configs/ds_zero1.yaml --train.device=cpu": Check(SMOKE),
    # docs/distributed.md
    "launch/torchrun.sh -c configs/resnet18_ddp.yaml": Check(SMOKE),
    "NPROC=4 launch/torchrun.sh -c configs/resnet18_ddp.yaml --train.epochs=30": Check(
        "4 ranks of ResNet-18; the config runs on 2 in the smoke matrix"
    ),
    "torchrun --standalone --nproc_per_node=8 -m cifar_dist train -c configs/resnet18_ddp.yaml": Check(
        GPU8
    ),
    "NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29500 RDZV_ID=exp42 launch/torchrun.sh -c configs/resnet18_ddp.yaml --log.name=exp42": Skip(
        "multi-node (a rendezvous on node0)"
    ),
    "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 --rdzv-id=exp42 -m cifar_dist train -c ... --log.name=exp42": Skip(
        "multi-node, and `-c ...` is a placeholder"
    ),
    "CONFIG=configs/my_run.yaml sbatch --gpus-per-node=8 slurm/train.sbatch --train.epochs=200": Skip(
        SLURM
    ),
    "sbatch --nodes=4 slurm/train_multinode.sbatch": Skip(SLURM),
    "MAX_RESTARTS=3 launch/torchrun.sh -c configs/resnet18_ddp.yaml --log.name=exp42 --train.resume=auto --train.ckpt_every_steps=200": Check(
        "elastic restarts; tests/test_distributed.py kills and restarts a rank"
    ),
    "docker build -f docker/Dockerfile -t cifar-dist .": Skip("docker"),
    'docker run --rm --gpus all --ipc=host -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" cifar-dist torchrun --nproc-per-node=gpu -m cifar_dist train -c configs/resnet18_ddp.yaml': Skip(
        "docker with GPUs"
    ),
    "mkdir -p data runs": Skip("part of the docker compose recipe below"),
    "HOST_UID=$(id -u) HOST_GID=$(id -g) docker compose -f docker/compose.yaml up --build": Skip(
        "docker"
    ),
    "NPROC=2 launch/torchrun.sh -c configs/debug_cpu.yaml --train.device=cpu --log.name=smoke": Check(
        "README's `NPROC=2 bash launch/torchrun.sh -c configs/debug_cpu.yaml` runs the same launch"
    ),
    "torchrun --standalone --nproc-per-node=2 -m cifar_dist train -c configs/debug_cpu.yaml --train.device=cpu": Check(
        "tests/test_distributed.py launches `torchrun --standalone ... -m cifar_dist train` this way"
    ),
    "pytest -m distributed": Skip("the test suite itself"),
    # docs/fast_data.md
    "apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev": Skip(INSTALL),
    ".venv/bin/pip install -c constraints.txt -e '.[ffcv]'": Skip(INSTALL),
    # docs/fast_recipe.md
    "cifar-dist train -c configs/cifar10_fast_cpu.yaml --data.dir=/work/main/data": Check(SMOKE),
    "cifar-dist lr-find -c configs/cifar10_fast_cpu.yaml --start 0.5 --end 500 --steps 100": Run(),
    ".venv/bin/python benchmarks/time_to_accuracy.py -c configs/cifar10_fast_cpu.yaml --seeds 1 --data.dir=/work/main/data": Check(
        "a benchmark (a 30-minute run; appends to docs/benchmarks.md)"
    ),
    "cifar-dist train -c configs/cifar10_fast_cpu.yaml --data.dir=/work/ab/data --model.name=airbench_net --optim.lr=11.5 --train.progress=false": Check(
        "a benchmark (the base of the lever runs, 10-16 minutes each on the real data)"
    ),
    "cifar-dist train -c configs/cifar10_cpu_20min.yaml": Check(SMOKE),
    ".venv/bin/python benchmarks/time_to_accuracy.py -c configs/cifar10_cpu_20min.yaml --seeds 2 --first-seed 1 --data.dir=/work/ab/data --data.val_size=5000 --train.progress=false": Check(
        "a benchmark (two 17-minute runs; appends to docs/benchmarks.md)"
    ),
    ".venv/bin/python benchmarks/profile_step.py --model airbench_net --batch 1024 --steps 3": Check(
        "a benchmark (profiles full-size training steps)"
    ),
    "cifar-dist eval --checkpoint runs/RUN/checkpoints/last.pt --data.dir=/work/ab/data --train.tta=true --train.tta_translate=0": Check(
        "evaluates the checkpoint of a 17-minute timed-config run: its overrides are parsed here"
    ),
    ".venv/bin/python benchmarks/maxpool_variants.py --threads 2": Check(
        "a benchmark (full-size pooling passes, ~1 minute)"
    ),
    # docs/benchmarks.md (the redesign A/B)
    "cifar-dist train -c configs/cifar10_cpu.yaml --data.dir=/work/ab/data --train.max_steps=88 --log.every_steps=1 --train.eval_every=1 --train.progress=false --log.wandb.mode=disabled": Check(
        "a benchmark (a 6-minute run per commit on the real data)"
    ),
    # docs/parallelism.md
    "torchrun --nproc_per_node=4 -m cifar_dist train -c configs/vit_pp2.yaml": Check(SMOKE),
    "torchrun --nproc_per_node=2 -m cifar_dist train -c configs/vit_pp2_interleaved.yaml": Check(
        SMOKE
    ),
    "torchrun --nproc_per_node=2 -m cifar_dist train -c configs/resnet18_pp2.yaml": Check(SMOKE),
    "torchrun --nproc_per_node=2 -m cifar_dist train -c configs/vit_tp2.yaml": Check(SMOKE),
    # docs/tune.md
    'pip install -e ".[tune]"': Skip(INSTALL),
    "cifar-dist tune -c configs/tune/lr_bs_bayes.yaml": Check(SMOKE),
    "cifar-dist tune -c configs/tune/lr_bs_grid.yaml --data.dir=/data": Check(SMOKE),
    "cifar-dist tune -c configs/tune/lr_asha.yaml --search.num_samples=32": Check(SMOKE),
    "cifar-dist tune -c configs/tune/lr_bs_bayes.yaml --trial.workers=2": Check(
        "Ray Train trials of 2 DDP workers; tests/test_tune.py runs one"
    ),
    # the CLI additions (issue 16)
    "cifar-dist train --help": Run(),
    "cifar-dist tune --help": Run(),
    "cifar-dist train -c configs/ds_zero3.yaml --print-config": Run(),
    "$ cifar-dist train -c configs/ds_zero3.yaml --optim.lr=0.2 --print-config": Skip(
        "a transcript with its output; the same command without the override runs (README.md)"
    ),
    "cifar-dist tune -c configs/tune/lr_asha.yaml --print-config": Run(),
    "cifar-dist tune -c configs/tune/debug_pbt.yaml": Check(SMOKE),
    "cifar-dist predict --checkpoint runs/r1/checkpoints/last.pt cat.png dog.jpg": Skip(
        "the user's own image files; tests/test_cli_config.py runs predict on generated PNGs"
    ),
    "$ cifar-dist predict --checkpoint runs/demo/checkpoints/last.pt train/cat/0000.jpg train/ship/0001.jpg notes.txt": Skip(
        "a transcript on the user's files; tests/test_cli_config.py runs predict on generated PNGs"
    ),
    "cifar-dist tune --resume runs/tune/debug_grid": Skip(
        "needs an interrupted sweep; tests/test_tune.py interrupts one with SIGTERM and resumes it"
    ),
    "cifar-dist tune --resume runs/tune/<name>": Skip("a placeholder path; see the line above"),
}


@dataclass(frozen=True)
class DocCommand:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the command's first line
    text: str  # comment stripped, continuations joined, whitespace collapsed

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _strip_comment(line: str) -> str:
    """Drop a shell comment (`#` at the start of a word, outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _commands(body: list[tuple[int, str]], shell: bool) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for lineno, raw in body:
        text = _strip_comment(raw).rstrip() if shell or pending else raw.rstrip()
        if pending is None and not text.strip():
            continue
        if pending is None and not shell and not COMMAND_START.match(text.strip()):
            continue
        start, sofar = pending or (lineno, "")
        if not shell and pending is None:
            text = _strip_comment(text).rstrip()
        if text.endswith("\\"):
            pending = (start, f"{sofar} {text[:-1]}")
            continue
        pending = None
        out.append((start, " ".join(f"{sofar} {text}".split())))
    return out


def extract(path: Path) -> list[DocCommand]:
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(REPO))
    found: list[DocCommand] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        i += 1
        if not m:
            continue
        fence, lang = m.group(1), m.group(2).lower()
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1  # the closing fence
        if lang in SHELL_LANGS or not lang:
            for lineno, text in _commands(body, shell=bool(lang)):
                found.append(DocCommand(rel, lineno, text))
    return found


def all_commands() -> list[DocCommand]:
    return [c for d in docs() for c in extract(d)]


def repo_paths(text: str) -> list[str]:
    """Repository files a command names as arguments (not `VAR=value` settings)."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return [w for w in words if w.startswith(REPO_DIRS) and "=" not in w]
