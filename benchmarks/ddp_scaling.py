"""Data-parallel scaling: measured samples/s for 1 vs N ranks, plus an analytic model for 8/64 GPUs.

    .venv/bin/python benchmarks/ddp_scaling.py                       # CPU, gloo, 1 vs 2 ranks
    .venv/bin/python benchmarks/ddp_scaling.py --device cuda --ranks 1 8   # GPUs, nccl

Every run trains the same model at the same *global* batch through `torchrun -m cifar_dist
train` for a fixed number of steps on synthetic data; train samples/s comes from summary.json
(timed inside the training loop, start-up excluded). Medians over --repeats runs.

The analytic model (printed as a markdown table) predicts a step on p workers as
    t(p) = t_compute(B / p) + (1 - overlap) * t_allreduce(p),
    t_allreduce(p) = 2 (p - 1) / p * G / bw + 2 (p - 1) * latency      (ring all-reduce)
with G = gradient bytes (fp32), t_compute(b) scaled linearly from the measured 1-rank step, and
efficiency = t(1) / (p * t(p)) * p = t_compute(B) / (p * t(p)). Assumptions are printed with it.
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


def run_once(ranks: int, args: argparse.Namespace, data: Path, runs: Path, tag: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "cifar_dist",
        "train",
        f"--data.dir={data}",
        "--data.synthetic=2000",
        "--data.val_size=100",
        f"--data.batch_size={args.batch}",
        "--data.num_workers=0",
        f"--model.name={args.model}",
        f"--train.max_steps={args.steps}",
        "--train.epochs=1",
        f"--train.device={args.device}",
        "--train.progress=false",
        "--log.plots=false",
        "--log.wandb.mode=disabled",
        f"--log.dir={runs}",
        f"--log.name={tag}",
    ]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return json.loads((runs / tag / "summary.json").read_text())


def allreduce_s(p: int, grad_bytes: float, bw: float, latency: float) -> float:
    return 0.0 if p == 1 else 2 * (p - 1) / p * grad_bytes / bw + 2 * (p - 1) * latency


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="airbench_net")
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--bw-gbs",
        type=float,
        nargs="+",
        default=[25.0, 100.0],
        help="all-reduce bus bandwidths to model, GB/s (25 ~ 200 Gb/s IB, 100 ~ NVLink)",
    )
    ap.add_argument("--latency-us", type=float, default=10.0)
    ap.add_argument(
        "--assume-img-s",
        type=float,
        nargs="*",
        default=[140000.0],
        help="one-GPU training rates to model too (140k img/s ~ airbench on an A100)",
    )
    ap.add_argument(
        "--model-only",
        type=float,
        nargs=2,
        metavar=("IMG_S", "PARAMS"),
        help="skip measuring: model a worker at IMG_S samples/s with PARAMS parameters",
    )
    ap.add_argument(
        "--overlap", type=float, default=0.5, help="fraction of comm hidden by backward"
    )
    args = ap.parse_args()

    if args.model_only:
        rate, n = args.model_only
        for label, r in {
            "given worker": rate,
            **{f"assumed GPU at {v:g} img/s": v for v in args.assume_img_s},
        }.items():
            model_table(label, r, n * 4.0, args)
        return 0
    measured: dict[int, float] = {}
    params = 0
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        for r in args.ranks:
            rates = []
            for i in range(args.repeats):
                s = run_once(r, args, data, runs, f"r{r}-{i}")
                rates.append(s["samples_per_s"])
                params = int(s["params"])
            measured[r] = statistics.median(rates)
            print(f"ranks={r}: median {measured[r]:.1f} samples/s over {rates}", flush=True)

    base = measured[args.ranks[0]]
    print(
        f"\nMeasured ({args.device}, {args.model}, global batch {args.batch}, {args.steps} steps, "
        f"median of {args.repeats}):\n"
    )
    print("| ranks | samples/s | speed-up vs 1 | efficiency |\n|---|---|---|---|")
    for r, v in measured.items():
        print(f"| {r} | {v:.1f} | {v / base:.2f}x | {v / base / r * 100:.0f}% |")
    workers = {f"measured 1-rank {args.device}": base}
    workers.update({f"assumed GPU at {v:g} img/s": v for v in args.assume_img_s})
    for label, rate in workers.items():
        model_table(label, rate, params * 4.0, args)
    return 0


def model_table(label: str, img_s: float, grad_bytes: float, args: argparse.Namespace) -> None:
    t1 = args.batch / img_s  # seconds per step on one worker, whole global batch
    print(
        f"\nAnalytic model, worker = {label}: G = {grad_bytes / 1e6:.1f} MB fp32 gradients, "
        f"t_compute(B={args.batch}) = {t1 * 1e3:.2f} ms, overlap {args.overlap:.0%}, latency "
        f"{args.latency_us:.0f} us per ring hop, compute scales as 1/p (fixed global batch).\n"
    )
    print("| workers | bus bw (GB/s) | compute (ms) | all-reduce (ms) | step (ms) | efficiency |")
    print("|---|---|---|---|---|---|")
    for p in (8, 64):
        for bw in args.bw_gbs:
            comp = t1 / p
            comm = allreduce_s(p, grad_bytes, bw * 1e9, args.latency_us * 1e-6)
            step = comp + (1 - args.overlap) * comm
            print(
                f"| {p} | {bw:g} | {comp * 1e3:.3f} | {comm * 1e3:.3f} | {step * 1e3:.3f} | "
                f"{comp / step * 100:.0f}% |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
