"""Pipeline parallelism: cut a PipelineModel's `pipeline_layers()` into stages and build the
`torch.distributed.pipelining` PipelineStages and schedule for this rank.

Placement is "looped": with pp ranks and s stages per rank, rank r holds stages r, r + pp, ...
(what ScheduleInterleaved1F1B expects; s = 1 is the plain layout of GPipe and 1F1B).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from cifar_dist.config.schema import ConfigError, ParallelConfig
from cifar_dist.models.registry import PipelineModel

_warned_batchnorm = False


def check_pipeline(model: nn.Module, num_stages: int, split_points: list[int]) -> None:
    """One clear ConfigError for a model that cannot be cut into `num_stages` stages."""
    if not isinstance(model, PipelineModel):
        raise ConfigError(f"model.name: {type(model).__name__} has no pipeline_layers()")
    n = len(model.pipeline_layers())
    if num_stages > n:
        raise ConfigError(
            f"parallel.pp: {num_stages} pipeline stages but the model has only {n} pipeline "
            f"layers (lower parallel.pp or parallel.stages_per_rank)"
        )
    if split_points and split_points[-1] >= n:
        raise ConfigError(
            f"parallel.split_points: {split_points[-1]} is out of range (the model has {n} "
            f"pipeline layers, so split points must be in 1..{n - 1})"
        )


def balanced_split(weights: list[int], num_stages: int) -> list[int]:
    """Split points (start index of stages 1..) minimising the heaviest stage's total weight.

    Exact linear partition by dynamic programming (O(n^2 k), n = a few dozen layers); torch's
    pipelining leaves the split to the caller. Ties go to the earliest cut (strict `<` over
    ascending j), so the split is deterministic and the same on every rank.
    """
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: minimal max-stage weight cutting layers[:i] into k non-empty stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    points, i = [], n
    for k in range(num_stages, 1, -1):
        i = cut[k][i]
        points.append(i)
    return sorted(points)


def layer_flops(model: PipelineModel, sample: torch.Tensor) -> list[int]:
    """FLOPs of every pipeline layer on `sample` (one micro-batch), forward pass, eval mode.

    Counted by torch's FlopCounterMode (matmuls and convolutions, which dominate the step);
    backward costs about twice the forward per layer, so the forward ranks stages the same way.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    flops, x = [], sample
    with torch.no_grad():
        for layer in model.pipeline_layers():
            counter = FlopCounterMode(display=False)
            with counter:
                x = layer(x)
            flops.append(int(counter.get_total_flops()))
    model.train(was_training)
    return flops


def named_split_points(model: PipelineModel, names: list[str]) -> list[int]:
    """Layer indices of `parallel.pp_split`'s layer names; a ConfigError for a wrong name."""
    by_id = {id(m): name for name, m in model.named_modules()}
    layer_names = [by_id[id(m)] for m in model.pipeline_layers()]
    points = []
    for name in names:
        if name not in layer_names[1:]:
            raise ConfigError(
                f"parallel.pp_split: {name!r} is not a pipeline layer after the first "
                f"(choose from {', '.join(layer_names[1:])})"
            )
        points.append(layer_names.index(name))
    if points != sorted(set(points)):
        raise ConfigError(f"parallel.pp_split: {names} are not in model order")
    return points


