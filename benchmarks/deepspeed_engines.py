"""DeepSpeed engines against torch DDP: training samples/s and per-rank model-state memory.

    .venv/bin/python benchmarks/deepspeed_engines.py                      # CPU, 2 gloo ranks
    .venv/bin/python benchmarks/deepspeed_engines.py --device cuda --ranks 8 --model resnet18

Every variant trains the same model at the same global batch for --steps optimiser steps
through `torchrun -m cifar_dist train` (synthetic data unless --data-dir is given); samples/s
is read from summary.json (timed inside the training loop, start-up excluded), median over
--repeats runs. The final loss is printed too: every variant computes the same training, so
it should agree to float32 noise (ZeRO-3 and the pipeline included).

Memory is the analytic per-rank model state of ZeRO (Rajbhandari et al., 2020) for fp32
weights and SGD with momentum: weights W, gradients G and momentum M of 4 bytes per
parameter each; ZeRO-1 divides M by the data-parallel degree, ZeRO-2 also G, ZeRO-3 also W;
the pipeline divides everything by its stages. (Activations and buffers are not included.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "torch DDP": [],
    "DeepSpeed ZeRO-0": ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=0"],
    "DeepSpeed ZeRO-1": ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=1"],
    "DeepSpeed ZeRO-2": ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=2"],
    "DeepSpeed ZeRO-3": ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=3"],
    "DeepSpeed pipeline pp=2 (ZeRO-1)": [
        "--parallel.engine=deepspeed",
        "--deepspeed.zero_stage=1",
        "--parallel.pp=2",
    ],
}


def run_once(flags: list[str], args: argparse.Namespace, data: Path, runs: Path, tag: str) -> dict:
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc-per-node={args.ranks}",
        *("-m", "cifar_dist", "train"),
        f"--data.dir={data}",
        "--data.val_size=100" if not args.data_dir else "--data.val_size=5000",
        f"--data.batch_size={args.batch}",
        f"--data.num_workers={args.workers}",
        f"--model.name={args.model}",
        "--model.norm=group",  # the pipeline's micro-batches need batch-independent norms
        f"--train.max_steps={args.steps}",
        f"--train.grad_accum={args.accum}",
        "--train.epochs=1",
        f"--train.device={args.device}",
        "--train.progress=false",
        "--log.plots=false",
        "--log.wandb.mode=disabled",
        "--log.every_steps=1",
        f"--log.dir={runs}",
        f"--log.name={tag}",
        *([] if args.data_dir else ["--data.synthetic=4000"]),
        *flags,
    ]
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{tag} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((runs / tag / "summary.json").read_text())
    steps = (runs / tag / "steps.jsonl").read_text().splitlines()
    summary["last_loss"] = json.loads(steps[-1])["step/loss"] if steps else float("nan")
    return summary


def state_mib(name: str, params: int, dp: int, pp: int) -> float:
    w = g = m = 4.0 * params
    if "pipeline" in name:
        w, g, m = w / pp, g / pp, m / pp / dp  # ZeRO-1 within each stage's replicas
    elif "ZeRO-1" in name:
        m /= dp
    elif "ZeRO-2" in name:
        g, m = g / dp, m / dp
    elif "ZeRO-3" in name:
        w, g, m = w / dp, g / dp, m / dp
    return (w + g + m) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="airbench_net")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step (pipeline: >= pp)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--data-dir", default="", help="real data (e.g. /work/main/data); else synthetic"
    )
    p.add_argument("--only", nargs="*", help="variant name substrings to run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        runs = Path(tmp) / "runs"
        rows = []
        for name, flags in VARIANTS.items():
            if args.only and not any(s in name for s in args.only):
                continue
            res = [
                run_once(flags, args, data, runs, f"v{len(rows)}_{i}") for i in range(args.repeats)
            ]
            pp = 2 if "pp=2" in name else 1
            rate = statistics.median(r["samples_per_s"] for r in res)
            mib = state_mib(name, int(res[0]["params"]), args.ranks // pp, pp)
            rows.append((name, rate, mib, res[0]["last_loss"]))
            print(f"{name}: {rate:.1f} samples/s", file=sys.stderr, flush=True)
    base = rows[0][1] if rows else 1.0
    print(
        f"\n{args.model}, {args.ranks} ranks ({args.device}), global batch {args.batch}, "
        f"{args.accum} micro-batches, {args.steps} steps, median of {args.repeats}\n"
    )
    print("| variant | samples/s | vs first | model state / rank (MiB) | loss at last step |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, mib, loss in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {mib:.1f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
