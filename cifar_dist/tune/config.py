"""Typed sweep configuration: a base run config, fixed overrides, a search space over dotted keys.

A sweep file is separate from the run config (`cifar-dist train -c`): it *names* one (`base`)
and says what to vary. Loading is strict like the run config: an unknown key, a wrong type or a
value the run config would refuse stops with one ConfigError line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from cifar_dist.config.errors import check as _check

EPOCH_METRICS = (
    "val_acc",
    "val_loss",
    "val_top5",
    "val_f1",
    "val_precision",
    "val_recall",
    "train_acc",
    "train_loss",
)


class SweepError(RuntimeError):
    """A sweep with no usable trial (all failed); the message says where to look."""


@dataclass
class ParamSpec:
    """One searched key: either discrete `values` or a range `low`..`high`."""

    values: list[bool | int | float | str] = field(default_factory=list)
    """Discrete values: the grid points (search.algo=grid) or a categorical choice."""
    low: float | None = None
    """Lower end of a sampled range (bayes/random)."""
    high: float | None = None
    """Upper end of a sampled range (inclusive for integers)."""
    log: bool = False
    """Sample the range uniformly in log space (log-uniform); needs low > 0."""
    integer: bool = False
    """Sample integers from the range (e.g. a batch size)."""

    def check(self, key: str) -> None:
        ranged = self.low is not None or self.high is not None
        _check(bool(self.values) != ranged, key, "give either `values` or `low` and `high`")
        if ranged:
            _check(self.low is not None and self.high is not None, key, "needs both low and high")
            assert self.low is not None and self.high is not None
            _check(self.low < self.high, key, f"low ({self.low}) must be < high ({self.high})")
            _check(not self.log or self.low > 0, key, "log: true needs low > 0")
        else:
            _check(not self.log and not self.integer, key, "log/integer apply to low..high only")

    @property
    def is_range(self) -> bool:
        return not self.values

    def endpoints(self) -> list[Any]:
        """Values the run config must accept: every discrete value, or both ends of the range."""
        if self.values:
            return list(self.values)
        assert self.low is not None and self.high is not None
        ends = [self.low, self.high]
        return [int(v) for v in ends] if self.integer else ends


@dataclass
class SearchConfig:
    algo: Literal["grid", "bayes", "random"] = "bayes"
    """grid: every combination of `values` (tune.grid_search); bayes: Optuna TPE behind a
    ConcurrencyLimiter; random: independent samples."""
    metric: str = "val_acc"
    """Per-epoch metric to optimise: val_acc, val_loss, val_f1, ..., train_loss, train_acc."""
    mode: Literal["max", "min"] = "max"
    """Maximise or minimise `metric`."""
    num_samples: int = 0
    """Trials for bayes/random (required). For grid: 0 or 1 runs each grid point once,
    N repeats the whole grid N times."""
    max_concurrent: int = 2
    """Trials running at once (bayes: through a ConcurrencyLimiter, so TPE learns from finished
    trials before proposing more); 0 = as many as the resources allow (grid/random only)."""
    seed: int = 0
    """Seed of the searcher (TPE sampler / random variant generator)."""
    startup_trials: int = 5
    """bayes: random trials before TPE starts modelling (Optuna's n_startup_trials)."""
    scheduler: Literal["fifo", "asha", "pbt"] = "fifo"
    """fifo: every trial runs to its end; asha: early stopping (the `asha` section; the same as
    asha.enabled); pbt: Population Based Training (the `pbt` section): at every `pbt.interval`
    epochs the worst trials load a better trial's checkpoint and perturb its optim.lr /
    optim.momentum / optim.weight_decay (search.algo grid or random; schedule.name=constant)."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 0, "search.num_samples", "must be >= 0")
        _check(self.max_concurrent >= 0, "search.max_concurrent", "must be >= 0")
        _check(self.startup_trials >= 1, "search.startup_trials", "must be >= 1")
        if self.algo != "grid":
            _check(self.num_samples >= 1, "search.num_samples", f"must be >= 1 for {self.algo}")
        if self.algo == "bayes":
            _check(self.max_concurrent >= 1, "search.max_concurrent", "must be >= 1 for bayes")
        # Sweeps see what Trainer.end_epoch logs each epoch (train.metrics names the val_* ones);
        # a metric that never arrives would only fail at the first report, inside Ray.
        _check(
            self.metric in EPOCH_METRICS,
            "search.metric",
            f"must be a per-epoch metric: {', '.join(EPOCH_METRICS)}",
        )


@dataclass
class AshaConfig:
    enabled: bool = False
    """Stop trials early with ASHA (asynchronous successive halving) on the per-epoch reports."""
    grace_period: int = 1
    """Epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """At each rung only the best 1/reduction_factor of trials continue."""
    max_t: int = 0
    """Last rung, in epochs (0 = the run config's train.epochs)."""

    def __post_init__(self) -> None:
        _check(self.grace_period >= 1, "asha.grace_period", "must be >= 1")
        _check(self.reduction_factor > 1, "asha.reduction_factor", "must be > 1")
        _check(self.max_t >= 0, "asha.max_t", "must be >= 0")


# The keys PBT may change in a running trial: optimiser hyperparameters that are set afresh on
# the checkpoint it continues from (tune/pbt.py). Anything else is baked into the weights/state.
PBT_KEYS = ("optim.lr", "optim.momentum", "optim.weight_decay")


@dataclass
class PbtConfig:
    interval: int = 1
    """Epochs between exploit/explore steps of a trial (Tune's perturbation_interval)."""
    burn_in: int = 0
    """Epochs before a trial is first exploited (Tune's burn_in_period)."""
    quantile_fraction: float = 0.25
    """The worst this fraction of trials copy one of the best this fraction (at most half)."""
    resample_probability: float = 0.25
    """Chance that an explored value is drawn afresh from `space` rather than perturbed
    (x1.2 / x0.8 for a range, a neighbour for `values`)."""
    synch: bool = False
    """Tune's synchronous PBT: every trial pauses at each interval until all have reached it,
    then the worst copy the best. Exploits never depend on which trial happens to report
    first, at the cost of idle workers while the slowest trial catches up."""

    def __post_init__(self) -> None:
        _check(self.interval >= 1, "pbt.interval", "must be >= 1")
        _check(self.burn_in >= 0, "pbt.burn_in", "must be >= 0")
        _check(0 < self.quantile_fraction <= 0.5, "pbt.quantile_fraction", "must be in (0, 0.5]")
        _check(0 <= self.resample_probability <= 1, "pbt.resample_probability", "must be in [0, 1]")


@dataclass
class TrialConfig:
    workers: int = 1
    """Processes per trial: 1 = the trial trains in its Tune actor; > 1 = a Ray Train
    TorchTrainer with that many data-parallel workers (gloo on CPU, nccl on GPU)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs Ray reserves per worker (fractions allowed)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (> 0 trains on CUDA; a fraction shares a GPU between trials)."""
    max_failures: int = 1
    """Times a crashed trial is restarted from its last checkpoint (Tune FailureConfig). A
    diverging trial is not retried: it ends with status `diverged`."""
    keep_checkpoints: int = 1
    """Checkpoints Tune keeps per trial (the newest ones)."""

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "trial.workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "trial.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker >= 0, "trial.gpus_per_worker", "must be >= 0")
        if self.workers > 1 and self.gpus_per_worker:
            _check(
                self.gpus_per_worker >= 1,
                "trial.gpus_per_worker",
                "must be a whole GPU per worker when trial.workers > 1 (nccl needs one each)",
            )
        _check(self.max_failures >= 0, "trial.max_failures", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "trial.keep_checkpoints", "must be >= 1")


