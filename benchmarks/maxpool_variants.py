"""airbench's 2x2 max-pool, forward + backward, against hand-written equivalents.

    .venv/bin/python benchmarks/maxpool_variants.py --threads 2

Max-pooling is ~17% of an airbench_net training step on CPU (benchmarks/profile_step.py), so
this asks whether a pool written from tensor ops beats `F.max_pool2d` on the shapes of the
three conv groups at batch 1024 (bf16, channels_last, as the CPU recipe trains). The variants
give the same forward values (odd sides are floored like max_pool2d); on ties their backward
splits the gradient where max_pool2d picks one input. Prints a Markdown table of median ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# airbench_net at batch 1024: the input of each group's pool (after its first conv).
SHAPES = ((1024, 64, 31, 31), (1024, 256, 15, 15), (1024, 256, 7, 7))


def _even(x: Tensor) -> Tensor:
    return x[:, :, : x.shape[2] // 2 * 2, : x.shape[3] // 2 * 2]


def amax_view(x: Tensor) -> Tensor:
    x = _even(x)
    h, w = x.shape[2] // 2, x.shape[3] // 2
    return x.unflatten(3, (w, 2)).unflatten(2, (h, 2)).amax((3, 5))


def four_slices(x: Tensor) -> Tensor:
    x = _even(x)
    top = torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2])
    return torch.maximum(top, torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


def rows_then_cols(x: Tensor) -> Tensor:
    x = _even(x)
    x = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(x[:, :, :, 0::2], x[:, :, :, 1::2])


VARIANTS: dict[str, Callable[[Tensor], Tensor]] = {
    "F.max_pool2d": lambda x: F.max_pool2d(x, 2),
    "amax over a view": amax_view,
    "max of 4 strided slices": four_slices,
    "rows then columns": rows_then_cols,
}


def time_fwd_bwd(fn: Callable[[Tensor], Tensor], base: Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms oneDNN / the allocator
        x = base.clone().requires_grad_()
        t0 = time.perf_counter()
        y = fn(x)
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1024)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| shape (N, C, H, W) | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for shape in SHAPES:
        shape = (args.batch, *shape[1:])
        base = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        reference = F.max_pool2d(base, 2)
        cells = []
        for name, fn in VARIANTS.items():
            if not torch.equal(fn(base), reference):
                raise SystemExit(f"{name} differs from F.max_pool2d on {shape}")
            cells.append(f"{time_fwd_bwd(fn, base, args.repeats):.1f}")
        print(f"| {shape} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
