"""Fold eval-mode BatchNorm into the preceding convolution (conv+BN -> one conv with a bias).

The conv->BN pairs are found with a torch.fx trace of the model, so the pass works on every CNN
in the registry without a per-model list, and the arithmetic is torch's own
`torch.nn.utils.fusion.fuse_conv_bn_eval`. The model keeps its module structure: the conv is
replaced by the folded conv and the BN by `nn.Identity`, so the fused model is still the
registry class (its state dict can be saved weights-only and loaded into a rebuilt model).

ReLU is deliberately not folded in float: eager PyTorch has no fused fp32 conv+ReLU kernel, so
`torch.ao.nn.intrinsic.ConvReLU2d` would only change the module tree. The INT8 path fuses
conv+BN+ReLU itself (prepare_fx), and ONNX Runtime fuses Conv+Relu when it loads the graph.

What is not folded, and why:
- a BN that comes *before* its conv through a ReLU (pre-activation blocks' norm1, the preact
  head): ReLU sits between them, so there is no affine map to fold;
- GroupNorm/LayerNorm: they normalise with statistics of each input, not stored ones.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cifar_dist.compress import CompressError

Pair = tuple[str, str]  # (conv module name, BN module name)


def _is_call(node: object, modules: dict[str, nn.Module], kind: type) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and isinstance(modules.get(str(node.target)), kind)
    )


def _positive_scale(bn: nn.BatchNorm2d) -> bool:
    # BN's per-channel scale is weight / sqrt(var + eps); the denominator is always positive.
    return bn.weight is None or bool((bn.weight > 0).all())


def find_conv_bn_pairs(model: nn.Module) -> list[Pair]:
    """Conv2d -> BatchNorm2d pairs that can be folded exactly, in graph order.

    A pair qualifies when the conv's output feeds only the BN (directly, or through MaxPool2d
    layers when every BN scale is positive: a per-channel increasing affine map commutes with
    max, which lets airbench's conv -> pool -> BN groups fold too), and when each module is
    called once (a shared module cannot be rewritten for one call site only).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # torch.fx raises several types for untraceable Python
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        raise CompressError(f"fuse: cannot trace {type(model).__name__}: {msg}") from None
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs: list[Pair] = []
    for node in graph.nodes:
        if not _is_call(node, modules, nn.BatchNorm2d):
            continue
        bn = modules[str(node.target)]
        src, through_pool = node.args[0], False
        while _is_call(src, modules, nn.MaxPool2d) and len(src.users) == 1:
            src, through_pool = src.args[0], True
        if not _is_call(src, modules, nn.Conv2d) or len(src.users) != 1:
            continue
        conv_name, bn_name = str(src.target), str(node.target)
        if calls[conv_name] != 1 or calls[bn_name] != 1 or bn.running_mean is None:
            continue
        if through_pool and not _positive_scale(bn):
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def check_eval_mode(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise CompressError(
            f"fuse: model is in training mode ({training[0]}); call model.eval() first: folding "
            "uses BN's running statistics, which training-mode BN does not use"
        )


def fusable_pairs(model: nn.Module) -> list[Pair]:
    """The pairs `fuse_bn` would fold; a CompressError if the model cannot be fused at all."""
    check_eval_mode(model)
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise CompressError(
            f"fuse: {type(model).__name__} has no BatchNorm2d to fold (GroupNorm/LayerNorm use "
            "per-input statistics and cannot be folded into weights)"
        )
    pairs = find_conv_bn_pairs(model)
    if not pairs:
        raise CompressError(f"fuse: no conv -> BatchNorm2d pair in {type(model).__name__}")
    return pairs


def fuse_bn(model: nn.Module) -> tuple[nn.Module, list[Pair]]:
    """A fused copy of an eval-mode `model` and the (conv, BN) pairs that were folded."""
    fused = copy.deepcopy(model)
    pairs = fusable_pairs(fused)
    for conv_name, bn_name in pairs:
        conv = fused.get_submodule(conv_name)
        bn = fused.get_submodule(bn_name)
        fused.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        fused.set_submodule(bn_name, nn.Identity())
    return fused, pairs


def apply_fused_structure(model: nn.Module, pairs: list[Pair]) -> nn.Module:
    """Give a freshly built model the fused module layout so a fused state dict loads into it."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if not isinstance(conv, nn.Conv2d):
            raise CompressError(f"fuse: {conv_name} is not a Conv2d in this model")
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
        model.set_submodule(bn_name, nn.Identity())
    return model
