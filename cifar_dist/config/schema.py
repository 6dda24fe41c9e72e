"""Typed run configuration: nested dataclasses, one docstring per field, checks in __post_init__.

Precedence (see load.py): dataclass defaults < YAML file < dotted CLI overrides.
Every check raises ConfigError naming the dotted key, so the CLI can print one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cifar_dist.config.data_schema import DataConfig as DataConfig
from cifar_dist.config.errors import ConfigError as ConfigError
from cifar_dist.config.errors import check as _check
from cifar_dist.config.log_schema import LogConfig as LogConfig
from cifar_dist.config.log_schema import WandbConfig as WandbConfig
from cifar_dist.config.parallel_schema import DeepSpeedConfig as DeepSpeedConfig
from cifar_dist.config.parallel_schema import ParallelConfig as ParallelConfig


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
    amp: Literal["none", "bf16", "fp16", "auto"] = "none"
    """Mixed precision: bf16 autocast (CPU and GPU), fp16 autocast + GradScaler (GPU only), or
    auto: bf16 where the device computes it natively (GPUs with bf16, CPUs with AVX-512 BF16 /
    AMX), else none (emulated bf16 on an AVX2 CPU is many times slower than fp32)."""
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
