"""Grid vs Bayesian search under the same budget: best validation accuracy found vs trials used.

    .venv/bin/python benchmarks/tune_search.py --data.dir=/work/main/data

Runs two sweeps through the CLI (exactly what users run), both from configs/tune/lr_bs_grid.yaml's
run settings (configs/cifar10_cpu.yaml's recipe on airbench_net, 2 epochs on 20,000 training images, scored
on the 5,000-image validation split):
  grid:  every lr in --lrs x every batch size in --batch-sizes (12 trials by default);
  bayes: Optuna TPE over the same box (lr log-uniform in [min, max] of --lrs, batch size a choice
         of --batch-sizes), as many trials as the grid.
Then prints a markdown table (best val_acc after k trials, k = 1..N, trials in start order) and
writes a plot; with --doc it adds the table to the Sweeps section of that file. Extra `--section.key=value`
arguments go to every trial (e.g. --data.dir, --train.epochs, --data.subset).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from doc_table import append_block  # noqa: E402 - benchmarks/ is this script's directory

SECTION = "## Sweeps: grid vs Bayesian search under one budget (`benchmarks/tune_search.py`)"
GRID_CONFIG = REPO / "configs/tune/lr_bs_grid.yaml"


def sweep_files(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    tree = yaml.safe_load(GRID_CONFIG.read_text())
    tree["base"] = str((GRID_CONFIG.parent / tree["base"]).resolve())
    tree["dir"] = str(out)
    lrs = [float(v) for v in args.lrs.split(",")]
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    trials = len(lrs) * len(sizes)
    search = {"metric": "val_acc", "mode": "max", "max_concurrent": args.concurrent}
    grid = {
        **tree,
        "name": f"{args.name}-grid",
        "space": {"optim.lr": {"values": lrs}, "data.batch_size": {"values": sizes}},
        "search": {**search, "algo": "grid"},
    }
    bayes = {
        **tree,
        "name": f"{args.name}-bayes",
        "space": {
            "optim.lr": {"low": min(lrs), "high": max(lrs), "log": True},
            "data.batch_size": {"values": sizes},
        },
        "search": {
            **search,
            "algo": "bayes",
            "num_samples": trials,
            "startup_trials": args.startup,
            "seed": args.seed,
        },
    }
    paths = {}
    for kind, t in (("grid", grid), ("bayes", bayes)):
        paths[kind] = out / f"{args.name}-{kind}.yaml"
        paths[kind].write_text(yaml.safe_dump(t, sort_keys=False))
    return paths


def best_so_far(csv_path: Path) -> list[float]:
    best, curve = float("nan"), []
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            v = float(row["val_acc"])
            usable = row["status"] != "diverged" and math.isfinite(v)
            if usable and (math.isnan(best) or v > best):
                best = v
            curve.append(best)
    return curve


def plot(curves: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, curve in curves.items():
        xs = range(1, len(curve) + 1)
        ax.plot(xs, [100 * v for v in curve], marker="o", drawstyle="steps-post", label=kind)
    ax.set(xlabel="trials used", ylabel="best val accuracy so far (%)", title="grid vs bayes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lrs", default="3,6,12,24", help="per 1024 examples")
    p.add_argument("--batch-sizes", default="256,512,1024")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (both sweeps)")
    p.add_argument("--startup", type=int, default=5, help="bayes: random trials before TPE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=f"bench-{datetime.now():%Y%m%d-%H%M%S}")
    p.add_argument("--out", default=str(REPO / "runs/tune"))
    p.add_argument("--doc", default="", help="append the table to this markdown file")
    p.add_argument("--plot", default=str(REPO / "docs/tune_search.png"))
    args, overrides = p.parse_known_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    curves, walls = {}, {}
    for kind, path in sweep_files(args, out).items():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "cifar_dist", "tune", "-c", str(path), *overrides]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            return 1
        walls[kind] = (time.perf_counter() - t0) / 60
        curves[kind] = best_so_far(out / f"{args.name}-{kind}" / "sweep_results.csv")
    plot(curves, Path(args.plot))
    n = max(len(c) for c in curves.values())
    lines = [
        f"Command: `python benchmarks/tune_search.py {' '.join(sys.argv[1:])}` "
        f"({datetime.now():%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.concurrent} trials at once; wall: grid {walls['grid']:.1f} min, "
        f"bayes {walls['bayes']:.1f} min). Plot: `{Path(args.plot).name}`.",
        "",
        "| trials used | grid: best val acc (%) | bayes: best val acc (%) |",
        "|---|---|---|",
    ]
    for k in range(n):
        cells = [
            f"{100 * c[k]:.2f}" if k < len(c) and math.isfinite(c[k]) else "-"
            for c in curves.values()
        ]
        lines.append(f"| {k + 1} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(table)
    if args.doc:
        append_block(Path(args.doc), SECTION, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
