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
    from cifar_dist.train.common import build_model

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


class _Run:
    """One compress invocation: the data, the output dir, and the report being filled in."""

    def __init__(self, opts: argparse.Namespace, cfg: Any, checkpoint: Path) -> None:
        from cifar_dist.config.load import config_to_dict
        from cifar_dist.train.fit import build_data

        self.opts, self.cfg, self.config = opts, cfg, config_to_dict(cfg)
        self.out = Path(opts.out) if opts.out else default_out(checkpoint)
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_loader, evals, _ = build_data(cfg, 0, 1)
        self.split = "val" if "val" in evals else next(iter(evals))
        self.val = evals[self.split]
        self.real: Tensor = next(iter(self.val))[0][:16]  # real images for the output checks
        self.rows: list[VariantResult] = []
        self.report: dict[str, Any] = {"checkpoint": str(checkpoint), "model": cfg.model.name}
        self.report["eval_split"] = self.split

    @staticmethod
    def log(msg: str) -> None:
        print(f"[compress] {msg}", flush=True)

    def measure(self, name: str, model: nn.Module, **fields: Any) -> None:
        from cifar_dist.compress.report import accuracy, count_params, latency_ms, state_dict_bytes

        self.log(f"measuring {name} ...")
        res = accuracy(model, self.val, self.opts.eval_batches)
        fields.setdefault("size_bytes", state_dict_bytes(model))
        fields.setdefault("params", count_params(model) or None)
        latency = latency_ms(model, self.real[:1], self.opts.latency_iters)
        row = VariantResult(name, latency_ms_b1=latency, acc=res["acc"], loss=res["loss"], **fields)
        self.rows.append(row)

    def prune(self, model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
        from cifar_dist.compress.export import save_float_model
        from cifar_dist.compress.finetune import finetune
        from cifar_dist.compress.prune import prune_model

        opts = self.opts
        model, layers = prune_model(model, opts.prune)
        widths = {name: w["after"] for name, w in layers.items()}
        self.report["prune"] = {"amount": opts.prune, "layers": layers, "finetune": []}
        if opts.finetune_epochs > 0:
            history = finetune(
                model, self.train_loader, self.cfg, opts.finetune_epochs, lr=opts.finetune_lr,
                log=self.log,
            )  # fmt: skip
            self.report["prune"]["finetune"] = history
        path = save_float_model(self.out / "model_pruned.pt", model, self.config, widths)
        note = f"{len(layers)} convs at {opts.prune:g}, {opts.finetune_epochs} ft epochs"
        self.measure("pruned", model, artifact=path.name, notes=note)
        return model, widths

    def fuse(self, model: nn.Module, name: str, widths: dict[str, int]) -> nn.Module:
        from cifar_dist.compress.export import max_abs_diff, save_float_model
        from cifar_dist.compress.fuse import fuse_bn

        fused, pairs = fuse_bn(model)
        diff = max_abs_diff(model, fused, self.real)
        path = save_float_model(self.out / "model_fused.pt", fused, self.config, widths, pairs)
        self.report["fuse"] = {"pairs": [list(p) for p in pairs], "real_max_abs_diff": diff}
        self.measure(name, fused, artifact=path.name, notes=f"{len(pairs)} conv+BN folded")
        return fused

    def int8(self, model: nn.Module, name: str) -> None:
        from cifar_dist.compress.export import export_torchscript, load_torchscript, max_abs_diff
        from cifar_dist.compress.quantize import quantize_int8
        from cifar_dist.compress.report import count_params

        opts, example = self.opts, self.real[:2]
        calib = (images for images, _ in self.train_loader)
        qmodel, mode = quantize_int8(model, calib, example, opts.int8_mode, opts.calib_batches)
        path = export_torchscript(qmodel, self.out / "model_int8.ts", example)
        diff = max_abs_diff(qmodel, load_torchscript(path), self.real)
        self.report["int8"] = {"mode": mode, "calib_batches": opts.calib_batches, "backend": "x86"}
        self.report["int8"]["torchscript_max_abs_diff"] = diff
        note = mode + (f", {opts.calib_batches} calib batches" if mode == "static" else "")
        # Packed int8 weights are not nn.Parameters: report the float model's count.
        self.measure(name, qmodel, artifact=path.name, notes=note, params=count_params(model))

    def export(self, model: nn.Module, name: str) -> None:
        from cifar_dist.compress import export as ex
        from cifar_dist.compress.report import file_bytes

        fmt, found = self.opts.export, {}
        rand = torch.randn(7, *self.real.shape[1:])  # a batch size the export never saw
        if fmt in ("onnx", "both"):
            path = ex.export_onnx(model, self.out / "model.onnx", self.real[:2])
            found["onnx"] = ort = ex.OrtModel(path, self.opts.threads)
            self.measure(
                f"onnxruntime ({name})", ort, size_bytes=file_bytes(path), artifact=path.name
            )
        if fmt in ("torchscript", "both"):
            path = ex.export_torchscript(model, self.out / "model.ts", self.real[:2])
            found["torchscript"] = ex.load_torchscript(path)
        self.report["export"] = {
            kind: {
                "random_b7_max_abs_diff": ex.max_abs_diff(model, exported, rand),
                "real_max_abs_diff": ex.max_abs_diff(model, exported, self.real),
            }
            for kind, exported in found.items()
        }

    def finish(self) -> None:
        from cifar_dist.compress.report import markdown_report

        self.report["variants"] = [r.to_dict() for r in self.rows]
        (self.out / "compress_report.json").write_text(json.dumps(self.report, indent=2))
        (self.out / "compress_report.md").write_text(markdown_report(self.report, self.rows))
        print(markdown_table(self.rows), flush=True)
        self.log(f"wrote {self.out}/compress_report.json and compress_report.md")


def _preflight(model: nn.Module, opts: argparse.Namespace) -> None:
    """Refuse an impossible request before minutes of measuring and fine-tuning."""
    from cifar_dist.compress.fuse import fusable_pairs
    from cifar_dist.compress.prune import prune_sites
    from cifar_dist.compress.quantize import default_mode

    if opts.prune:
        prune_sites(model)
        if not 0.0 < opts.prune < 1.0:
            raise CompressError(f"prune: amount must be in (0, 1), got {opts.prune}")
    if opts.fuse:
        fusable_pairs(model)
    if opts.int8 and opts.int8_mode == "static" and default_mode(model) != "static":
        raise CompressError(
            f"int8: static quantization does not support {type(model).__name__} "
            "(LayerNorm/attention have no x86 static int8 kernels); use --int8-mode dynamic"
        )


def run_compress(opts: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Prune (+fine-tune), fuse, quantize and export as asked; returns the report dict."""
    if not (opts.fuse or opts.int8 or opts.prune or opts.export):
        raise CompressError("compress: nothing to do (pass --fuse, --int8, --prune or --export)")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    checkpoint = Path(opts.checkpoint)
    model, cfg = load_trained(checkpoint, overrides, use_ema=not opts.no_ema)
    _preflight(model, opts)
    run = _Run(opts, cfg, checkpoint)
    run.measure("fp32", model, notes="baseline")
    widths: dict[str, int] = {}
    if opts.prune:
        model, widths = run.prune(model)
    prefix = "pruned+" if opts.prune else ""
    final, final_name = model, "pruned" if opts.prune else "fp32"
    if opts.fuse:
        final_name = f"{prefix}fused"
        final = run.fuse(model, final_name, widths)
    if opts.int8:  # from the unfused model: prepare_fx fuses conv+BN+ReLU itself
        run.int8(model, f"{prefix}int8")
    if opts.export:
        run.export(final, final_name)
    run.finish()
    from cifar_dist.compress.wandb_log import log_compressed

    log_compressed(run.out, run.rows, cfg, run.report)
    return run.report


def cmd_compress(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.config.extras import require
    from cifar_dist.config.schema import ConfigError
    from cifar_dist.data.errors import DataError
    from cifar_dist.train.checkpoint import CheckpointError

    try:
        if args.export in ("onnx", "both"):  # before loading and evaluating anything
            for module in ("onnx", "onnxscript", "onnxruntime"):
                require(module, "compress --export onnx")
        run_compress(args, rest)
    except (CompressError, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"cifar-dist compress: error: {e}", file=sys.stderr)
        return 2
    return 0
