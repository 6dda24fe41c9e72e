"""Training-loader throughput: images/s for one epoch of train batches, output on the device.

Same run, same machine, same split: torchvision DataLoader (0 and 2 workers), the
device-resident loader, FFCV when importable, and the memcpy ceiling for the same bytes. Every
loader yields batches of 512 with random crop (zero padding 4) + horizontal flip + normalise,
float32 NCHW on the device. Each loader runs `--warmup` untimed epochs (worker start-up, FFCV's
numba compilation), then `--epochs` timed ones; the table reports their median.

    python benchmarks/loader.py [--data.dir=data] [--device cpu|cuda] [--epochs 3] [--json out.json]

Prints a markdown table (for docs/benchmarks.md); the ratio column is against the DataLoader
with 2 workers (the default `data.num_workers`). `--synthetic N` uses N random images instead of
the array store. Run FFCV's row with an interpreter where ffcv is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from cifar_dist.config.schema import DataConfig  # noqa: E402
from cifar_dist.data.arrays import ArraySplit, load_splits  # noqa: E402
from cifar_dist.data.device_loader import build_device_loaders  # noqa: E402
from cifar_dist.data.loaders import build_loaders  # noqa: E402

BASELINE = "torch DataLoader, 2 workers"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data.dir", dest="data_dir", default="", help="array store dir (data.dir)")
    p.add_argument("--synthetic", type=int, default=0, help="N random images instead of the store")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--loaders", default="torch0,torch2,device,ffcv,memcpy")
    p.add_argument("--beton-dir", default="/tmp/cifar-dist-bench-betons", help="FFCV files")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def train_split(args: argparse.Namespace) -> ArraySplit:
    if args.synthetic:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.synthetic, 32, 32, 3), dtype=np.uint8)
        return ArraySplit(images, rng.integers(0, 10, args.synthetic).astype(np.int64))
    cfg = DataConfig(dir=args.data_dir, val_size=0, download=False)
    return load_splits(cfg)["train"]


def epoch_rate(
    batches: Callable[[int], Iterable],
    n_images: int,
    device: torch.device,
    warmup: int,
    epochs: int,
) -> list[float]:
    """Images/s of each timed epoch; batches(epoch) iterates one epoch of (images, labels)."""
    rates = []
    for e in range(warmup + epochs):
        t0 = time.perf_counter()
        for images, labels in batches(e):
            images = images.to(device, non_blocking=True)  # a no-op for the device loaders
            labels = labels.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if e >= warmup:
            rates.append(n_images / (time.perf_counter() - t0))
    return rates


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def make_loader(
    kind: str, split: ArraySplit, args: argparse.Namespace, device: torch.device
) -> tuple[Batches, int] | None:
    """(epoch -> batches, images per epoch), or None when the kind cannot run here."""
    workers = {"torch0": 0, "torch2": 2, "ffcv": 2}.get(kind, 0)  # ffcv: threads
    cfg = DataConfig(
        batch_size=args.batch,
        crop_padding=4,
        flip=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    common: dict[str, Any] = dict(
        micro_batch=args.batch, eval_batch=args.batch, rank=0, world_size=1, seed=0, num_classes=10
    )
    if kind.startswith("torch"):
        loader, _ = build_loaders(cfg, {"train": split}, **common)
    elif kind == "device":
        loader, _ = build_device_loaders(cfg, {"train": split}, device=device, **common)
    elif kind == "ffcv":
        try:
            from cifar_dist.data.ffcv_loader import build_ffcv_loaders
        except ImportError:
            return None
        try:
            loader, _ = build_ffcv_loaders(
                cfg, {"train": split}, device=device, **common, beton_dir=Path(args.beton_dir)
            )
        except ImportError as e:
            print(f"ffcv row skipped: {e}", file=sys.stderr)
            return None
    else:
        raise ValueError(kind)

    def batches(e: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        loader.set_epoch(e)
        return loader

    return batches, len(loader) * args.batch


def memcpy_rate(nbytes: int, n_images: int, device: torch.device, reps: int) -> float:
    """Images/s if an epoch cost only copying `nbytes` once within the device's memory."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    split = train_split(args)
    n = len(split.labels) // args.batch * args.batch
    names = {
        "torch0": "torch DataLoader, 0 workers",
        "torch2": BASELINE,
        "device": "device-resident loader",
        "ffcv": "FFCV Loader, 2 threads",
    }
    rows: list[dict[str, Any]] = []
    for kind in args.loaders.split(","):
        if kind == "memcpy":
            for label, per_image in (("uint8", 3072), ("float32", 3 * 32 * 32 * 4)):
                rate = memcpy_rate(n * per_image, n, device, args.epochs)
                rows.append({"loader": f"memcpy ceiling ({label} bytes)", "rates": [rate]})
            continue
        made = make_loader(kind, split, args, device)
        if made is None:
            continue
        batches, per_epoch = made
        rates = epoch_rate(batches, per_epoch, device, args.warmup, args.epochs)
        rows.append({"loader": names[kind], "rates": rates})
        print(f"{names[kind]}: {[round(r) for r in rates]} img/s", file=sys.stderr, flush=True)
    base = next((statistics.median(r["rates"]) for r in rows if r["loader"] == BASELINE), None)
    print(
        f"\n{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, {n} images/epoch, batch {args.batch}, median of "
        f"{args.epochs} epochs after {args.warmup} warm-up\n"
    )
    print(f"| loader | images/s (median) | epoch (s) | x {BASELINE} |\n|---|---|---|---|")
    for r in rows:
        med = statistics.median(r["rates"])
        ratio = f"{med / base:.2f}" if base else "-"
        print(f"| {r['loader']} | {med:,.0f} | {n / med:.3f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
