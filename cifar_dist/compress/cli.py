"""`cifar-dist compress`: prune (+fine-tune), fuse, quantize and export a trained checkpoint.

Order of the steps: prune first (it changes the architecture and is followed by fine-tuning),
then fuse and INT8 on the (pruned) float model, then export the final float model (fused if
--fuse). Every variant is measured (size, batch-1 latency, validation accuracy) and the results
go to compress_report.json / compress_report.md in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cifar_dist.compress import CompressError
from cifar_dist.compress.report import VariantResult, markdown_table


def add_compress_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress",
        help="fuse / INT8 / prune / export a trained checkpoint and report the cost",
        description=__doc__,
    )
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (e.g. last.pt)")
    p.add_argument("--fuse", action="store_true", help="fold BatchNorm into the preceding convs")
    p.add_argument("--int8", action="store_true", help="INT8 post-training quantization (CPU)")
    p.add_argument(
        "--int8-mode",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="auto: static for CNNs, dynamic (linears only) for the ViT",
    )
    p.add_argument("--calib-batches", type=int, default=10, help="training batches to calibrate on")
    p.add_argument("--prune", type=float, default=0.0, metavar="AMOUNT", help="fraction in (0, 1)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="epochs after pruning (0 = none)")
    p.add_argument("--finetune-lr", type=float, default=None, help="peak LR (default optim.lr/10)")
    p.add_argument("--export", choices=["onnx", "torchscript", "both"], default=None)
    p.add_argument("--out", default=None, help="output dir (default <run dir>/compressed)")
    p.add_argument("--no-ema", action="store_true", help="use raw weights even if EMA exists")
    p.add_argument("--latency-iters", type=int, default=20, help="timed batch-1 calls per variant")
    p.add_argument("--eval-batches", type=int, default=0, help="validation batches (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch/ORT threads (0 = default)")
    return p


def load_trained(
    checkpoint: Path, overrides: list[str], use_ema: bool = True
) -> tuple[nn.Module, Any]:
    """The float model of a checkpoint (EMA weights if present) on the CPU, and its config."""
    from cifar_dist.config.load import config_from_dict, merge_trees, parse_overrides
    from cifar_dist.train.checkpoint import load_checkpoint
    from cifar_dist.train.trainer import build_model

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(merge_trees(ckpt["config"], parse_overrides(overrides)))
    # One CPU process; one optimiser step per loader batch when fine-tuning.
    cfg = replace(cfg, train=replace(cfg.train, device="cpu", grad_accum=1, channels_last=False))
    model = build_model(cfg, torch.device("cpu"))
    weights = ckpt["model"]
    if use_ema and ckpt.get("ema"):  # AveragedModel keys are "module.<name>" plus n_averaged
        weights = {
            k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"
        }
    model.load_state_dict(weights)
    return model.eval(), cfg


def default_out(checkpoint: Path) -> Path:
    run_dir = (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    )
    return run_dir / "compressed"


def _measure(name: str, model: nn.Module, ctx: dict[str, Any], **kw: Any) -> VariantResult:
    from cifar_dist.compress.report import accuracy, count_params, latency_ms, state_dict_bytes

    opts = ctx["opts"]
    ctx["log"](f"measuring {name} ...")
    res = accuracy(model, ctx["val"], ctx["num_classes"], opts.eval_batches)
    row = VariantResult(
        name,
        size_bytes=kw.pop("size_bytes", None) or state_dict_bytes(model),
        params=kw.pop("params", None) or count_params(model) or None,
        latency_ms_b1=latency_ms(model, ctx["one"], opts.latency_iters),
        acc=res["acc"],
        loss=res["loss"],
        **kw,
    )
    ctx["rows"].append(row)
    return row


def _export(model: nn.Module, real: Tensor, ctx: dict[str, Any]) -> dict[str, Any]:
    from cifar_dist.compress.export import (
        OrtModel,
        export_onnx,
        export_torchscript,
        load_torchscript,
        max_abs_diff,
    )
    from cifar_dist.compress.report import file_bytes

    opts, out, found = ctx["opts"], ctx["out"], {}
    rand = torch.randn(7, *real.shape[1:])
    if opts.export in ("onnx", "both"):
        path = export_onnx(model, out / "model.onnx", real[:2])
        ort = OrtModel(path, opts.threads)
        found["onnx"] = {
            "path": str(path),
            "random_b7_max_abs_diff": max_abs_diff(model, ort, rand),
        }
        found["onnx"]["real_max_abs_diff"] = max_abs_diff(model, ort, real)
        name = f"onnxruntime ({ctx['final_name']})"
        _measure(name, ort, ctx, size_bytes=file_bytes(path), artifact=path.name)
    if opts.export in ("torchscript", "both"):
        path = export_torchscript(model, out / "model.ts", real[:2])
        ts = load_torchscript(path)
        found["torchscript"] = {
            "path": str(path),
            "random_b7_max_abs_diff": max_abs_diff(model, ts, rand),
        }
        found["torchscript"]["real_max_abs_diff"] = max_abs_diff(model, ts, real)
    return found


def run_compress(opts: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from cifar_dist.compress.export import export_torchscript, save_float_model
    from cifar_dist.compress.report import count_params
    from cifar_dist.config.load import config_to_dict
    from cifar_dist.train.fit import build_data

    if not (opts.fuse or opts.int8 or opts.prune or opts.export):
        raise CompressError("compress: nothing to do (pass --fuse, --int8, --prune or --export)")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    checkpoint = Path(opts.checkpoint)
    model, cfg = load_trained(checkpoint, overrides, use_ema=not opts.no_ema)
    out = Path(opts.out) if opts.out else default_out(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, evals, _ = build_data(cfg, 0, 1)
    split = "val" if "val" in evals else next(iter(evals))
    real = next(iter(evals[split]))[0][:16]
    log = lambda msg: print(f"[compress] {msg}", flush=True)  # noqa: E731
    ctx: dict[str, Any] = {"opts": opts, "out": out, "log": log, "rows": [], "val": evals[split]}
    ctx.update(num_classes=cfg.data.num_classes, one=real[:1])
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": cfg.model.name,
        "eval_split": split,
    }
    config = config_to_dict(cfg)
    _measure("fp32", model, ctx, notes="baseline")
    widths: dict[str, int] = {}
    if opts.prune:
        from cifar_dist.compress.finetune import finetune
        from cifar_dist.compress.prune import prune_model

        model, layers = prune_model(model, opts.prune)
        widths = {name: w["after"] for name, w in layers.items()}
        report["prune"] = {"amount": opts.prune, "layers": layers, "finetune": []}
        if opts.finetune_epochs > 0:
            history = finetune(
                model, train_loader, cfg, opts.finetune_epochs, lr=opts.finetune_lr, log=log
            )
            report["prune"]["finetune"] = history
        path = save_float_model(out / "model_pruned.pt", model, config, widths)
        note = f"{len(layers)} convs at {opts.prune:g}, {opts.finetune_epochs} ft epochs"
        _measure("pruned", model, ctx, artifact=path.name, notes=note)
    final, prefix = model, "pruned+" if opts.prune else ""
    ctx["final_name"] = prefix.rstrip("+") or "fp32"
    if opts.fuse:
        from cifar_dist.compress.export import max_abs_diff
        from cifar_dist.compress.fuse import fuse_bn

        final, pairs = fuse_bn(model)
        diff = max_abs_diff(model, final, real)
        path = save_float_model(out / "model_fused.pt", final, config, widths, pairs)
        report["fuse"] = {"pairs": [list(p) for p in pairs], "real_max_abs_diff": diff}
        ctx["final_name"] = f"{prefix}fused"
        _measure(
            f"{prefix}fused", final, ctx, artifact=path.name, notes=f"{len(pairs)} conv+BN folded"
        )
    if opts.int8:
        from cifar_dist.compress.quantize import quantize_int8

        calib = (images for images, _ in train_loader)
        qmodel, mode = quantize_int8(model, calib, real[:2], opts.int8_mode, opts.calib_batches)
        path = export_torchscript(qmodel, out / "model_int8.ts", real[:2])
        from cifar_dist.compress.export import load_torchscript, max_abs_diff

        report["int8"] = {"mode": mode, "calib_batches": opts.calib_batches, "backend": "x86"}
        report["int8"]["torchscript_max_abs_diff"] = max_abs_diff(
            qmodel, load_torchscript(path), real
        )
        note = f"{mode}" + (f", {opts.calib_batches} calib batches" if mode == "static" else "")
        # Packed int8 weights are not nn.Parameters: report the float model's count.
        _measure(
            f"{prefix}int8", qmodel, ctx, artifact=path.name, notes=note, params=count_params(model)
        )
    if opts.export:
        report["export"] = _export(final, real, ctx)
    rows = ctx["rows"]
    report["variants"] = [r.to_dict() for r in rows]
    (out / "compress_report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(rows)
    (out / "compress_report.md").write_text(_markdown(report, table))
    print(table, flush=True)
    log(f"wrote {out}/compress_report.json and compress_report.md")
    return report


def _markdown(report: dict[str, Any], table: str) -> str:
    lines = [
        f"# Compression report: {report['model']}",
        "",
        f"Checkpoint: `{report['checkpoint']}`",
    ]
    lines += [
        f"Accuracy on the `{report['eval_split']}` split; latency at batch 1 on CPU.",
        "",
        table,
    ]
    if "fuse" in report:
        lines += [
            "",
            f"Fused vs unfused max |Δlogit| on real images: {report['fuse']['real_max_abs_diff']:.2e}",
        ]
    for fmt, res in report.get("export", {}).items():
        lines.append(
            f"{fmt}: max |Δlogit| vs PyTorch {res['random_b7_max_abs_diff']:.2e} (random, batch 7), "
            f"{res['real_max_abs_diff']:.2e} (real images)"
        )
    if "prune" in report:
        lines += ["", "Pruned layers (out-channels before -> after):", ""]
        lines += [
            f"- `{n}`: {w['before']} -> {w['after']}" for n, w in report["prune"]["layers"].items()
        ]
    return "\n".join(lines) + "\n"


def cmd_compress(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.config.schema import ConfigError
    from cifar_dist.data.errors import DataError
    from cifar_dist.train.checkpoint import CheckpointError

    try:
        run_compress(args, rest)
    except (CompressError, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"cifar-dist compress: error: {e}", file=sys.stderr)
        return 2
    return 0
