"""CPU inference benchmark of a trained checkpoint: fp32, fused, INT8, pruned and ONNX Runtime.

For each variant: model size, batch-1 latency (median ms), batch-256 throughput (images/s) and
accuracy on the checkpoint's validation split (the split its config carves from the training
data; `--data.dir=...` and other `--section.key=value` overrides apply on top of that config).
Prints a markdown table (for docs/benchmarks.md) and optionally writes JSON.

    python benchmarks/inference.py --checkpoint runs/X/checkpoints/last.pt --data.dir=data \
        [--pruned runs/X/compressed/model_pruned.pt] [--threads 2] [--json bench.json]

Without --pruned the "pruned" row prunes on the fly (--prune-amount) with no fine-tuning, and
says so: its accuracy is then a lower bound, not what `cifar-dist compress` delivers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from cifar_dist.compress import CompressError  # noqa: E402
from cifar_dist.compress.cli import load_trained  # noqa: E402
from cifar_dist.compress.report import (  # noqa: E402
    VariantResult,
    accuracy,
    count_params,
    file_bytes,
    latency_ms,
    markdown_table,
    state_dict_bytes,
    throughput,
)

VARIANTS = ("fp32", "fused", "int8", "pruned", "onnxruntime")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--pruned", default=None, help="model_pruned.pt written by cifar-dist compress")
    p.add_argument("--prune-amount", type=float, default=0.4, help="on-the-fly pruning amount")
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch/ORT threads (0 = default)")
    p.add_argument("--latency-iters", type=int, default=50)
    p.add_argument("--throughput-batch", type=int, default=256)
    p.add_argument("--throughput-iters", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=0, help="validation batches (0 = all)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_known_args(argv)


def build_variant(
    name: str, model: nn.Module, opts: argparse.Namespace, ctx: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """The model for variant `name` and VariantResult fields known at build time."""
    if name == "fp32":
        return model, {}
    if name == "fused":
        from cifar_dist.compress.fuse import fuse_bn

        fused, pairs = fuse_bn(model)
        return fused, {"notes": f"{len(pairs)} conv+BN folded"}
    if name == "int8":
        from cifar_dist.compress.quantize import quantize_int8

        calib = (images for images, _ in ctx["train"])
        q, mode = quantize_int8(model, calib, ctx["images"][:2], "auto", opts.calib_batches)
        return q, {"notes": f"{mode} (x86)", "params": count_params(model)}
    if name == "pruned":
        if opts.pruned:
            from cifar_dist.compress.export import load_float_model

            return load_float_model(Path(opts.pruned)), {"notes": f"from {Path(opts.pruned).name}"}
        from cifar_dist.compress.prune import prune_model

        pruned, layers = prune_model(model, opts.prune_amount)
        return pruned, {"notes": f"{len(layers)} convs at {opts.prune_amount:g}, no fine-tune"}
    if name == "onnxruntime":
        from cifar_dist.compress.export import OrtModel, export_onnx
        from cifar_dist.compress.fuse import fuse_bn

        try:  # ORT folds BN itself; exporting the fused model just makes the file smaller
            source, what = fuse_bn(model)[0], "fused"
        except CompressError:
            source, what = model, "fp32"
        path = export_onnx(source, Path(ctx["tmp"]) / "model.onnx", ctx["images"][:2])
        return OrtModel(path, opts.threads), {"size_bytes": file_bytes(path), "notes": what}
    raise ValueError(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")


def measure(
    name: str,
    model: nn.Module,
    fields: dict[str, Any],
    opts: argparse.Namespace,
    ctx: dict[str, Any],
) -> VariantResult:
    big: Tensor = ctx["images"].repeat(-(-opts.throughput_batch // len(ctx["images"])), 1, 1, 1)
    res = accuracy(model, ctx["val"], opts.eval_batches)
    return VariantResult(
        name,
        size_bytes=fields.pop("size_bytes", None) or state_dict_bytes(model),
        params=fields.pop("params", None) or count_params(model) or None,
        latency_ms_b1=latency_ms(model, ctx["images"][:1], opts.latency_iters),
        throughput_ips=throughput(model, big[: opts.throughput_batch], opts.throughput_iters),
        acc=res["acc"],
        loss=res["loss"],
        **fields,
    )


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    from cifar_dist.train.fit import build_data

    opts, overrides = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    names = [v.strip() for v in opts.variants.split(",") if v.strip()]
    model, cfg = load_trained(Path(opts.checkpoint), overrides, use_ema=not opts.no_ema)
    train, evals, _ = build_data(cfg, 0, 1)
    split = "val" if "val" in evals else next(iter(evals))
    ctx: dict[str, Any] = {"train": train, "val": evals[split]}
    ctx["images"] = next(iter(evals[split]))[0][:64]
    rows: list[VariantResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx["tmp"] = tmp
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                variant, fields = build_variant(name, model, opts, ctx)
            except CompressError as e:  # e.g. nothing to fuse in a ViT: keep the other rows
                rows.append(VariantResult(name, notes=f"skipped: {e}"))
                continue
            rows.append(measure(name, variant, fields, opts, ctx))
    print(
        f"\n{cfg.model.name} on `{split}` ({cfg.data.dataset}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_name()}; "
        f"latency at batch 1, throughput at batch {opts.throughput_batch}\n"
    )
    print(markdown_table(rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
