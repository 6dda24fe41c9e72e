"""Run the main job (configs/cifar10_cpu.yaml by default) on the real data and record it.

    CIFAR_DIST_SOURCE=../shared/data/cifar10-jpeg .venv/bin/python benchmarks/main_job.py

Trains through the CLI (so the run is exactly what users run), then appends validation accuracy,
wall time and img/s to docs/benchmarks.md with the command, the device and the git SHA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from doc_table import append_row  # benchmarks/ (this script's directory) is on sys.path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Main job (`configs/cifar10_cpu.yaml`) on real CIFAR-10"
HEADER = (
    "| date | command | machine | source | val acc (%) | wall (min) | train (min) | train img/s "
    "| git |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-c", "--config", default="configs/cifar10_cpu.yaml")
    p.add_argument("--name", default=f"bench-main-{datetime.now():%Y%m%d-%H%M%S}")
    p.add_argument("--doc", default=str(REPO / "docs/benchmarks.md"))
    args, overrides = p.parse_known_args()
    cmd = [
        sys.executable,
        "-m",
        "cifar_dist",
        "train",
        "-c",
        args.config,
        f"--log.name={args.name}",
        "--train.progress=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        return proc.returncode
    run_dir = REPO / "runs" / args.name
    s = json.loads((run_dir / "summary.json").read_text())
    shown = " ".join(["cifar-dist train -c", args.config, *overrides])
    source = os.environ.get("CIFAR_DIST_SOURCE", "(data.dir store)")
    row = (
        f"| {datetime.now():%Y-%m-%d} | `{shown}` | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores | {source} | {s['val_acc'] * 100:.2f} | {s['wall_s'] / 60:.1f} | "
        f"{s['train_s'] / 60:.1f} | {s['samples_per_s']:.0f} | {s['git_sha'][:10]} |"
    )
    print(row)
    append_row(Path(args.doc), SECTION, HEADER, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
