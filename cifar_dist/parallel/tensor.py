"""Tensor parallelism with DTensor `parallelize_module` plans.

ViT (Megatron-style): in every block q, k, v and mlp.fc1 are column-wise parallel (each rank
holds num_heads / tp heads and hidden / tp MLP units) and attn.proj and mlp.fc2 row-wise
parallel (their partial outputs are summed by one all-reduce each). With
`parallel.sequence_parallel`, the residual stream, LayerNorms and residual adds are sharded
along the token dimension instead of replicated: each all-reduce becomes a reduce-scatter
after proj/fc2 plus an all-gather before attn/mlp (the same bytes, activation memory / tp).

CNNs: PyTorch's parallel styles shard nn.Linear/nn.Embedding only (DTensor's convolution
supports batch sharding alone), so the CNNs shard their classifier: the final linear is
row-wise parallel (input features split, one all-reduce of the logits), and seed_cnn's
three-layer MLP head is a column-wise/row-wise pair. The convolutions stay replicated;
docs/parallelism.md explains why a channel split of the ResNet blocks is not worth it here.
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
from cifar_dist.models.vit import VisionTransformer


def _cnn_head_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The classifier linears a CNN's TP plan shards (the last one row-wise)."""
    name = type(model).__name__
    if name == "SeedCNN":
        net = model.classifier.net  # type: ignore[union-attr]
        return [("classifier.net.1", net[1]), ("classifier.net.4", net[4])]
    if name in ("ResNet", "AirbenchNet"):
        return [("head.fc", model.head.fc)]  # type: ignore[union-attr]
    return []


def check_tp(model: nn.Module, tp: int) -> None:
    """One clear ConfigError when `model` cannot be split `tp` ways."""
    if isinstance(model, VisionTransformer):
        heads = model.blocks[0].attn.num_heads
        if heads % tp:
            raise ConfigError(
                f"parallel.tp: {tp} does not divide the ViT's {heads} attention heads"
            )
        return
    linears = _cnn_head_linears(model)
    if not linears:
        raise ConfigError(f"parallel.tp: no tensor-parallel plan for {type(model).__name__}")
    for fqn, lin in linears:
        # Column-wise layers split output features, row-wise (the last) input features.
        width = lin.in_features if fqn == linears[-1][0] else lin.out_features
        if width % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide the {width} features of {fqn}")


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
    linears = _cnn_head_linears(model)
    plan: dict[str, ParallelStyle] = {fqn: ColwiseParallel() for fqn, _ in linears[:-1]}
    # The last linear's input is replicated (pooled features) unless a column-wise layer
    # precedes it; its output (the logits) is all-reduced to every rank.
    first = len(linears) == 1
    plan[linears[-1][0]] = RowwiseParallel(input_layouts=Replicate() if first else Shard(-1))
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Shard `model` in place over the 1-D `tp_mesh`; returns it."""
    check_tp(model, tp_mesh.size())
    if isinstance(model, VisionTransformer):
        plan = vit_plan(model, sequence_parallel)
    else:
        plan = cnn_plan(model)
    return parallelize_module(model, tp_mesh, plan)
