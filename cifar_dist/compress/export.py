"""Export (ONNX, TorchScript) with a dynamic batch dim, and weights-only save/load of float variants.

ONNX uses the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch's default since
2.9; it needs onnxscript) and is checked with onnxruntime. TorchScript uses `torch.jit.trace`:
the registry models have no data-dependent control flow, and the traced graph reads the batch
size from the input, so one trace serves every batch size. torch 2.13 marks torch.jit as
deprecated (a DeprecationWarning), but it is still the one self-contained format that loads
without the model's Python code, including the FX-quantized INT8 model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cifar_dist.compress import CompressError
from cifar_dist.compress.fuse import apply_fused_structure
from cifar_dist.compress.prune import apply_widths

MAX_BATCH = 65536  # upper bound of the exported dynamic batch dim


def export_onnx(model: nn.Module, path: Path, example: Tensor, opset: int | None = None) -> Path:
    """Write `model` (eval mode) to `path` with a dynamic batch dim named "batch"."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with a clear line)
    except ImportError:
        raise CompressError(
            "export: ONNX export needs onnx and onnxscript (pip install 'cifar-dist[compress]')"
        ) from None
    if example.shape[0] < 2:
        # torch.export specialises a dim whose example size is 1, which would fix the batch.
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The exporter's own pytree internals warn about a deprecated torch API (not ours).
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,  # one self-contained file (protobuf's 2 GB limit is far away)
            verbose=False,
        )
    return path


class OrtModel(nn.Module):
    """An onnxruntime session behind the nn.Module call interface (so `evaluate` can run it)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise CompressError(
                "export: checking ONNX needs onnxruntime (pip install 'cifar-dist[compress]')"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: Tensor) -> Tensor:
        array = images.detach().cpu().contiguous().float().numpy()
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits)


def export_torchscript(model: nn.Module, path: Path, example: Tensor) -> Path:
    """Trace `model` (eval mode) and save it; the trace is valid for any batch size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    quantized = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    with warnings.catch_warnings(), torch.no_grad():
        if quantized:
            # Quantized ops read their calibrated scale as a Python float while tracing; the
            # warning that it becomes a constant is exactly right for a calibrated scale.
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python float")
        traced = torch.jit.trace(model.eval(), example)
    torch.jit.save(traced, str(path))
    return path


def load_torchscript(path: Path) -> nn.Module:
    return torch.jit.load(str(path), map_location="cpu")


@torch.no_grad()
def max_abs_diff(reference: nn.Module, other: nn.Module, images: Tensor) -> float:
    return float((reference(images).float() - other(images).float()).abs().max())


def save_float_model(
    path: Path,
    model: nn.Module,
    config: dict[str, Any],
    widths: dict[str, int] | None = None,
    fused: list[tuple[str, str]] | None = None,
) -> Path:
    """Save a float variant weights-only: the state dict plus how to rebuild its layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "config": config,
        "pruned_widths": dict(widths or {}),
        "fused_pairs": [list(p) for p in fused or []],
    }
    torch.save(state, path)
    return path


def load_float_model(path: Path) -> nn.Module:
    """Rebuild a model saved by `save_float_model` (loads with weights_only=True)."""
    from cifar_dist.config.load import config_from_dict
    from cifar_dist.train.common import build_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg, torch.device("cpu")).to(memory_format=torch.contiguous_format)
    apply_widths(model, state.get("pruned_widths", {}))
    apply_fused_structure(model, [tuple(p) for p in state.get("fused_pairs", [])])
    model.load_state_dict(state["model"])
    return model.eval()