def stage_bounds(
    model: PipelineModel,
    num_stages: int,
    split_points: list[int],
    weights: list[int] | None = None,
) -> list[range]:
    """Layer index ranges of every stage: at the given split points, else balancing `weights`
    per layer (plan_pipeline passes FLOPs; default: parameter counts)."""
    layers = model.pipeline_layers()
    if not split_points:
        if weights is None:
            weights = [sum(p.numel() for p in m.parameters()) for m in layers]
        split_points = balanced_split(weights, num_stages)
    edges = [0, *split_points, len(layers)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


class _Contiguous(torch.autograd.Function):
    """Identity whose output and gradient are contiguous: stage boundaries are sent with
    point-to-point ops, which need contiguous tensors (channels_last activations are not)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class StageModule(nn.Module):
    """A contiguous run of pipeline layers; its forward is their composition (as the model's)."""

    def __init__(
        self,
        layers: list[nn.Module],
        tp_plan: dict[str, str] | None = None,
        tp_divisors: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._tp_plan, self._tp_divisors = tp_plan, tp_divisors or {}

    def tensor_parallel_plan(self) -> dict[str, str] | None:
        """The model's plan restricted to this stage's layers, renamed to `layers.<j>...`."""
        return self._tp_plan

    def tensor_parallel_divisors(self) -> dict[str, int]:
        return self._tp_divisors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _Contiguous.apply(x)
        for layer in self.layers:
            x = layer(x)
        return _Contiguous.apply(x)


@dataclass
class PipelinePlan:
    """This rank's share of the pipeline."""

    stage_ids: list[int]
    """Global stage indices held by this rank (looped placement)."""
    modules: list[StageModule]
    """The (unwrapped) module of each held stage."""
    prefixes: list[tuple[str, ...]]
    """State-dict key prefixes (in the full model) of each held stage's layers."""
    bounds: list[range]
    """Layer ranges of every stage (all ranks)."""

    @property
    def num_stages(self) -> int:
        return len(self.bounds)


def plan_pipeline(
    model: PipelineModel, pp_rank: int, pp: int, cfg: ParallelConfig, micro: torch.Tensor
) -> PipelinePlan:
    """Cut the model into stages (split_points, pp_split, else FLOPs on `micro` balanced)."""
    num_stages = pp * cfg.stages_per_rank
    check_pipeline(model, num_stages, cfg.split_points)
    points = cfg.split_points
    if cfg.pp_split is not None:
        points = named_split_points(model, cfg.pp_split)
    weights = None if points else layer_flops(model, micro)
    bounds = stage_bounds(model, num_stages, points, weights)
    layers = model.pipeline_layers()
    names = {id(m): name for name, m in model.named_modules()}
    stage_ids = [pp_rank + i * pp for i in range(cfg.stages_per_rank)]
    modules = [
        StageModule(
            [layers[i] for i in bounds[s]],
            *_stage_tp(model, [names[id(layers[i])] for i in bounds[s]]),
        )
        for s in stage_ids
    ]
    prefixes = [tuple(f"{names[id(layers[i])]}." for i in bounds[s]) for s in stage_ids]
    return PipelinePlan(stage_ids, modules, prefixes, bounds)


def _stage_tp(
    model: nn.Module, layer_names: list[str]
) -> tuple[dict[str, str] | None, dict[str, int]]:
    """The model's declared TP plan for one stage (keys renamed to the stage's `layers.<j>`),
    so tp x pp applies the same plan stage by stage; (None, {}) when the model has none."""
    plan_fn = getattr(model, "tensor_parallel_plan", None)
    if plan_fn is None:
        return None, {}
    full: dict[str, str] = plan_fn()
    stage: dict[str, str] = {}
    for j, name in enumerate(layer_names):
        for key, style in full.items():
            if key == name:
                stage[f"layers.{j}"] = style
            elif key.startswith(name + "."):
                stage[f"layers.{j}." + key.removeprefix(name + ".")] = style
    return stage, getattr(model, "tensor_parallel_divisors", dict)()


def release_other_layers(model: PipelineModel, plan: PipelinePlan) -> None:
    """Move the layers this rank does not run to the meta device: a stage's memory is its own."""
    held = {id(layer) for m in plan.modules for layer in m.layers}
    for layer in model.pipeline_layers():
        if id(layer) not in held:
            layer.to("meta")


def warn_batchnorm(model: nn.Module, is_main: bool) -> None:
    """BatchNorm under a pipeline normalises over micro-batches, not the rank's batch: say so once."""
    global _warned_batchnorm
    if _warned_batchnorm or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return
    _warned_batchnorm = True
    if is_main:
        warnings.warn(
            "pipeline parallel with BatchNorm: statistics come from each micro-batch "
            "(batch / (dp * parallel.microbatches) images), so training differs from a "
            "single-process run; use model.norm=group for identical results",
            stacklevel=2,
        )


def example_activations(
    model: PipelineModel, bounds: list[range], micro: torch.Tensor
) -> list[torch.Tensor]:
    """The input of every stage and the final output, for one micro-batch (shapes only matter).

    Passing them to PipelineStage selects its static mode. Without them the stage infers shapes
    by running its layers on an uninitialised buffer in train mode, which would feed garbage
    into BatchNorm running statistics on every stage but the first.
    """
    was_training = model.training
    model.eval()
    acts, x = [], micro
    layers = model.pipeline_layers()
    with torch.no_grad():
        for r in bounds:
            acts.append(x)
            for i in r:
                x = layers[i](x)
    acts.append(x)
    model.train(was_training)
    out = [a.detach().contiguous().zero_() for a in acts]  # as StageModule sends them
    # Stage inputs carry gradients back to the previous stage; the metadata says so.
    return [a.requires_grad_(0 < i < len(out) - 1) for i, a in enumerate(out)]


def build_stages(
    plan: PipelinePlan,
    wrapped: list[nn.Module],
    acts: list[torch.Tensor],
    device: torch.device,
    group: dist.ProcessGroup,
) -> list[PipelineStage]:
    """One PipelineStage per held stage, over `wrapped` (the stage module, or its DDP)."""
    return [
        PipelineStage(
            mod,
            sid,
            plan.num_stages,
            device,
            input_args=acts[sid],
            output_args=acts[sid + 1],
            group=group,
        )
        for sid, mod in zip(plan.stage_ids, wrapped)
    ]


def build_schedule(
    stages: list[PipelineStage],
    cfg: ParallelConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> ScheduleGPipe | Schedule1F1B | ScheduleInterleaved1F1B:
    """The configured schedule; loss_fn returns a micro-batch's mean loss (scale_grads=True
    then divides the summed gradients by the number of micro-batches: the rank batch's mean)."""
    if cfg.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, cfg.microbatches, loss_fn=loss_fn)
    (stage,) = stages
    cls = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
    return cls(stage, cfg.microbatches, loss_fn=loss_fn)
