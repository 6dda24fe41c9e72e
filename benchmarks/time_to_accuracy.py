"""Time to accuracy: train a config for K seeds, report mean +- std accuracy and time, record it.

    .venv/bin/python benchmarks/time_to_accuracy.py -c configs/cifar10_fast_gpu.yaml --seeds 10
    .venv/bin/python benchmarks/time_to_accuracy.py -c configs/cifar10_fast_cpu.yaml --seeds 1 \\
        --data.dir=/work/main/data

Every run goes through `fit(cfg)` in this one process (so what is timed is what users run), with
`--train.seed=<k>` and any further `--section.key=value` overrides. Accuracy is the final
`test_acc` when the data has a test split (the canonical CIFAR files), else `val_acc`, with the
config's TTA. Times per run:

- train_s: the training loops. On CUDA, the trainer measures them with CUDA events (device
  time); otherwise host perf_counter (exact on CPU, where every step synchronises).
- wall_s: the whole fit() call (data set-up, whitening fit, evaluation, checkpoints included).

With --warmup-steps N > 0 (default: N = 10 when train.compile is on) a first run of N steps on
seed -1 pays torch.compile's one-time compilation (and CUDA/oneDNN start-up), which is reported
separately as `warm-up s` and excluded from the statistics; its process-level caches then
serve the measured runs. One row is appended to docs/benchmarks.md with the device and command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from doc_table import append_row  # noqa: E402 - benchmarks/ is this script's directory

SECTION = "## Time to accuracy (`benchmarks/time_to_accuracy.py`)"
HEADER = (
    "| date | command | device | runs | accuracy (%) | train s | wall s | warm-up s | git |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores (torch {torch.__version__})"


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def run(config: str, overrides: list[str], seed: int, name: str, max_steps: int = 0) -> dict:
    from cifar_dist.config import load_config
    from cifar_dist.train.fit import fit

    extra = [f"--train.seed={seed}", f"--log.name={name}", "--train.progress=false"]
    if max_steps:
        extra += [f"--train.max_steps={max_steps}", "--log.plots=false"]
    t0 = time.perf_counter()
    res = fit(load_config(config, [*overrides, *extra]))
    res["fit_s"] = time.perf_counter() - t0
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--seeds", type=int, default=5, help="measured runs (seeds S..S+K-1)")
    p.add_argument("--first-seed", type=int, default=0, help="S: add seeds to earlier runs")
    p.add_argument("--warmup-steps", type=int, default=-1, help="-1: 10 if compile else 0")
    p.add_argument("--name", default=f"tta-{datetime.now():%Y%m%d-%H%M%S}")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args, overrides = p.parse_known_args()
    from cifar_dist.config import load_config
    from cifar_dist.utils.gitinfo import git_sha

    sha = git_sha()  # now: the code that runs, even if the checkout moves during the runs
    sha = sha[:10] + ("+dirty" if sha.endswith("+dirty") else "")

    cfg = load_config(args.config, overrides)
    warm = args.warmup_steps if args.warmup_steps >= 0 else (10 if cfg.train.compile else 0)
    warm_s = run(args.config, overrides, -1, f"{args.name}-warmup", warm)["fit_s"] if warm else 0.0
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        res = run(args.config, overrides, seed, f"{args.name}-s{seed}")
        split = "test" if "test_acc" in res else "val"
        results.append((100 * res[f"{split}_acc"], res["train_s"], res["fit_s"]))
        print(f"seed {seed}: {split}_acc={results[-1][0]:.2f}% train_s={res['train_s']:.1f} "
              f"wall_s={res['fit_s']:.1f}", flush=True)  # fmt: skip
    accs, trains, walls = (list(col) for col in zip(*results))
    import torch

    on_cuda = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()
    )
    device = device_name("cuda" if on_cuda else "cpu")
    shown = " ".join(["benchmarks/time_to_accuracy.py -c", args.config, f"--seeds {args.seeds}",
                      *([f"--first-seed {args.first_seed}"] if args.first_seed else []), *overrides])  # fmt: skip
    row = (
        f"| {datetime.now():%Y-%m-%d} | `{shown}` | {device} | {args.seeds} | "
        f"{split} {mean_std(accs)} | {mean_std(trains)} | {statistics.mean(walls):.1f} | "
        f"{warm_s:.1f} | {sha} |"
    )
    print(
        f"{split} accuracy {mean_std(accs)} %, train {mean_std(trains)} s, warm-up {warm_s:.1f} s"
    )
    print(row)
    append_row(Path(args.doc), SECTION, HEADER, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
