"""Tensor parallelism: a model's declared plan applied with DTensor `parallelize_module`.

Every model that supports TP declares its plan as data next to its code
(`model.tensor_parallel_plan()`: submodule name -> style name, the styles listed in
cifar_dist/models/registry.py); this module turns style names into ParallelStyles and never
names a model class.

Transformers (the ViT, Megatron-style): q, k, v and mlp.fc1 column-wise (each rank holds
num_heads / tp heads and hidden / tp MLP units), attn.proj and mlp.fc2 row-wise (partial
outputs summed by one all-reduce each). With `parallel.sequence_parallel` the residual stream,
LayerNorms and residual adds are sharded along the token dimension instead of replicated: each
all-reduce becomes a reduce-scatter after proj/fc2 plus an all-gather before attn/mlp (the same
bytes, activation memory / tp).

CNNs: consecutive conv pairs split column-wise (output channels) then row-wise (input
channels, one all-reduce of the partial sums), the norm between them local on its channel
shard (channel_tp.py), everything else replicated; linears use torch's
ColwiseParallel/RowwiseParallel. docs/parallelism.md draws the layout.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from cifar_dist.config.schema import ConfigError
from cifar_dist.models.registry import TP_STYLES
from cifar_dist.parallel.channel_tp import ConvColwiseParallel, ConvRowwiseParallel, SplitNorm


def _plan_of(model: nn.Module) -> dict[str, str]:
    plan_fn = getattr(model, "tensor_parallel_plan", None)
    plan = plan_fn() if plan_fn is not None else None
    if plan is None:
        raise ConfigError(f"parallel.tp: no tensor-parallel plan for {type(model).__name__}")
    return plan


def _check_module(fqn: str, module: nn.Module, style: str, tp: int) -> None:
    """One ConfigError naming the config key when `module` cannot be split `tp` ways."""
    if isinstance(module, nn.GroupNorm):
        if module.num_groups % tp:
            raise ConfigError(
                f"model.groups: GroupNorm {fqn} has {module.num_groups} groups of "
                f"{module.num_channels} channels; parallel.tp={tp} would split a group across "
                "ranks (use a group count divisible by tp)"
            )
        return
    if isinstance(module, nn.Conv2d):
        width = module.out_channels if style == "colwise" else module.in_channels
        what = "channels"
    elif isinstance(module, nn.Linear):
        width = module.out_features if style == "colwise" else module.in_features
        what = "features"
    else:
        width, what = getattr(module, "num_features", tp), "channels"
    if width % tp:
        raise ConfigError(f"parallel.tp: {tp} does not divide the {width} {what} of {fqn}")


_SEQ = Shard(1)  # (batch, tokens, dim): dim 1 is the token dimension
_SEQ_ONLY = ("seq_norm", "seq_gather", "seq_gather_local", "seq_scatter")


def check_tp(model: nn.Module, tp: int) -> None:
    """One clear ConfigError when `model` cannot be split `tp` ways."""
    plan = _plan_of(model)
    divisors = getattr(model, "tensor_parallel_divisors", dict)()
    for what, count in divisors.items():
        if count % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide {what.format(count)}")
    for fqn, style in plan.items():
        if style not in TP_STYLES:
            raise ConfigError(f"parallel.tp: unknown style {style!r} for {fqn} in the model's plan")
        if style not in _SEQ_ONLY:
            _check_module(fqn, model.get_submodule(fqn), style.removesuffix("_seq"), tp)


def _sequence_style(style: str) -> ParallelStyle:
    gather = PrepareModuleInput(input_layouts=(_SEQ,), desired_input_layouts=(Replicate(),))
    if style == "rowwise_seq":
        # Reduce-scatter along tokens, keeping a DTensor between layers (65 tokens do not
        # split evenly and a local shard would lose the global length).
        return RowwiseParallel(output_layouts=_SEQ, use_local_output=False)
    if style == "seq_norm":
        return SequenceParallel(use_local_output=False)
    if style == "seq_gather":
        return gather
    if style == "seq_gather_local":
        return PrepareModuleInput(
            input_layouts=(_SEQ,), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    return PrepareModuleOutput(  # seq_scatter
        output_layouts=Replicate(), desired_output_layouts=_SEQ, use_local_output=False
    )


def plan_styles(model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The model's declared plan, each style name made a ParallelStyle for its module."""
    plan: dict[str, ParallelStyle] = {}
    for fqn, style in _plan_of(model).items():
        if style in _SEQ_ONLY and not sequence_parallel:
            continue
        if style == "rowwise_seq":
            if sequence_parallel:
                plan[fqn] = _sequence_style(style)
                continue
            style = "rowwise"
        if style in _SEQ_ONLY:
            plan[fqn] = _sequence_style(style)
            continue
        conv = isinstance(model.get_submodule(fqn), nn.Conv2d)
        if style == "colwise":
            plan[fqn] = ConvColwiseParallel() if conv else ColwiseParallel()
        elif style == "rowwise":
            plan[fqn] = ConvRowwiseParallel() if conv else RowwiseParallel(input_layouts=Shard(-1))
        elif style == "rowwise_whole":
            plan[fqn] = RowwiseParallel(input_layouts=Replicate())
        else:
            plan[fqn] = SplitNorm()
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Shard `model` in place over the 1-D `tp_mesh`; returns it."""
    check_tp(model, tp_mesh.size())
    return parallelize_module(model, tp_mesh, plan_styles(model, sequence_parallel))