@dataclass
class RayConfig:
    address: str = ""
    """Ray cluster to join: '' starts a local instance; 'auto' joins the one `ray start` made
    on this node (slurm/ray_cluster.sbatch); or host:port."""
    num_cpus: int = 0
    """Local instance only: logical CPUs (0 = all cores)."""
    num_gpus: int = -1
    """Local instance only: GPUs (-1 = all visible)."""

    def __post_init__(self) -> None:
        _check(self.num_cpus >= 0, "ray.num_cpus", "must be >= 0")
        _check(self.num_gpus >= -1, "ray.num_gpus", "must be >= -1")


# Keys the sweep itself sets on every trial (run directory, W&B group, resume point).
RESERVED_KEYS = ("log.dir", "log.name", "log.wandb.group", "train.resume")
# The driver prepares one data store before the trials start (concurrent trials would race).
DATA_KEYS = ("data.dataset", "data.dir", "data.source", "data.synthetic")


@dataclass
class SweepConfig:
    base: str = ""
    """Run config YAML the trials start from (as for `cifar-dist train -c`); a relative path
    is looked up beside the sweep file, then in the current directory; empty = defaults."""
    name: str = ""
    """Sweep name: the directory <dir>/<name>/ and the W&B group (empty = <file>-<timestamp>)."""
    dir: str = "runs/tune"
    """Parent directory of sweep directories."""
    run: dict[str, Any] = field(default_factory=dict)
    """Fixed run-config overrides for every trial, dotted (`train.epochs: 3`) or nested."""
    space: dict[str, ParamSpec] = field(default_factory=dict)
    """Searched run-config keys (`optim.lr: {low: 1e-3, high: 1, log: true}`)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    pbt: PbtConfig = field(default_factory=PbtConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _check(bool(self.space), "space", "name at least one run-config key to search")
        _check("/" not in self.name, "name", "must not contain '/'")
        for key, spec in self.space.items():
            where = f"space.{key}"
            _check(key not in RESERVED_KEYS, where, "is set by the sweep for each trial")
            _check(
                key not in DATA_KEYS, where, "the data is prepared once per sweep: set it in run"
            )
            spec.check(where)
            if self.search.algo == "grid":
                _check(not spec.is_range, where, "search.algo=grid needs `values`, not a range")
        for key in self.run:
            _check(key not in RESERVED_KEYS, f"run.{key}", "is set by the sweep for each trial")
        if self.search.scheduler == "pbt":
            self._check_pbt()

    def _check_pbt(self) -> None:
        _check(
            self.search.algo != "bayes",
            "search.algo",
            "bayes cannot be combined with search.scheduler=pbt (PBT chooses the values)",
        )
        _check(not self.asha.enabled, "asha.enabled", "ASHA and PBT are both schedulers: pick one")
        _check(self.trial.workers == 1, "trial.workers", "PBT trials run in one process (1)")
        for key in self.space:
            _check(
                key in PBT_KEYS,
                f"space.{key}",
                f"search.scheduler=pbt can change {', '.join(PBT_KEYS)} only",
            )

    @property
    def scheduler(self) -> str:
        """fifo | asha | pbt (asha.enabled is the older spelling of search.scheduler=asha)."""
        return "asha" if self.asha.enabled else self.search.scheduler


def sections() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SweepConfig))
