"""Structured L2 filter pruning with physical removal of the pruned channels.

Which layers are pruned: the *block-internal* conv of every block, i.e. the conv whose output
channels are consumed by exactly one norm and one following conv inside the same block:

- resnet18 BasicBlock: conv1 (-> norm1 -> ReLU -> conv2)
- preact_resnet18 PreActBlock: conv1 (-> norm2 -> ReLU -> conv2)
- seed_cnn ConvBlock: the first conv of the pair, index 0 (-> norm 1 -> ReLU -> conv 3)
- airbench_net ConvGroup: the first conv, index 0 (-> max-pool -> norm 2 -> GELU -> conv 4)

Which are left alone, and why: a ResNet block's *output* channels (conv2, the shortcut conv,
the stem) meet in the residual add `out + shortcut(x)`, so removing channel c there means
removing it from every tensor joined by that chain of adds (the whole stage, its shortcut
projections and the next stage's input) with one shared channel choice; that is a different,
coupled pruning problem and is not attempted. For uniformity the block outputs of seed_cnn and
airbench_net (which have no adds) are left too; their last conv also feeds a flattened
classifier whose input would need slicing per channel x spatial position. The ViT and
GroupNorm models are refused (no prunable conv sites / GroupNorm normalises over groups of
channels, so dropping channels changes the statistics of the kept ones).

The mask comes from `torch.nn.utils.prune.ln_structured(n=2, dim=0)`; the surgery that follows
(building narrower Conv2d/BatchNorm2d and slicing the next conv's input channels) is written by
hand because torch.nn.utils.prune only zeroes weights: a dense model with zero filters is
neither smaller nor faster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from cifar_dist.compress import CompressError
from cifar_dist.models.airbench import ConvGroup
from cifar_dist.models.cnn import ConvBlock
from cifar_dist.models.resnet import BasicBlock, PreActBlock


@dataclass(frozen=True)
class PruneSite:
    """A conv whose output channels feed only `norm` and then `next_conv`."""

    conv: str
    norm: str
    next_conv: str


def prune_sites(model: nn.Module) -> list[PruneSite]:
    """The prunable block-internal convs of a registry CNN (see the module docstring)."""
    local = {
        BasicBlock: ("conv1", "norm1", "conv2"),
        PreActBlock: ("conv1", "norm2", "conv2"),
        ConvBlock: ("0", "1", "3"),
        ConvGroup: ("0", "2", "4"),
    }
    sites = []
    for name, module in model.named_modules():
        names = local.get(type(module))
        if names:
            sites.append(PruneSite(*(f"{name}.{n}" for n in names)))
    if not sites:
        raise CompressError(
            f"prune: no prunable conv blocks in {type(model).__name__} "
            "(structured pruning supports airbench_net, resnet18, preact_resnet18, seed_cnn)"
        )
    for site in sites:
        if not isinstance(model.get_submodule(site.norm), nn.BatchNorm2d):
            raise CompressError(
                "prune: needs model.norm=batch (GroupNorm normalises over groups of channels, "
                "so removing channels would change the statistics of the kept ones)"
            )
    return sites


def _narrow_conv(conv: nn.Conv2d, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Conv2d:
    if conv.groups != 1:
        raise CompressError("prune: grouped convolutions are not supported")
    weight = conv.weight.detach()
    weight = weight if keep_out is None else weight[keep_out]
    weight = weight if keep_in is None else weight[:, keep_in]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            bias = conv.bias.detach()
            new.bias.copy_(bias if keep_out is None else bias[keep_out])
    return new


def _narrow_bn(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(keep),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=keep.device,
    )
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, attr)
            if src is not None:
                getattr(new, attr).copy_(src[keep])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _cut(model: nn.Module, site: PruneSite, keep: Tensor) -> None:
    conv, norm = model.get_submodule(site.conv), model.get_submodule(site.norm)
    after = model.get_submodule(site.next_conv)
    # New modules start in training mode; keep each one's mode (an eval BN must stay eval).
    model.set_submodule(site.conv, _narrow_conv(conv, keep, None).train(conv.training))
    model.set_submodule(site.norm, _narrow_bn(norm, keep).train(norm.training))
    model.set_submodule(site.next_conv, _narrow_conv(after, None, keep).train(after.training))


def l2_keep_indices(conv: nn.Conv2d, amount: float) -> Tensor:
    """Indices of the filters that `ln_structured(n=2, dim=0)` keeps, on a throwaway copy."""
    probe = copy.deepcopy(conv)
    prune.ln_structured(probe, "weight", amount=amount, n=2, dim=0)
    return probe.weight_mask.flatten(1).any(dim=1).nonzero().flatten()


def prune_model(model: nn.Module, amount: float) -> tuple[nn.Module, dict[str, dict[str, int]]]:
    """A copy of `model` with `amount` of each site's filters (lowest L2 norm) removed.

    Returns the pruned model and {conv name: {"before": channels, "after": channels}}.
    """
    if not 0.0 < amount < 1.0:
        raise CompressError(f"prune: amount must be in (0, 1), got {amount}")
    pruned = copy.deepcopy(model)
    layers: dict[str, dict[str, int]] = {}
    for site in prune_sites(pruned):
        conv = pruned.get_submodule(site.conv)
        keep = l2_keep_indices(conv, amount)
        if keep.numel() == 0:
            raise CompressError(f"prune: amount {amount} removes every filter of {site.conv}")
        layers[site.conv] = {"before": conv.out_channels, "after": int(keep.numel())}
        _cut(pruned, site, keep)
    return pruned, layers


def apply_widths(model: nn.Module, widths: dict[str, int]) -> nn.Module:
    """Narrow a freshly built model to saved widths ({conv name: kept channels}) so a pruned
    state dict loads into it (the values are overwritten by the state dict)."""
    by_conv = {site.conv: site for site in prune_sites(model)}
    for name, width in widths.items():
        if name not in by_conv:
            raise CompressError(f"prune: {name} is not a prunable conv of this model")
        _cut(model, by_conv[name], torch.arange(width))
    return model
