"""Model options applied after a registered model is built: norm settings, dirac init, whitening.

These are recipe choices (airbench), not architecture, so they live here rather than in every
model factory: `apply_model_options` runs wherever a model is built from a config (training and
`cifar-dist eval` alike, so a BatchNorm epsilon is the same in both), and `init_whitening` runs
once at train start because it needs training images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cifar_dist.config.schema import Config, ConfigError, ModelConfig

# The CNN norms `model.norm` chooses; the ViT's LayerNorms keep their own settings.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def apply_model_options(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Norm momentum / epsilon / frozen scale and dirac init, in place; returns `model`."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = cfg.norm_momentum
        if isinstance(m, _NORMS):
            m.eps = cfg.norm_eps
            if not cfg.norm_weight and getattr(m, "weight", None) is not None:
                # Frozen at its init value (1): a bias-only norm. requires_grad is set before any
                # DDP/compile wrapping, so DDP never expects a gradient for it.
                m.weight.requires_grad_(False)
    if cfg.init == "dirac":
        dirac_init_(model)
    return model


@torch.no_grad()
def dirac_init_(model: nn.Module) -> int:
    """Identity-initialise the first min(c_in, c_out) filters of odd k x k (k > 1) convs.

    airbench's "implicit residual": at init each such conv passes its input channels through
    unchanged in its first filters (torch.nn.init.dirac_ on that slice), the rest keep their
    default init. 1x1 shortcuts and even (e.g. whitening) kernels are skipped. Returns the
    number of convs changed.
    """
    changed = 0
    for m in model.modules():
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            continue
        kh, kw = m.kernel_size
        if kh != kw or kh % 2 == 0 or kh == 1 or m.stride != (1, 1):
            continue
        n = min(m.in_channels, m.out_channels)
        nn.init.dirac_(m.weight[:n])
        changed += 1
    return changed


def whitening_images(cfg: Config, n: int) -> torch.Tensor:
    """The first `n` training images of the split, normalised float32 NCHW, un-augmented.

    Read from the array store, not from a rank's shard, so every rank fits the same stem.
    """
    from cifar_dist.data import load_splits
    from cifar_dist.data.augment import mean_std

    train = load_splits(cfg.data)["train"]
    images = torch.from_numpy(np.array(train.images[:n], dtype=np.uint8))
    mean, std = mean_std(cfg.data.dataset)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def init_whitening(model: nn.Module, cfg: Config, fit: bool = True) -> nn.Conv2d | None:
    """model.whiten_init > 0: fit `model.whiten` on that many training images and freeze its
    weights; returns the stem (its bias stays trainable), or None when the option is off.
    fit=False checks and freezes only (a rank that receives rank 0's fitted stem)."""
    n = cfg.model.whiten_init
    if n <= 0:
        return None
    stem = getattr(model, "whiten", None)
    if not isinstance(stem, nn.Conv2d):
        raise ConfigError(
            f"model.whiten_init: model {cfg.model.name!r} has no whitening stem (use airbench_net)"
        )
    from cifar_dist.models.airbench import fit_whitening

    if fit:
        fit_whitening(stem, whitening_images(cfg, n).to(stem.weight.device))
    stem.weight.requires_grad_(False)  # before DDP/compile wrap: a fixed transform from now on
    return stem
