"""Model registry (timm-style) and the contract every registered model fulfils."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from cifar_dist.utils.registry import Registry

ModelFactory = Callable[..., nn.Module]

# The options every factory accepts as keywords (each ignores the ones that do not apply);
# create_model rejects anything else so a config typo fails loudly instead of being dropped.
MODEL_OPTIONS = ("norm", "groups", "se", "dropout", "drop_path")

MODELS: Registry[ModelFactory] = Registry("model", "model.name")
list_models = MODELS.names


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register `factory(num_classes=10, *, norm, groups, se, dropout, drop_path)` as `name`."""
    return MODELS.register(name)


def create_model(name: str, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """Build a registered model by name; the one way configs and the CLI make models."""
    factory = MODELS.get(name)
    for key in kwargs:
        if key not in MODEL_OPTIONS:
            raise ValueError(
                f"model.{key}: unknown model option (known: {', '.join(MODEL_OPTIONS)})"
            )
    if num_classes < 1:
        raise ValueError(f"model.num_classes: must be >= 1, got {num_classes}")
    return factory(num_classes=num_classes, **kwargs)


# Tensor-parallel styles a model's `tensor_parallel_plan()` may name (applied by
# cifar_dist/parallel/tensor.py, which never names a model class):
#   colwise        conv/linear: output channels split; its input must be whole
#   rowwise        conv/linear: input channels split (follows a colwise layer); partial sums
#                  all-reduced, so the output is whole
#   rowwise_whole  linear: input features split from a whole (replicated) input
#   split_norm     BatchNorm2d/GroupNorm between a colwise and a rowwise layer (local stats)
# Sequence parallelism (transformers, parallel.sequence_parallel; the seq_* entries are
# dropped without it, and rowwise_seq is plain rowwise):
#   rowwise_seq       linear: rowwise whose output is reduce-scattered along the tokens
#   seq_norm          LayerNorm on a token shard
#   seq_gather        module whose input is all-gathered from token shards
#   seq_gather_local  the same, the module then sees a plain tensor (a non-parallel head)
#   seq_scatter       module whose (whole) output is split into token shards
# A model may also define `tensor_parallel_divisors() -> {"the ... {} heads": count}`: counts
# tp must divide that are not layer widths (attention heads).
TP_STYLES = (
    "colwise",
    "rowwise",
    "rowwise_whole",
    "split_norm",
    "rowwise_seq",
    "seq_norm",
    "seq_gather",
    "seq_gather_local",
    "seq_scatter",
)
TensorParallelPlan = dict[str, str]


class PipelineModel(nn.Module):
    """A classifier whose forward IS the sequential composition of `pipeline_layers()`.

    Pipeline parallelism cuts that list into stages, so forward is derived from it rather than
    written separately: the two can never diverge.
    """

    num_classes: int

    def pipeline_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.pipeline_layers():
            x = layer(x)
        return x
