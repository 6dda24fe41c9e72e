"""Channel-split tensor parallelism for convolutions (Megatron's column/row pairs, for CNNs).

DTensor's convolution rule only shards the batch, so a conv whose weight is Shard(0) would be
all-gathered back to a whole weight. These styles therefore keep the parameters as DTensors
(so FSDP2, optimizers, clipping and the full-state checkpoint see the global layout) but run
the convolution on the local shards, with Megatron's two conjugate autograd functions:

* column-parallel conv (weight Shard(0), output channels split): its input is the whole
  activation; `_CopyToTP` is identity forward and all-reduces the input gradient backward
  (Megatron's f);
* split norm (BatchNorm/GroupNorm params and running statistics Shard(0)): statistics are
  per channel (per group for GroupNorm, whose groups must not straddle shards), so it runs
  locally on its channel slice;
* row-parallel conv (weight Shard(1), input channels split): partial sums of the output,
  all-reduced by `_ReduceFromTP` (Megatron's g: all-reduce forward, identity backward); its
  bias, if any, is Replicate and added once after the sum.

Between a column and a row conv the activations are plain local tensors (C / tp channels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from cifar_dist.config.schema import ConfigError


class _CopyToTP(torch.autograd.Function):
    """f: identity forward; backward sums the input gradients of the tp ranks."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # type: ignore[attr-defined]
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward (sum of the partial outputs); identity backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard(module: nn.Module, name: str, mesh: DeviceMesh, placement: Shard | Replicate) -> None:
    """Replace parameter or buffer `name` of `module` by a DTensor with `placement`."""
    t = getattr(module, name)
    if t is None or isinstance(t, DTensor):
        return
    d = distribute_tensor(t.detach(), mesh, [placement])
    if isinstance(t, nn.Parameter):
        module.register_parameter(name, nn.Parameter(d, requires_grad=t.requires_grad))
    else:
        module.register_buffer(name, d)


def _conv(module: nn.Conv2d, x: Tensor) -> Tensor:
    # nn.Conv2d._conv_forward with the local weight shard (bias handled by the caller).
    return module._conv_forward(x, _local(module.weight), None)  # type: ignore[arg-type]


def _check_conv(module: nn.Module, fqn: str, dim: int, tp: int) -> None:
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise ValueError(f"tensor-parallel plan: {fqn} is not a plain (groups=1) nn.Conv2d")
    if module.weight.shape[dim] % tp:
        raise ValueError(f"tensor-parallel plan: tp={tp} does not divide the channels of {fqn}")


def _split_conv(
    module: nn.Module,
    device_mesh: DeviceMesh,
    weight: Shard | Replicate,
    bias: Shard | Replicate,
    wrap: Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor],
) -> nn.Module:
    """Shard a Conv2d's weight and bias; forward = wrap(x, local conv) + local bias."""
    assert isinstance(module, nn.Conv2d)
    _shard(module, "weight", device_mesh, weight)
    _shard(module, "bias", device_mesh, bias)

    def forward(x: Tensor) -> Tensor:
        out = wrap(x, lambda t: _conv(module, t))
        b = _local(module.bias)
        return out if b is None else out + b.view(1, -1, 1, 1)

    module.forward = forward  # type: ignore[method-assign]
    return module


class ConvColwiseParallel(ParallelStyle):
    """Split a Conv2d's output channels; whole input, channel-shard output (local tensor)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        return _split_conv(
            module, device_mesh, Shard(0), Shard(0), lambda x, conv: conv(_CopyToTP.apply(x, group))
        )


class ConvRowwiseParallel(ParallelStyle):
    """Split a Conv2d's input channels; channel-shard input, whole (all-reduced) output."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        return _split_conv(
            module,
            device_mesh,
            Shard(1),
            Replicate(),
            lambda x, conv: _ReduceFromTP.apply(conv(x), group),
        )


class SplitNorm(ParallelStyle):
    """BatchNorm2d / GroupNorm on a channel shard: per-channel statistics stay local."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, nn.SyncBatchNorm):
            # Its statistics would have to be reduced over dp for this rank's channels only.
            raise ConfigError(
                "model.norm: sync_batch is not supported with a CNN's parallel.tp > 1 and dp > 1 "
                "(use batch or group)"
            )
        tp = device_mesh.size()
        names = ["weight", "bias"]
        if isinstance(module, nn.BatchNorm2d):
            names += ["running_mean", "running_var"]  # num_batches_tracked stays whole
        for name in names:
            _shard(module, name, device_mesh, Shard(0))
        if isinstance(module, nn.GroupNorm):
            local_groups = module.num_groups // tp

            def forward(x: Tensor) -> Tensor:
                w, b = _local(module.weight), _local(module.bias)
                return F.group_norm(x, local_groups, w, b, module.eps)

        elif isinstance(module, nn.BatchNorm2d):

            def forward(x: Tensor) -> Tensor:
                # nn.BatchNorm2d.forward on the local shards; the running statistics update
                # in place through the DTensor's local tensor (to_local is a view).
                return _batch_norm(module, x)

        else:
            raise TypeError(f"SplitNorm: unsupported {type(module).__name__}")
        module.forward = forward  # type: ignore[method-assign]
        return module


def _batch_norm(m: nn.BatchNorm2d, x: Tensor) -> Tensor:
    momentum = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        if m.momentum is None:
            momentum = 1.0 / float(m.num_batches_tracked)
    use_batch = m.training or m.running_mean is None
    return F.batch_norm(
        x,
        _local(m.running_mean) if not m.training or m.track_running_stats else None,
        _local(m.running_var) if not m.training or m.track_running_stats else None,
        _local(m.weight),
        _local(m.bias),
        use_batch,
        momentum,
        m.eps,
    )
