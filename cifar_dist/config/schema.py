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
    flip: bool = True
    """Random horizontal flip."""
    flip_mode: Literal["random", "alternating"] = "random"
    """With flip: random = a fair coin per image per epoch; alternating = each image mirrored in
    every other epoch (airbench; loader=device only)."""
    cutout: int = 0
    """Side in pixels of a square cut out of each training image and filled with the dataset
    mean (loader=device|ffcv; 0 = off)."""
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
    dp: int = -1
    """Data-parallel degree; -1 = world_size / (tp * pp)."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size in MiB."""
    broadcast_buffers: bool = True
    """DDP: broadcast rank 0's buffers (BatchNorm running stats) every forward."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients alias the communication buckets (saves one copy)."""

    def __post_init__(self) -> None:
        _check(self.dp == -1 or self.dp >= 1, "parallel.dp", "must be >= 1 or -1 (auto)")
        _check(self.tp >= 1, "parallel.tp", "must be >= 1")
        _check(self.pp >= 1, "parallel.pp", "must be >= 1")
        _check(self.bucket_cap_mb > 0, "parallel.bucket_cap_mb", "must be > 0")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes a local run to sync later; online needs WANDB_API_KEY; disabled logs nothing."""
    project: str = "cifar-dist"
    """W&B project."""
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

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", "must be >= 1")
        _check("/" not in self.name, "log.name", "must not contain '/'")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
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
