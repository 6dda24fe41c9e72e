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
import torch.nn.functional as F
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


@torch.no_grad()
def accuracy(
    model: Callable[[Tensor], Tensor], loader: Iterable[Any], max_batches: int = 0
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on `loader` (first `max_batches` batches if > 0).

    A plain loop rather than train.metrics.evaluate: that one reads the dtype from the model's
    first parameter, and an ONNX Runtime session or a packed INT8 model may have none.
    """
    if isinstance(model, nn.Module):
        model.eval()
    batches = itertools.islice(loader, max_batches) if max_batches > 0 else loader
    correct, loss_sum, seen = 0, 0.0, 0
    for images, labels in batches:
        logits = model(images.float()).float()
        hard = labels if labels.ndim == 1 else labels.argmax(dim=1)
        correct += int((logits.argmax(dim=1) == hard).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        seen += len(labels)
    if seen == 0:
        raise ValueError("accuracy: the loader yielded no batches")
    return {"acc": correct / seen, "loss": loss_sum / seen}


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


def markdown_report(report: dict[str, Any], rows: Sequence[VariantResult]) -> str:
    """compress_report.md: the table plus the checks and the pruned layers."""
    lines = [
        f"# Compression report: {report['model']}",
        "",
        f"Checkpoint: `{report['checkpoint']}`",
    ]
    lines += [f"Accuracy on the `{report['eval_split']}` split; latency at batch 1 on CPU.", ""]
    lines += [markdown_table(rows), ""]
    if "fuse" in report:
        diff = report["fuse"]["real_max_abs_diff"]
        lines.append(f"- fused vs unfused: max |Δlogit| {diff:.2e} on real images")
    if "int8" in report:
        diff = report["int8"]["torchscript_max_abs_diff"]
        lines.append(f"- int8 TorchScript file vs int8 model: max |Δlogit| {diff:.2e}")
    for kind, res in report.get("export", {}).items():
        lines.append(
            f"- {kind} vs PyTorch: max |Δlogit| {res['random_b7_max_abs_diff']:.2e} (random, "
            f"batch 7), {res['real_max_abs_diff']:.2e} (real images)"
        )
    if "prune" in report:
        lines += ["", "Pruned layers (out-channels before -> after):", ""]
        for name, w in report["prune"]["layers"].items():
            lines.append(f"- `{name}`: {w['before']} -> {w['after']}")
    return "\n".join(lines) + "\n"
