"""Backend for pipeline parallelism (pp > 1, optionally dp x pp with DDP over dp).

One optimiser step is one `schedule.step`: the rank batch is cut into `parallel.microbatches`
micro-batches, the last stage computes the loss, and the loss, accuracy and gradient norm are
made global (broadcast from the last stage, all-reduced over stages) so every rank takes the
same decisions. Evaluation runs through the same pipeline; checkpoints are one shard per pp
rank plus a manifest that merges into a single-process state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cifar_dist.config.schema import ConfigError
from cifar_dist.parallel.parallelize import parallelize
from cifar_dist.parallel.pipeline import (
    build_schedule,
    build_stages,
    example_activations,
    plan_pipeline,
    release_other_layers,
    warn_batchnorm,
)
from cifar_dist.train.backends.base import Backend, Batches
from cifar_dist.train.callbacks.base import like_live, to_full
from cifar_dist.train.checkpoint import CheckpointError, save_checkpoint, step_filename
from cifar_dist.train.common import StepResult, micro_batch_size
from cifar_dist.train.grad_norm import clip_grad_norm
from cifar_dist.utils.dist import barrier

IMAGE_SHAPE = (3, 32, 32)  # every registered model takes CIFAR-sized images


class PipelineBackend(Backend):
    def prepare(self) -> None:
        t = self.trainer
        cfg, dims = t.cfg, t.dims
        dims.check_model(t.model, cfg.parallel)  # the same ConfigError on every rank
        coords = dims.coords(t.info.rank)
        self.pp_rank = coords.pp
        self.rank_batch = micro_batch_size(cfg, dims.dp)
        if self.rank_batch % cfg.parallel.microbatches:
            raise ConfigError(
                f"parallel.microbatches: {cfg.parallel.microbatches} does not divide the "
                f"per-rank batch {self.rank_batch} (data.batch_size / dp)"
            )
        warn_batchnorm(t.model, t.info.is_main)
        micro = torch.zeros(
            (self.rank_batch // cfg.parallel.microbatches, *IMAGE_SHAPE),
            dtype=t.dtype,
            device=t.device,
        ).contiguous(memory_format=t.memory_format)
        self.plan = plan_pipeline(t.model, coords.pp, dims.pp, cfg.parallel, micro)
        acts = example_activations(t.model, self.plan.bounds, micro)
        release_other_layers(t.model, self.plan)
        t.eval_group = dims.group("dp")
        self.pp_group = dims.group("pp")
        wrapped = [parallelize(m, dims, cfg, t.device) for m in self.plan.modules]
        self.stages = build_stages(self.plan, wrapped, acts, t.device, self.pp_group)
        self.schedule = build_schedule(self.stages, cfg.parallel, t.loss)
        self.has_first = 0 in self.plan.stage_ids
        self.has_last = self.plan.num_stages - 1 in self.plan.stage_ids
        # The last stage sits on pp rank pp-1 (looped placement), in this rank's dp replica.
        self.last_rank = dims.rank_of(dims.pp - 1, coords.dp, coords.tp)
        # What train()/eval() toggle, and what the optimiser and checkpoints see: held stages.
        t.train_model = nn.ModuleList(self.plan.modules)

    def optim_module(self) -> nn.Module:
        return self.trainer.train_model

    def clip_gradients(self, max_norm: float) -> float:
        params = list(self.trainer.train_model.parameters())
        return clip_grad_norm(params, max_norm, self.pp_group)

    # ----- one optimiser step ------------------------------------------------------------------
    def from_last_stage(self, values: torch.Tensor) -> torch.Tensor:
        """`values` as computed on the last stage, on every rank of this pipeline."""
        dist.broadcast(values, src=self.last_rank, group=self.pp_group)
        return values

    def forward_backward(self, batches: Batches) -> StepResult:
        """One `schedule.step` over the rank batch (parallel.microbatches micro-batches)."""
        t = self.trainer
        out = StepResult(lr=t.optimizer.param_groups[0]["lr"])
        images, labels = t.prepare_batch(*next(batches))
        losses: list[torch.Tensor] = []
        args = (images,) if self.has_first else ()
        with t.autocast():
            logits = self.schedule.step(*args, target=labels, losses=losses)
        stats = torch.zeros(2, dtype=torch.float64, device=t.device)
        if self.has_last:
            # Equal micro-batches: the mean of their mean losses is the rank batch's mean loss.
            stats[0] = torch.stack([x.detach().double() for x in losses]).mean()
            stats[1] = t.correct(logits, labels)
        loss, correct = self.from_last_stage(stats).tolist()
        out.add(loss, correct, labels.shape[0])
        return out

    # ----- evaluation --------------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        return PipelineForward(self)

    # ----- checkpoints -------------------------------------------------------------------------
    def _held_layers(self) -> list[tuple[str, nn.Module]]:
        return [
            (prefix, layer)
            for mod, prefixes in zip(self.plan.modules, self.plan.prefixes)
            for prefix, layer in zip(prefixes, mod.layers)
        ]

    def live_state(self) -> dict[str, torch.Tensor]:
        # The layers of other stages are on the meta device: this rank's own, full names.
        return {
            prefix + k: v
            for prefix, layer in self._held_layers()
            for k, v in layer.state_dict(keep_vars=True).items()
        }

    def model_optim_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # This rank's stages only, under the full model's names (other layers are on meta);
        # tensor-parallel shards gathered (collective over tp), so a shard file is whole.
        model = {k: to_full(v.detach()) for k, v in self.live_state().items()}
        optim = self.trainer.optimizer.state_dict()
        optim["state"] = {
            i: {n: to_full(v) for n, v in st.items()} for i, st in optim["state"].items()
        }
        return model, optim

    def load_model_optim_state_dict(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        live = self.live_state()
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(like_live(model[k], v))
        optimizer = self.trainer.optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        optim = {
            **optim,
            "state": {
                i: {n: like_live(v, params[int(i)]) if v.ndim else v for n, v in st.items()}
                for i, st in optim["state"].items()
            },
        }
        optimizer.load_state_dict(optim)

    def _layout(self) -> list[list[int]]:
        return [[r.start, r.stop] for r in self.plan.bounds]

    def write_checkpoint(self, state: dict[str, Any]) -> Path | None:
        """One shard per pipeline rank, then the manifest that names them (the commit)."""
        t = self.trainer
        step, ckpt_dir = t.state.step, t.run_dir / "checkpoints"
        shard = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
        for cb in t.callbacks:  # EMA / Lookahead state of this rank's stages
            if cb.key:
                shard[cb.key] = state.pop(cb.key)
        shard["stage_ids"] = self.plan.stage_ids
        coords = t.dims.coords(t.info.rank)
        if coords.dp == 0 and coords.tp == 0:  # one writer per pipeline rank
            save_checkpoint(shard, ckpt_dir / f"pp{self.pp_rank}", step)
        barrier()  # every shard is on disk before the manifest names it
        if not t.info.is_main:
            return None
        state["shards"] = [f"pp{r}/{step_filename(step)}" for r in range(t.dims.pp)]
        state["pipeline"] = {"layer_ranges": self._layout()}
        return save_checkpoint(state, ckpt_dir, step)

    def localize(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        layout = ckpt.get("pipeline", {}).get("layer_ranges")
        if layout != self._layout() or "shard_states" not in ckpt:
            raise CheckpointError(
                f"train.resume: the checkpoint's pipeline layout {layout} differs from this "
                f"run's {self._layout()} (evaluate it with `cifar-dist eval` instead)"
            )
        shard = ckpt["shard_states"][self.pp_rank]
        mine = {cb.key: shard.get(cb.key) for cb in self.trainer.callbacks if cb.key}
        return {**ckpt, "optimizer": shard["optimizer"], **mine}


class PipelineForward(nn.Module):
    """model(images) through the pipeline's forward-only schedule, on every rank of it.

    `schedule.eval` reuses the training stages, whose buffers have the training micro-batch
    shape: images go through in pieces of the rank batch, the last piece zero-padded (eval-mode
    layers treat samples independently, so padding changes no real sample's logits). The last
    stage's logits are broadcast so every rank updates identical metrics.
    """

    def __init__(self, backend: PipelineBackend) -> None:
        super().__init__()
        self.backend = [backend]  # a list: not registered as a submodule
        self.stages = backend.trainer.train_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backend[0]
        t = b.trainer
        outs = []
        for piece in images.split(b.rank_batch):
            n = piece.shape[0]
            if n < b.rank_batch:
                pad = piece.new_zeros((b.rank_batch - n, *piece.shape[1:]))
                piece = torch.cat([piece, pad])
            args = (piece,) if b.has_first else ()
            # The schedule's last stage applies its loss_fn in eval too, so it needs a target;
            # that loss is discarded (evaluate() computes its own from the logits).
            dummy = torch.zeros(b.rank_batch, dtype=torch.long, device=t.device)
            logits = b.schedule.eval(*args, target=dummy)
            buf = torch.empty(
                (b.rank_batch, t.cfg.data.num_classes), dtype=t.dtype, device=t.device
            )
            if b.has_last:
                buf.copy_(logits)
            outs.append(b.from_last_stage(buf)[:n])
        return torch.cat(outs)
