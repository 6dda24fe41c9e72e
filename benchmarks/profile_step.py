"""Where a training step's time goes: torch.profiler over a few steps, top ops as a Markdown table.

    .venv/bin/python benchmarks/profile_step.py --model airbench_net --batch 1024 --steps 3

The step is the fast recipe's (bf16 autocast + channels_last unless --fp32 / --nchw): forward,
cross-entropy, backward, Nesterov SGD step, on synthetic input already on the device, after
--warmup unprofiled steps (oneDNN picks its kernels on the first calls). Ops are ranked by self
CPU time (CUDA time on a GPU); the table goes to stdout for docs/fast_recipe.md. The profiler
adds a little overhead per op, so read the shares, not the absolute milliseconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifar_dist.models import create_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="airbench_net")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--nchw", action="store_true", help="contiguous (NCHW) activations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    torch.manual_seed(0)
    model = create_model(args.model).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.85, nesterov=True)
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    on_gpu = device.type == "cuda"
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    self_time = (
        (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    )
    total = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    unit = "GPU" if on_gpu else "CPU"
    print(f"| op | calls/step | self {unit} ms/step | share |")
    print("|---|---|---|---|")
    for e in events[: args.top]:
        ms = self_time(e) / 1000 / args.steps
        share = 100 * self_time(e) / total
        print(f"| `{e.key}` | {e.count // args.steps} | {ms:.1f} | {share:.1f}% |")
    print(f"| all ops | | {total / 1000 / args.steps:.1f} | 100% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
