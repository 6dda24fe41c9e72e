"""parallel.engine=deepspeed with parallel.pp > 1: DeepSpeed's pipeline engine.

The model's `pipeline_layers()` (whose composition is its forward) become a `PipelineModule`
cut into pp stages; `engine.train_batch()` runs one optimiser step: train.grad_accum
micro-batches through the stages (DeepSpeed's 1F1B schedule), gradient reduction across the
data-parallel replicas, clipping and the step. DeepSpeed's topology puts global rank
`stage * dp + dp_rank`; both the first stage (images) and the last (labels) read the batches
of their data-parallel shard, so every stage of a replica builds the same loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cifar_dist.config.schema import ConfigError
from cifar_dist.deepspeed.backend import DeepSpeedBackend
from cifar_dist.parallel.mesh import ParallelDims
from cifar_dist.train.common import StepResult


class DeepSpeedPipeBackend(DeepSpeedBackend):
    # Each stage evaluates its replica's shard with the full model (set to pp in prepare):
    # torchmetrics' world-wide sync counts every sample pp times, which leaves every ratio
    # (accuracy, precision, recall, F1, mean loss) unchanged; the confusion counts are / pp.
    eval_copies = 1
    norm_before_clip = False  # see DeepSpeedBackend: train_batch() clips before we can look

    @staticmethod
    def data_rank(rank: int, dims: ParallelDims) -> int:
        return rank % dims.dp  # DeepSpeed's PipeDataParallelTopology: axes (pipe, data)

    def prepare(self) -> None:
        super().prepare()  # DeepSpeed's runtime must exist before a PipelineModule
        from deepspeed.pipe import PipelineModule

        t = self.trainer
        self.eval_copies = t.dims.pp
        layers = t.model.pipeline_layers()  # type: ignore[operator]
        # Instances, not LayerSpecs: every rank builds the whole (small) model from the same
        # seed, so each stage starts from exactly the weights of the single-device model.
        self.ds_module = PipelineModule(
            layers=layers,
            num_stages=t.dims.pp,
            loss_fn=self._pipe_loss,
            partition_method=t.cfg.deepspeed.partition,
        )
        self._owner = [self.ds_module.stage_owner(i) for i in range(len(layers))]
        self._stats = [0.0, 0.0, 0]  # loss sum, correct, samples seen by this (last) stage

    def check_param_groups(self, groups: list[dict]) -> None:
        """Every stage must have the same kinds of parameter groups under ZeRO: DeepSpeed
        all-reduces the gradient norm across the stages once per group, so a stage with fewer
        groups (e.g. no norm layers) leaves its peers waiting forever. Checked once, on every
        rank alike, so all ranks stop with the same line instead of hanging."""
        cfg = self.trainer.cfg
        if cfg.deepspeed.zero_stage == 0:
            return
        mine = (self.ds_module.stage_id, [g.get("kind", "?") for g in groups])
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        stages = dict(sorted(every))
        if len({tuple(kinds) for kinds in stages.values()}) > 1:
            per_stage = "; ".join(f"stage {s}: {', '.join(k)}" for s, k in stages.items())
            err = ConfigError(
                f"deepspeed.partition: {cfg.deepspeed.partition!r} gives the pipeline stages "
                f"different optimizer parameter groups ({per_stage}); DeepSpeed's ZeRO reduces "
                "the gradient norm across stages once per group and would hang. Choose a "
                "partition that gives every stage the same kinds of layers (e.g. type:Block) "
                "or deepspeed.zero_stage: 0"
            )
            err.rank0_only = True  # type: ignore[attr-defined]  # the same on every rank
            raise err

    def _pipe_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Runs on the last stage, once per micro-batch; also counts what the epoch logs."""
        loss = self.trainer.loss(logits, labels)
        n = len(labels)
        self._stats[0] += float(loss.detach()) * n
        self._stats[1] += self.trainer.correct(logits, labels)
        self._stats[2] += n
        return loss

    def _micro_batches(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.trainer.accum):
            yield self._batch(*next(batches))

    def forward_backward(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        lr = float(self.engine.get_lr()[0])
        self._stats = [0.0, 0.0, 0]
        # DeepSpeed broadcasts the mean micro-batch loss from the last stage to every stage.
        loss = float(self.engine.train_batch(data_iter=self._micro_batches(batches)))
        # Only the last stage saw the logits: it reports the samples (end_epoch and fit sum
        # these over all ranks), the other stages report none.
        loss_sum, correct, seen = self._stats
        return StepResult(lr=lr, losses=[loss], loss_sum=loss_sum, correct=correct, seen=seen)

    # ----- evaluation: every rank evaluates the whole model --------------------------------
    def _sync_buffers(self) -> None:
        """Bring every stage's current layers (parameters and buffers) to all ranks of its
        pipeline, so the trainer's `model` is the full trained model everywhere."""
        grid = self.engine.grid
        group = grid.get_pipe_parallel_group()
        model = self.trainer.model
        model.to(self.trainer.dtype)  # layers this rank does not own may still be float32
        with torch.no_grad():
            for idx, layer in enumerate(model.pipeline_layers()):  # type: ignore[operator]
                src = grid.stage_to_global(stage_id=self._owner[idx])
                for t in [*layer.parameters(), *layer.buffers()]:
                    dist.broadcast(t.data, src=src, group=group)

    def eval_module(self) -> nn.Module:
        self._sync_buffers()
        return self.trainer.model
