"""Cross-rank batch norm: torch's SyncBatchNorm on GPU, our own on CPU.

torch.nn.SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"), so gloo runs
need this small replacement. Each rank computes its per-channel count, mean and M2 (sum of
squared deviations) in float64; an autograd-aware all-gather (torch's functional collectives,
whose backward reduce-scatters the gradients) brings every rank's triple to every rank, and
Chan's parallel formula combines them: mean = sum(n_i mean_i) / N,
M2 = sum(M2_i + n_i (mean_i - mean)^2). Unlike E[x^2] - E[x]^2 in float32, this does not cancel
catastrophically when |mean| >> std. Normalisation also runs in float64 and is cast back, so
bf16/float32 activations lose nothing before their own rounding. Running-stat updates follow
BatchNorm (momentum, unbiased variance). Parameter/buffer names match BatchNorm2d, so state
dicts load either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

# torch 2.13 renamed the autograd all-gather (the old name warns); torch 2.11 has only the old.
_all_gather = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)


def global_moments(
    x: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, mean, biased var) per channel of NCHW float64 `x` over every rank of `group`,
    differentiable with respect to `x`."""
    c = x.shape[1]
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    n = x.new_full((1,), x.numel() / c)
    local = torch.cat([n, mean, var * n]).unsqueeze(0)  # [1, 1 + 2C]: count, mean, M2
    rows = _all_gather(local, 0, group)  # [world, 1 + 2C]
    if isinstance(rows, funcol.AsyncCollectiveTensor):
        rows = rows.wait()
    counts, means, m2s = rows[:, :1], rows[:, 1 : 1 + c], rows[:, 1 + c :]
    total = counts.sum()
    gmean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - gmean) ** 2).sum(0)
    return total, gmean, m2 / total


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
        group = self.process_group or dist.group.WORLD
        # One float64 copy for the statistics and the normalisation: its backward then rounds the
        # summed input gradient to x's dtype once (two casts would round two large, nearly
        # cancelling terms separately: ~3 ulp off in bf16).
        xd = x.double()
        count, mean, var = global_moments(xd, group)
        if self.track_running_stats:
            self._update_running_stats(count, mean, var)
        shape = (1, -1, 1, 1)
        y = (xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.double().view(shape) + self.bias.double().view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


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
