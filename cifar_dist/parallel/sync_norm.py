"""Cross-rank batch norm: torch's SyncBatchNorm on GPU, our own on CPU.

torch.nn.SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"), so gloo runs
need this small replacement: per-channel sums, squared sums and counts are all-reduced with the
autograd-aware torch.distributed.nn.functional.all_reduce, whose backward all-reduces the
gradients, giving exactly the gradient of the full-batch statistics. Running-stat updates follow
BatchNorm (momentum, unbiased variance). Parameter/buffer names match BatchNorm2d, so state dicts
load either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    def __init__(
        self, *args: object, process_group: dist.ProcessGroup | None = None, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.process_group = process_group

    def _synced(self) -> bool:
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self._synced()):
            return super().forward(x)
        c = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()
        local = torch.cat(
            [xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), xf.new_tensor([x.numel() / c])]
        )
        total = all_reduce(local, op=dist.ReduceOp.SUM, group=self.process_group)
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(
            0
        )  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(
                    mean.detach().to(self.running_mean.dtype), alpha=m
                )
                self.running_var.mul_(1 - m).add_(
                    unbiased.detach().to(self.running_var.dtype), alpha=m
                )
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(
    model: nn.Module, device: torch.device, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Swap every BatchNorm2d for a cross-rank one (torch's on CUDA, ours on CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert_cpu(model, process_group)


def _convert_cpu(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossRankBatchNorm2d):
        ref = next(iter(module.parameters()), None)
        if ref is None:
            ref = module.running_mean
        new = CrossRankBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=group,
        ).to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(module.state_dict())
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(
                p_old.requires_grad
            )  # keep frozen scales frozen (model.norm_weight)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child, group))
    return module
