"""2-D normalisation layers chosen by name (`model.norm`)."""

from __future__ import annotations

from torch import nn

NORM_KINDS = ("batch", "sync_batch", "group")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def make_norm2d(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """Build the norm layer for `channels` feature maps.

    "sync_batch" deliberately returns a plain BatchNorm2d: models stay single-device, and the
    parallel layer converts it with `nn.SyncBatchNorm.convert_sync_batchnorm` once a process
    group exists. "group" uses the largest divisor of `channels` that is <= `groups`, so any
    width works (e.g. the 24-channel airbench stem gets 8 groups, 12 channels get 6).
    """
    if kind in ("batch", "sync_batch"):
        return nn.BatchNorm2d(channels)
    if kind == "group":
        if groups < 1:
            raise ValueError(f"model.groups: must be >= 1, got {groups}")
        return nn.GroupNorm(_largest_divisor_at_most(channels, groups), channels)
    raise ValueError(f"model.norm: unknown norm {kind!r} (known: {', '.join(NORM_KINDS)})")
