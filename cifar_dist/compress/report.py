"""Measure a model variant (size, latency, throughput, accuracy) and print the results as markdown.

Sizes are the bytes of `torch.save(model.state_dict())` for PyTorch variants (the INT8 state
dict holds the packed int8 weights and their scales) and the file size for exported files, so
the numbers compare what each variant has to ship. Latency is the median of timed calls after
warm-up, in milliseconds; throughput is images per second at a large batch.
"""

from __future__ import annotations

import io
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def file_bytes(path: Path) -> int:
    """Size of a file plus any ONNX external-data file written next to it."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def count_params(model: nn.Module) -> int:
    """Float parameters; 0 for models whose weights are packed (INT8) or not in torch (ORT)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_ms(
    model: Callable[[Tensor], Tensor], images: Tensor, iters: int, warmup: int = 3
) -> float:
    """Median wall time of one call on `images`, in milliseconds."""
    for _ in range(warmup):  # first calls pick kernels, allocate, fill caches
        model(images)
    times = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def throughput(model: Callable[[Tensor], Tensor], images: Tensor, iters: int) -> float:
    """Images per second at batch `images.shape[0]` (median call time)."""
    return images.shape[0] / (latency_ms(model, images, iters, warmup=1) / 1000.0)


def accuracy(
    model: nn.Module, loader: Iterable[Any], num_classes: int, max_batches: int = 0
) -> dict[str, float]:
    """Top-1 accuracy and loss of `model` on `loader` (first `max_batches` batches if > 0)."""
    from cifar_dist.train.metrics import evaluate

    batches = itertools.islice(loader, max_batches) if max_batches > 0 else loader
    res = evaluate(model, batches, num_classes, torch.device("cpu"))
    return {"acc": float(res["acc"]), "loss": float(res["loss"])}


@dataclass
class VariantResult:
    """One row of the report; None where a measurement was not taken."""

    variant: str
    size_bytes: int | None = None
    params: int | None = None
    latency_ms_b1: float | None = None
    throughput_ips: float | None = None
    acc: float | None = None
    loss: float | None = None
    artifact: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: Sequence[VariantResult], baseline: str = "fp32") -> str:
    """A markdown table of `rows`; size ratio and accuracy change are relative to `baseline`."""
    base = next((r for r in rows if r.variant == baseline), None)
    has_tput = any(r.throughput_ips is not None for r in rows)
    head = ["variant", "size (MB)", f"{baseline} size / size", "params", "latency b1 (ms)"]
    head += ["throughput (img/s)"] if has_tput else []
    head += ["acc", "Δ acc", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = (
            f"{base.size_bytes / r.size_bytes:.2f}x"
            if base and base.size_bytes and r.size_bytes and r is not base
            else ""
        )
        delta = (
            f"{100 * (r.acc - base.acc):+.2f} pt"
            if base and base.acc is not None and r.acc is not None and r is not base
            else ""
        )
        size_mb = None if r.size_bytes is None else r.size_bytes / 2**20
        cells = [r.variant, _fmt(size_mb, ".2f"), ratio, _fmt(r.params, ",")]
        cells += [_fmt(r.latency_ms_b1, ".2f")]
        cells += [_fmt(r.throughput_ips, ".1f")] if has_tput else []
        cells += [_fmt(None if r.acc is None else 100 * r.acc, ".2f"), delta, r.notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
