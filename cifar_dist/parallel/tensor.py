"""Tensor parallelism with DTensor `parallelize_module` plans.

ViT (Megatron-style): in every block q, k, v and mlp.fc1 are column-wise parallel (each rank
holds num_heads / tp heads and hidden / tp MLP units) and attn.proj and mlp.fc2 row-wise
parallel (their partial outputs are summed by one all-reduce each). With
`parallel.sequence_parallel`, the residual stream, LayerNorms and residual adds are sharded
along the token dimension instead of replicated: each all-reduce becomes a reduce-scatter
after proj/fc2 plus an all-gather before attn/mlp (the same bytes, activation memory / tp).

CNNs: each model declares its plan as data (`model.tensor_parallel_plan()`, submodule name ->
style, see cifar_dist/models/registry.py): consecutive conv pairs split column-wise (output
channels) then row-wise (input channels, one all-reduce of the partial sums), the norm between
them local on its channel shard (channel_tp.py), everything else replicated; linears use
torch's ColwiseParallel/RowwiseParallel. docs/parallelism.md draws the layout.
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
from cifar_dist.models.vit import VisionTransformer
from cifar_dist.parallel.channel_tp import ConvColwiseParallel, ConvRowwiseParallel, SplitNorm


def _plan_of(model: nn.Module) -> dict[str, str]:
    plan_fn = getattr(model, "tensor_parallel_plan", None)
    if plan_fn is None:
        raise ConfigError(f"parallel.tp: no tensor-parallel plan for {type(model).__name__}")
    return plan_fn()


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


def check_tp(model: nn.Module, tp: int) -> None:
    """One clear ConfigError when `model` cannot be split `tp` ways."""
    if isinstance(model, VisionTransformer):
        heads = model.blocks[0].attn.num_heads
        if heads % tp:
            raise ConfigError(
                f"parallel.tp: {tp} does not divide the ViT's {heads} attention heads"
            )
        return
    for fqn, style in _plan_of(model).items():
        if style not in TP_STYLES:
            raise ConfigError(f"parallel.tp: unknown style {style!r} for {fqn} in the model's plan")
        _check_module(fqn, model.get_submodule(fqn), style, tp)


def vit_plan(model: VisionTransformer, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    seq = Shard(1)  # (batch, tokens, dim): dim 1 is the token dimension
    # Row-wise layers reduce-scatter along tokens under SP (keeping a DTensor between layers,
    # since 65 tokens do not split evenly and a local shard would lose the global length).
    row = (
        RowwiseParallel(output_layouts=seq, use_local_output=False)
        if sequence_parallel
        else RowwiseParallel()
    )
    plan: dict[str, ParallelStyle] = {}
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        plan.update(
            {
                p + "attn.q": ColwiseParallel(),
                p + "attn.k": ColwiseParallel(),
                p + "attn.v": ColwiseParallel(),
                p + "attn.proj": row,
                p + "mlp.fc1": ColwiseParallel(),
                p + "mlp.fc2": row,
            }
        )
        if sequence_parallel:
            gather = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
            plan.update(
                {
                    p + "norm1": SequenceParallel(use_local_output=False),
                    p + "norm2": SequenceParallel(use_local_output=False),
                    p + "attn": gather,
                    p + "mlp": gather,
                }
            )
    if sequence_parallel:
        plan["embed"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=seq, use_local_output=False
        )
        plan["head"] = PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    return plan


def cnn_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The model's declared plan, with each style name made a ParallelStyle for its module."""
    plan: dict[str, ParallelStyle] = {}
    for fqn, style in _plan_of(model).items():
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
    if isinstance(model, VisionTransformer):
        plan = vit_plan(model, sequence_parallel)
    else:
        plan = cnn_plan(model)
    return parallelize_module(model, tp_mesh, plan)
