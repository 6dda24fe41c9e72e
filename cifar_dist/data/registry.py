"""Loaders by name (data.loader), registered like models in cifar_dist/models/registry.py.

Each entry builds (train loader, {split: eval loader}) for one data-parallel rank from the data
config and the loaded splits. Entries import their module lazily: ffcv is an optional extra,
and the device loader pulls in the GPU augmentation code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from cifar_dist.config.schema import DataConfig
from cifar_dist.utils.registry import Registry

LoaderFactory = Callable[..., tuple[Any, dict[str, Any]]]
"""factory(cfg, splits, *, micro_batch, eval_batch, rank, world_size, seed, num_classes,
device, dtype, channels_last) -> (train loader, {split: eval loader})."""

LOADERS: Registry[LoaderFactory] = Registry("loader", "data.loader")
register_loader = LOADERS.register
list_loaders = LOADERS.names


def build(
    name: str,
    cfg: DataConfig,
    splits: Mapping[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """The loaders `data.loader` names, for the rank and batch arithmetic in `kwargs`."""
    return LOADERS.get(name)(
        cfg, splits, device=device, dtype=dtype, channels_last=channels_last, **kwargs
    )


@register_loader("torch")
def _torch(cfg: DataConfig, splits: Mapping[str, Any], **kwargs: Any) -> tuple[Any, dict]:
    from cifar_dist.data.loaders import build_loaders

    # The DataLoader path yields CPU float32 images; the trainer places them itself.
    for key in ("device", "dtype", "channels_last"):
        kwargs.pop(key)
    return build_loaders(cfg, splits, **kwargs)


@register_loader("device")
def _device(cfg: DataConfig, splits: Mapping[str, Any], **kwargs: Any) -> tuple[Any, dict]:
    from cifar_dist.data.device_loader import build_device_loaders

    return build_device_loaders(cfg, splits, **kwargs)


@register_loader("ffcv")
def _ffcv(cfg: DataConfig, splits: Mapping[str, Any], **kwargs: Any) -> tuple[Any, dict]:
    from cifar_dist.data.ffcv_loader import build_ffcv_loaders

    return build_ffcv_loaders(cfg, splits, **kwargs)
