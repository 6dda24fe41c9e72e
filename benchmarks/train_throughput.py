"""Training-step throughput of a model under precision / memory-format / compile variants.

    .venv/bin/python benchmarks/train_throughput.py --model airbench_net --batch 256 --repeats 3

One step = forward (under autocast when bf16), cross-entropy, backward, SGD step, on synthetic
input already on the device, so the number is the model's ceiling without data loading. Each
variant: `--warmup` steps (compilation included, reported), then `--steps` timed steps, median
of `--repeats`; variants run back to back so they share the machine's state. Prints a Markdown
table for docs/benchmarks.md. On CUDA the timing synchronises the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifar_dist.models import create_model  # noqa: E402

VARIANTS = {  # name: (amp, channels_last, compile)
    "fp32": (False, False, False),
    "fp32-cl": (False, True, False),
    "bf16": (True, False, False),
    "bf16-cl": (True, True, False),
    "bf16-cl-compile": (True, True, True),
}


def measure(
    model_name: str, variant: str, batch: int, warmup: int, steps: int, dev: str
) -> tuple[float, float]:
    """(images/s over the timed steps, warm-up seconds)."""
    amp, cl, comp = VARIANTS[variant]
    device = torch.device(dev)
    torch.manual_seed(0)
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = create_model(model_name).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    fwd = torch.compile(model) if comp else model
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fwd(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t0), warm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="airbench_net")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads")
    print("| variant | img/s (median) | runs | warm-up s (first run) |\n|---|---|---|---|")
    for v in args.variants:
        runs = [
            measure(args.model, v, args.batch, args.warmup, args.steps, args.device)
            for _ in range(args.repeats)
        ]
        rates = [r for r, _ in runs]
        shown = "/".join(f"{r:.0f}" for r in rates)
        print(f"| {v} | {statistics.median(rates):,.0f} | {shown} | {runs[0][1]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
