"""The `parallel` and `deepspeed` sections of the run config (schema.py assembles the sections)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cifar_dist.config.errors import check


@dataclass
class ParallelConfig:
    engine: Literal["torch", "deepspeed"] = "torch"
    """torch: DDP (and torch's pipeline/tensor parallel); deepspeed: deepspeed.initialize with ZeRO,
    or DeepSpeed's pipeline engine when pp > 1 (settings in the `deepspeed` section)."""
    dp: int = -1
    """Data-parallel degree; -1 = world_size / (tp * pp)."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size in MiB (also DeepSpeed ZeRO's reduce/all-gather buckets)."""
    broadcast_buffers: bool = True
    """DDP: broadcast rank 0's buffers (BatchNorm running stats) every forward."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients alias the communication buckets (saves one copy)."""
    dp_mode: Literal["auto", "ddp", "fsdp"] = "auto"
    """Data parallelism over the dp mesh dimension: ddp (replicated weights, all-reduced
    gradients) or fsdp (FSDP2 `fully_shard`: sharded weights, gradients and optimiser state).
    auto = fsdp when tp > 1 (DDP cannot hold DTensor parameters), else ddp."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining): gpipe (all forwards, then all
    backwards), 1f1b (one forward one backward in steady state: fewer live activations), or
    interleaved_1f1b (several stages per rank: a smaller bubble, more messages)."""
    microbatches: int = 4
    """Pipeline micro-batches each rank's batch is cut into (pp > 1); must divide it."""
    stages_per_rank: int = 1
    """Pipeline stages held by each rank; > 1 (looped placement: rank r holds stages r, r+pp,
    ...) needs pp_schedule=interleaved_1f1b, which needs > 1."""
    split_points: list[int] = field(default_factory=list)
    """Indices into the model's `pipeline_layers()` where stages 1, 2, ... begin (one fewer
    than the number of stages); empty = balance the stages by compute (FLOPs per layer).
    Or name the layers: see pp_split."""
    pp_split: list[str] | None = None
    """Names (in the model, e.g. "blocks.4") of the pipeline layers where stages 1, 2, ...
    begin, an alternative to split_points; None = split_points or the FLOP-balanced split."""
    sequence_parallel: bool = False
    """Tensor parallel ViT: also shard LayerNorms and residual adds along the token dimension
    (activation memory / tp; all-reduces become reduce-scatter + all-gather). Ignored at tp = 1."""

    def __post_init__(self) -> None:
        check(self.dp == -1 or self.dp >= 1, "parallel.dp", "must be >= 1 or -1 (auto)")
        check(self.tp >= 1, "parallel.tp", "must be >= 1")
        check(self.pp >= 1, "parallel.pp", "must be >= 1")
        from cifar_dist.parallel.mesh import validate_tp  # every tp combination, in one place

        validate_tp(self, self.dp)
        check(self.bucket_cap_mb > 0, "parallel.bucket_cap_mb", "must be > 0")
        check(self.microbatches >= 1, "parallel.microbatches", "must be >= 1")
        check(self.stages_per_rank >= 1, "parallel.stages_per_rank", "must be >= 1")
        check(
            all(p >= 1 for p in self.split_points)
            and all(a < b for a, b in zip(self.split_points, self.split_points[1:])),
            "parallel.split_points",
            "must be strictly increasing layer indices >= 1",
        )
        check(
            not (self.pp_split is not None and self.split_points),
            "parallel.pp_split",
            "set either parallel.pp_split or parallel.split_points, not both",
        )
        if (
            self.pp == 1 or self.engine != "torch"
        ):  # DeepSpeed's pipeline: cifar_dist/deepspeed/checks.py
            return
        interleaved = self.pp_schedule == "interleaved_1f1b"
        check(
            interleaved == (self.stages_per_rank > 1),
            "parallel.stages_per_rank",
            "must be > 1 exactly when pp_schedule=interleaved_1f1b",
        )
        stages = self.pp * self.stages_per_rank
        check(
            not self.split_points or len(self.split_points) == stages - 1,
            "parallel.split_points",
            f"needs {stages - 1} entries for {stages} stages, got {len(self.split_points)}",
        )
        check(
            self.pp_split is None or len(self.pp_split) == stages - 1,
            "parallel.pp_split",
            f"needs {stages - 1} layer names for {stages} stages, got {len(self.pp_split or [])}",
        )
        if self.pp_schedule == "1f1b":  # torch's Schedule1F1B refuses fewer
            check(
                self.microbatches >= stages,
                "parallel.microbatches",
                f"1f1b needs at least as many micro-batches as stages ({stages})",
            )
        if interleaved:  # torch's ScheduleInterleaved1F1B runs micro-batches in equal rounds
            rounds = max(1, self.microbatches // self.pp)
            check(
                self.microbatches % rounds == 0,
                "parallel.microbatches",
                f"interleaved_1f1b needs a multiple of {rounds} (rounds of pp micro-batches)",
            )
        check(
            self.dp_mode != "fsdp",
            "parallel.dp_mode",
            "fsdp with pp > 1 is not supported; use ddp (or auto)",
        )


@dataclass
class DeepSpeedConfig:
    """Used when parallel.engine=deepspeed (see docs/deepspeed.md for the generated JSON)."""

    zero_stage: int = 1
    """ZeRO stage: 0 = plain data parallel, 1 = shard optimiser states, 2 = also gradients,
    3 = also parameters. DeepSpeed's pipeline engine (parallel.pp > 1) allows 0 or 1 only."""
    config: str = ""
    """Optional DeepSpeed JSON (e.g. configs/ds/zero2_tuned.json) merged over the generated one.
    It may set any key except those the project config owns (batch sizes, accumulation,
    precision, clipping, ZeRO stage), which must be set here instead."""
    optimizer: Literal["torch", "deepspeed"] = "torch"
    """torch: the project's optimiser (optim.*) handed to deepspeed.initialize; deepspeed: an
    'optimizer' section in the JSON, built by DeepSpeed (optim.name=adamw only: AdamW, FusedAdam
    on GPU; DeepSpeed has no plain SGD)."""
    scheduler: Literal["torch", "deepspeed"] = "torch"
    """torch: the project's LR schedule (schedule.*); deepspeed: a 'scheduler' section in the JSON
    (constant -> WarmupLR, cosine -> WarmupCosineLR, onecycle -> OneCycle; multistep has none)."""
    partition: str = "parameters"
    """Pipeline engine: how layers are split into stages: parameters (balance parameter counts),
    uniform (balance layer counts) or type:<regex> (balance layers whose class matches)."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        check(
            self.partition in ("parameters", "uniform") or self.partition.startswith("type:"),
            "deepspeed.partition",
            "must be parameters, uniform or type:<regex>",
        )
