"""INT8 post-training quantization for CPU inference.

CNNs: static quantization with torch.ao's FX graph mode (`prepare_fx` / `convert_fx`) and the
x86 backend's default qconfig, calibrated on a few training batches. FX graph mode fuses
conv+BN+ReLU itself, so give it the *unfused* float model (a BN already replaced by Identity
would sit between conv and ReLU and block the conv+ReLU kernel).

Why not the PT2E flow that torch.ao's deprecation message points to (torchao's
`prepare_pt2e`/`convert_pt2e` with `X86InductorQuantizer`)? With torch 2.13 + torchao 0.18 it
(1) fails to annotate resnet18 ("Input partition has more than one output node": the block's
ReLU module is called twice), and (2) produces a graph of quantize/dequantize ops on float
kernels that is only faster after `torch.compile` (about 75 s on 2 cores for seed_cnn) and is
slower than fp32 in eager mode. FX graph mode runs real int8 kernels in eager mode on every CNN
here. It warns that torch.ao.quantization is deprecated; the warning is left visible.

ViT: static INT8 needs quantized LayerNorm/softmax/attention that the x86 backend lacks, so its
`nn.Linear` layers are quantized dynamically (int8 weights, activations quantized per batch at
run time) with `torch.ao.quantization.quantize_dynamic`; torchao's `quantize_` was measured
about 4x slower than it in eager mode on this CPU.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from cifar_dist.compress import CompressError

Int8Mode = Literal["static", "dynamic"]
BACKEND = "x86"


def default_mode(model: nn.Module) -> Int8Mode:
    """static for conv nets; dynamic for models built on LayerNorm/attention (the ViT)."""
    return "dynamic" if any(isinstance(m, nn.LayerNorm) for m in model.modules()) else "static"


def _use_backend() -> None:
    engines = torch.backends.quantized.supported_engines
    if BACKEND not in engines:
        raise CompressError(
            f"int8: the {BACKEND} quantized engine is not in this torch ({engines})"
        )
    # Process-wide setting: the int8 kernels are picked by the engine active at run time.
    torch.backends.quantized.engine = BACKEND


def quantize_static(
    model: nn.Module, calibration: Iterable[Tensor], example: Tensor, max_batches: int = 0
) -> nn.Module:
    """FX-graph-mode static INT8 copy of an eval-mode CNN, calibrated on `calibration` batches."""
    if default_mode(model) != "static":
        raise CompressError(
            f"int8: static quantization does not support {type(model).__name__} "
            "(LayerNorm/attention have no x86 static int8 kernels); use dynamic"
        )
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _use_backend()
    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # Raised by torch's own default x86 qconfig (reduce_range); nothing to act on here.
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max")
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(BACKEND), (example,))
        seen = 0
        with torch.no_grad():
            for images in calibration:
                prepared(images)
                seen += 1
                if 0 < max_batches <= seen:
                    break
        if seen == 0:
            raise CompressError("int8: no calibration batches")
        return convert_fx(prepared)


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """Dynamic INT8 copy: every nn.Linear gets int8 weights; everything else stays float."""
    _use_backend()
    float_model = copy.deepcopy(model).eval()
    return torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)


def quantize_int8(
    model: nn.Module,
    calibration: Iterable[Tensor],
    example: Tensor,
    mode: Int8Mode | Literal["auto"] = "auto",
    max_batches: int = 0,
) -> tuple[nn.Module, Int8Mode]:
    """Quantize with `mode` ("auto" = `default_mode(model)`); returns the model and the mode."""
    chosen: Int8Mode = default_mode(model) if mode == "auto" else mode
    if chosen == "static":
        return quantize_static(model, calibration, example, max_batches), chosen
    return quantize_dynamic(model), chosen
