"""Typed run configuration: nested dataclasses, one docstring per field, checks in __post_init__.

Precedence (see load.py): dataclass defaults < YAML file < dotted CLI overrides.
Every check raises ConfigError naming the dotted key, so the CLI can print one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key."""


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    """Which dataset: cifar10 (10 classes) or cifar100 (100 fine classes)."""
    dir: str = ""
    """Data directory; empty means $CIFAR_DIST_DATA, else ./data."""
    source: str = ""
    """Image-folder directory or tar shards to import when no array file exists
    (empty means $CIFAR_DIST_SOURCE, else the canonical pickles, downloaded if missing)."""
    download: bool = True
    """Download the canonical files (MD5-checked) when neither arrays nor a source exist."""
    synthetic: int = 0
    """If > 0 and the data directory holds no dataset yet, first write this many learnable synthetic
    training images (plus synthetic // 5 test images) there in the canonical format; for smoke runs."""
    val_size: int = 5000
    """Images carved from the training split, by `split_seed`, for validation (0 = none)."""
    split_seed: int = 0
    """Seed of the fixed permutation that carves the validation split."""
    subset: int = 0
    """Use only the first N training images after the split (0 = all); for debugging."""
    batch_size: int | Literal["auto"] = 128
    """Global training batch (summed over data-parallel ranks and one optimiser step's micro-batches);
    "auto" = the largest power of two whose measured training memory fits the device with
    `auto_batch_headroom` to spare, capped at `auto_batch_max` (see docs/fast_recipe.md)."""
    auto_batch_max: int = 2048
    """batch_size=auto: never pick more than this (on CPU memory is rarely the limit, this is)."""
    auto_batch_headroom: float = 0.2
    """batch_size=auto: fraction of device memory (CUDA) or available RAM (CPU) left free."""
    eval_batch_size: int = 500
    """Global evaluation batch."""
    loader: Literal["torch", "device", "ffcv"] = "torch"
    """torch: DataLoader + transforms.v2; device: device-resident uint8 tensor; ffcv: .beton files."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the main process)."""
    pin_memory: bool = True
    """Pin host memory for faster copies to a GPU (ignored on CPU)."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive across epochs."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead."""
    crop_padding: int = 4
    """Pixels of padding for the random crop (0 = no crop)."""
    crop_epochs: int = 0
    """With crop_padding (loader=device): random translation in the first N epochs only; later
    epochs see every image centred (augmentation reduced toward the end; 0 = every epoch)."""
    flip: bool = True
    """Random horizontal flip."""
    flip_mode: Literal["random", "alternating"] = "random"
    """With flip: random = a fair coin per image per epoch; alternating = each image mirrored in
    every other epoch (airbench; loader=device only)."""
    cutout: int = 0
    """Side in pixels of a square cut out of each training image and filled with the dataset
    mean (loader=device|ffcv; 0 = off)."""
    epoch_sizes: list[int] = field(default_factory=list)
    """Progressive resizing (loader=device): the training images' side for the first epochs, in
    order (e.g. [24, 24, 28]: epochs 1-2 at 24 px, epoch 3 at 28); later epochs and evaluation
    use the full 32 px. Needs a model that pools globally (airbench, resnet), not the ViT."""
    randaugment_group: int = 16
    """loader=device: images that share one RandAugment draw (1 = per image; larger = faster)."""
    ffcv_order: Literal["random", "quasi_random"] = "random"
    """loader=ffcv: random = exact DistributedSampler shards, resumable; quasi_random = FFCV's
    page-local order, one process only."""
    randaugment: bool = False
    """RandAugment (transforms.v2) on the training images."""
    randaugment_magnitude: int = 9
    """RandAugment magnitude (0..30)."""
    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha) parameter (0 = off)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) parameter (0 = off)."""

    def __post_init__(self) -> None:
        _check(self.val_size >= 0, "data.val_size", "must be >= 0")
        _check(self.subset >= 0, "data.subset", "must be >= 0")
        _check(self.synthetic >= 0, "data.synthetic", "must be >= 0")
        _check(
            self.batch_size == "auto" or self.batch_size >= 1,
            "data.batch_size",
            "must be >= 1 or auto",
        )
        _check(self.auto_batch_max >= 1, "data.auto_batch_max", "must be >= 1")
        _check(0 <= self.auto_batch_headroom < 1, "data.auto_batch_headroom", "must be in [0, 1)")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        _check(0 <= self.crop_padding <= 16, "data.crop_padding", "must be in 0..16")
        _check(
            0 <= self.randaugment_magnitude <= 30, "data.randaugment_magnitude", "must be in 0..30"
        )
        _check(self.mixup_alpha >= 0, "data.mixup_alpha", "must be >= 0")
        _check(self.cutmix_alpha >= 0, "data.cutmix_alpha", "must be >= 0")
        _check(0 <= self.cutout <= 32, "data.cutout", "must be in 0..32")
        _check(self.randaugment_group >= 1, "data.randaugment_group", "must be >= 1")
        _check(
            all(8 <= side <= 32 for side in self.epoch_sizes),
            "data.epoch_sizes",
            f"sides must be in 8..32, got {self.epoch_sizes}",
        )
        _check(self.crop_epochs >= 0, "data.crop_epochs", "must be >= 0")
        if self.loader != "device":
            _check(not self.epoch_sizes, "data.epoch_sizes", "needs data.loader=device")
            _check(self.crop_epochs == 0, "data.crop_epochs", "needs data.loader=device")
        if self.loader == "torch":
            _check(self.cutout == 0, "data.cutout", "needs data.loader=device or ffcv")
            _check(
                self.flip_mode == "random", "data.flip_mode", "alternating needs data.loader=device"
            )
        if self.loader == "ffcv":
            _check(
                not self.randaugment, "data.randaugment", "is not available with data.loader=ffcv"
            )
            _check(
                self.flip_mode == "random", "data.flip_mode", "alternating needs data.loader=device"
            )

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Registered model name (see `cifar_dist.models.list_models()`)."""
    norm: Literal["batch", "sync_batch", "group"] = "batch"
    """Normalisation of the CNNs: batch, sync_batch (cross-rank statistics) or group."""
    groups: int = 8
    """Groups for norm=group."""
    se: bool = False
    """Squeeze-and-excitation in ResNet blocks."""
    dropout: float = 0.0
    """Dropout probability where the model has dropout (seed_cnn uses it; 0 = off)."""
    drop_path: float = 0.0
    """Stochastic depth rate of the ViT (0 = off)."""
    init: Literal["default", "dirac"] = "default"
    """dirac: after the default init, set the first min(c_in, c_out) filters of every odd k x k
    (k > 1) convolution to the identity, an implicit residual (airbench)."""
    norm_momentum: float = 0.1
    """BatchNorm running-statistics momentum, torch convention (weight of the new batch;
    airbench's "0.6" is 0.4 here)."""
    norm_eps: float = 1e-5
    """BatchNorm / GroupNorm epsilon (airbench: 1e-12)."""
    norm_weight: bool = True
    """Train the norm layers' scale; false freezes it at 1 (bias-only norms, airbench)."""
    whiten_init: int = 0
    """Fit the model's whitening stem (models with a `whiten` conv, e.g. airbench_net) on this
    many un-augmented training images before training, then freeze its weights (0 = off;
    airbench: 5000)."""
    whiten_bias_epochs: float = 0.0
    """With whiten_init: the stem's bias is trained for this many epochs, then frozen
    (0 = trained throughout; airbench: 3)."""

    def __post_init__(self) -> None:
        _check(self.groups >= 1, "model.groups", "must be >= 1")
        _check(0 <= self.norm_momentum <= 1, "model.norm_momentum", "must be in [0, 1]")
        _check(self.norm_eps > 0, "model.norm_eps", "must be > 0")
        _check(self.whiten_init >= 0, "model.whiten_init", "must be >= 0")
        _check(self.whiten_bias_epochs >= 0, "model.whiten_bias_epochs", "must be >= 0")
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        _check(0 <= self.drop_path < 1, "model.drop_path", "must be in [0, 1)")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "muon"] = "sgd"
    """Optimiser: sgd (with momentum / Nesterov), adamw, or muon (Muon for the conv filters,
    SGD as configured here for every other parameter)."""
    lr: float = 0.1
    """Peak learning rate at `base_batch_size` (before any batch-size scaling), in `lr_units`."""
    lr_units: Literal["torch", "per_1024"] = "torch"
    """torch: `lr`/`weight_decay` are torch's (mean loss over the batch, L2 coefficient);
    per_1024 (SGD/muon only, airbench): `lr` is the step per 1024 examples' summed gradient and
    `weight_decay` the fraction of each weight decayed per 1024 examples, both decoupled from
    momentum (divided by 1 + 1/(1 - momentum)) and from the batch size."""
    weight_decay: float = 5e-4
    """Decoupled (AdamW) or L2 (SGD) weight decay (see `lr_units`); not applied to norms and
    biases unless `decay_vectors`."""
    decay_vectors: bool = False
    """Also decay biases and norm parameters (airbench does; the usual recipe does not)."""
    norm_bias_lr_scale: float = 1.0
    """LR multiplier for norm-layer biases; their per-step weight decay is not scaled
    (airbench: 64)."""
    muon_lr: float = 0.24
    """optim.name=muon: Muon's LR for the conv filters (orthogonalised update, so no units)."""
    muon_momentum: float = 0.6
    """optim.name=muon: Muon's (Nesterov) momentum."""
    muon_ns_steps: int = 3
    """optim.name=muon: Newton-Schulz iterations (airbench: 3; Muon's default: 5)."""
    muon_normalize: bool = True
    """optim.name=muon: rescale each filter bank to norm sqrt(c_out) before its step (airbench;
    right when a norm layer follows every conv)."""
    momentum: float = 0.9
    """SGD momentum, or AdamW beta1."""
    nesterov: bool = True
    """Nesterov momentum for SGD."""
    beta2: float = 0.999
    """AdamW beta2."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale lr by (batch_size / base_batch_size) or its square root."""
    base_batch_size: int = 128
    """Reference batch for `lr_scaling`."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        _check(self.base_batch_size >= 1, "optim.base_batch_size", "must be >= 1")
        _check(self.norm_bias_lr_scale > 0, "optim.norm_bias_lr_scale", "must be > 0")
        _check(self.muon_lr > 0, "optim.muon_lr", "must be > 0")
        _check(0 <= self.muon_momentum < 1, "optim.muon_momentum", "must be in [0, 1)")
        _check(1 <= self.muon_ns_steps <= 20, "optim.muon_ns_steps", "must be in 1..20")
        _check(
            not (self.lr_units == "per_1024" and self.name == "adamw"),
            "optim.lr_units",
            "per_1024 needs optim.name=sgd or muon",
        )


@dataclass
class ScheduleConfig:
    name: Literal["onecycle", "cosine", "multistep", "constant", "triangle"] = "onecycle"
    """LR schedule, stepped once per optimiser step. triangle (airbench): linear from
    `start_factor` x peak to the peak at `pct_start` of training, then linear to `end_factor`."""
    warmup_epochs: float = 1.0
    """Linear warmup length for cosine/multistep/constant, in epochs (fractions allowed)."""
    pct_start: float = 0.25
    """OneCycle / triangle: fraction of training spent increasing the LR."""
    start_factor: float = 0.2
    """Triangle: first LR as a fraction of the peak."""
    end_factor: float = 0.07
    """Triangle: last LR as a fraction of the peak."""
    min_lr_ratio: float = 0.0
    """Cosine: final LR as a fraction of the peak."""
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """Multistep: fractions of training at which the LR is multiplied by `gamma`."""
    gamma: float = 0.1
    """Multistep: LR factor at each milestone."""

    def __post_init__(self) -> None:
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
        _check(0 < self.pct_start < 1, "schedule.pct_start", "must be in (0, 1)")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        _check(all(0 < m < 1 for m in self.milestones), "schedule.milestones", "must be in (0, 1)")
        _check(0 < self.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
        _check(0 < self.start_factor <= 1, "schedule.start_factor", "must be in (0, 1]")
        _check(0 <= self.end_factor <= 1, "schedule.end_factor", "must be in [0, 1]")


@dataclass
class TrainConfig:
    epochs: int = 10
    """Training epochs."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0 = run all epochs); the schedule still spans `epochs`."""
    seed: int = 0
    """Seed for model init, data order and augmentation (offset per rank)."""
    deterministic: bool = False
    """Use deterministic algorithms (bit-identical resume on CPU; slower on GPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device; auto picks CUDA when available."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter and input dtype; float64 exists for numerical equivalence checks (slow)."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision: bf16 autocast (CPU and GPU) or fp16 autocast + GradScaler (GPU only)."""
    compile: bool = False
    """torch.compile the model before data-parallel wrapping."""
    channels_last: bool = False
    """Use the channels_last memory format for images and conv weights."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; each is batch_size / (dp * grad_accum) images per rank."""
    clip_norm: float = 0.0
    """Clip the global gradient norm to this value (0 = off; the norm is logged either way)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    ema_decay: float = 0.0
    """Exponential moving average of weights, per step (0 = off; e.g. 0.999). Evaluated when on."""
    lookahead_every: int = 0
    """Lookahead weight averaging every N optimiser steps (0 = off; airbench: 5): slow weights
    (and float buffers) move towards the fast ones, which are then reset to them."""
    lookahead_decay: float = 0.95
    """Lookahead: per-step decay; an update keeps decay**every * (step / total)**pow of the
    slow weights (airbench)."""
    lookahead_pow: float = 3.0
    """Lookahead: exponent of the (step / total) warm-up of the decay."""
    lookahead_start_epochs: float = 0.0
    """Lookahead: epochs before the first averaging step (airbench94: 3)."""
    tta: bool = False
    """Average logits over the image and its horizontal flip at evaluation."""
    tta_translate: int = 0
    """With tta: also average the flip pair of the image translated by this many pixels
    up-left and down-right (reflect padding), weighted 1/4 each (airbench tta_level 2: 1)."""
    eval_every: int = 1
    """Evaluate on the validation split every N epochs (and always after the last)."""
    early_stopping: int = 0
    """Stop when validation loss has not improved for this many evaluations (0 = off)."""
    max_nonfinite: int = 5
    """Stop with an error after this many consecutive non-finite losses / gradient norms."""
    ckpt_every_steps: int = 0
    """Also checkpoint every N optimiser steps (0 = only at epoch ends)."""
    resume: str = ""
    """'' = fresh run, 'auto' = latest valid checkpoint in the run directory, or a checkpoint path."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.threads >= 0, "train.threads", "must be >= 0")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.clip_norm >= 0, "train.clip_norm", "must be >= 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.lookahead_every >= 0, "train.lookahead_every", "must be >= 0")
        _check(0 <= self.lookahead_decay <= 1, "train.lookahead_decay", "must be in [0, 1]")
        _check(self.lookahead_pow >= 0, "train.lookahead_pow", "must be >= 0")
        _check(self.lookahead_start_epochs >= 0, "train.lookahead_start_epochs", "must be >= 0")
        _check(0 <= self.tta_translate <= 8, "train.tta_translate", "must be in 0..8")
        _check(self.tta or self.tta_translate == 0, "train.tta_translate", "needs train.tta=true")
        _check(self.early_stopping >= 0, "train.early_stopping", "must be >= 0")
        _check(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
        _check(self.ckpt_every_steps >= 0, "train.ckpt_every_steps", "must be >= 0")


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
        _check(self.dp == -1 or self.dp >= 1, "parallel.dp", "must be >= 1 or -1 (auto)")
        _check(self.tp >= 1, "parallel.tp", "must be >= 1")
        _check(self.pp >= 1, "parallel.pp", "must be >= 1")
        from cifar_dist.parallel.mesh import validate_tp  # every tp combination, in one place

        validate_tp(self, self.dp)
        _check(self.bucket_cap_mb > 0, "parallel.bucket_cap_mb", "must be > 0")
        _check(self.microbatches >= 1, "parallel.microbatches", "must be >= 1")
        _check(self.stages_per_rank >= 1, "parallel.stages_per_rank", "must be >= 1")
        _check(
            all(p >= 1 for p in self.split_points)
            and all(a < b for a, b in zip(self.split_points, self.split_points[1:])),
            "parallel.split_points",
            "must be strictly increasing layer indices >= 1",
        )
        _check(
            not (self.pp_split is not None and self.split_points),
            "parallel.pp_split",
            "set either parallel.pp_split or parallel.split_points, not both",
        )
        if (
            self.pp == 1 or self.engine != "torch"
        ):  # DeepSpeed's pipeline: cifar_dist/deepspeed/checks.py
            return
        interleaved = self.pp_schedule == "interleaved_1f1b"
        _check(
            interleaved == (self.stages_per_rank > 1),
            "parallel.stages_per_rank",
            "must be > 1 exactly when pp_schedule=interleaved_1f1b",
        )
        stages = self.pp * self.stages_per_rank
        _check(
            not self.split_points or len(self.split_points) == stages - 1,
            "parallel.split_points",
            f"needs {stages - 1} entries for {stages} stages, got {len(self.split_points)}",
        )
        _check(
            self.pp_split is None or len(self.pp_split) == stages - 1,
            "parallel.pp_split",
            f"needs {stages - 1} layer names for {stages} stages, got {len(self.pp_split or [])}",
        )
        if self.pp_schedule == "1f1b":  # torch's Schedule1F1B refuses fewer
            _check(
                self.microbatches >= stages,
                "parallel.microbatches",
                f"1f1b needs at least as many micro-batches as stages ({stages})",
            )
        if interleaved:  # torch's ScheduleInterleaved1F1B runs micro-batches in equal rounds
            rounds = max(1, self.microbatches // self.pp)
            _check(
                self.microbatches % rounds == 0,
                "parallel.microbatches",
                f"interleaved_1f1b needs a multiple of {rounds} (rounds of pp micro-batches)",
            )
        _check(
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
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        _check(
            self.partition in ("parameters", "uniform") or self.partition.startswith("type:"),
            "deepspeed.partition",
            "must be parameters, uniform or type:<regex>",
        )


@dataclass
class WandbConfig:
    mode: Literal["", "offline", "online", "disabled"] = ""
    """offline writes a local run to sync later; online needs WANDB_API_KEY; disabled logs nothing.
    Empty = $WANDB_MODE if set, else offline (an explicit value wins over the environment)."""
    project: str = ""
    """W&B project. Empty = $WANDB_PROJECT if set, else cifar-dist."""
    entity: str = ""
    """W&B entity (user or team). Empty = $WANDB_ENTITY if set, else wandb's default."""
    job_type: str = "train"
    """W&B job_type (filters runs in the UI)."""
    log_checkpoints: bool = True
    """Upload last.pt (aliases last/latest) as a model artifact at the end of training."""
    worst_images: int = 32
    """Log a table of this many highest-loss validation images (image, true and predicted
    class, confidence, loss) at the end of training (0 = off; only when W&B is on)."""
    group: str = ""
    """W&B group (sweeps put their trials in one group)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class LogConfig:
    name: str = ""
    """Run name; the run directory is <dir>/<name>/ (empty = a timestamped name)."""
    dir: str = "runs"
    """Parent directory of run directories."""
    every_steps: int = 50
    """Log training loss / lr / grad norm every N optimiser steps."""
    plots: bool = True
    """Write PNG plots (curves, LR schedule, confusion matrix) at the end."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases sink (skipped with a note when wandb is not installed)."""
    tensorboard: bool = False
    """Also write scalars to <run_dir>/tensorboard (needs the tensorboard extra)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", "must be >= 1")
        _check("/" not in self.name, "log.name", "must not contain '/'")
        _check(self.wandb.worst_images >= 0, "log.wandb.worst_images", "must be >= 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        # Cross-section checks that need several fields.
        if self.train.amp == "fp16" and self.train.device == "cpu":
            raise ConfigError("train.amp: fp16 needs a GPU (GradScaler); use bf16 on CPU")
        _check(
            self.model.whiten_bias_epochs == 0 or self.model.whiten_init > 0,
            "model.whiten_bias_epochs",
            "needs model.whiten_init > 0",
        )
        _check(
            not (self.data.epoch_sizes and self.model.name.startswith("vit")),
            "data.epoch_sizes",
            "needs a model that pools globally; the ViT's position embeddings fix 32 px",
        )
        # Recipe options (EMA, Lookahead, whitening stem, ...) x backend: one check, in one
        # place, each callback naming the backends it cannot run with and why.
        from cifar_dist.train.callbacks import validate

        validate(self)
        if self.parallel.engine == "deepspeed":
            from cifar_dist.deepspeed.checks import check_deepspeed

            check_deepspeed(self)
            return
        pp = self.parallel.pp > 1
        _check(
            not (pp and self.train.grad_accum > 1),
            "train.grad_accum",
            "must be 1 with pp > 1 (the pipeline accumulates over parallel.microbatches)",
        )
        _check(not (pp and self.train.compile), "train.compile", "is not supported with pp > 1")
