"""SweepConfig -> Ray Tune search space, search algorithm and trial scheduler."""

from __future__ import annotations

from typing import Any

from cifar_dist.tune.config import ParamSpec, SweepConfig


def _domain(spec: ParamSpec, grid: bool) -> Any:
    from ray import tune

    if spec.values:
        return tune.grid_search(list(spec.values)) if grid else tune.choice(list(spec.values))
    assert spec.low is not None and spec.high is not None
    if spec.integer:
        # Tune's randint excludes `high`; the sweep file's `high` is inclusive.
        lo, hi = int(spec.low), int(spec.high) + 1
        return tune.lograndint(lo, hi) if spec.log else tune.randint(lo, hi)
    return tune.loguniform(spec.low, spec.high) if spec.log else tune.uniform(spec.low, spec.high)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Flat {dotted run-config key: Tune domain}; a trial's config is {key: sampled value}."""
    grid = sweep.search.algo == "grid"
    return {key: _domain(spec, grid) for key, spec in sweep.space.items()}


def search_algorithm(sweep: SweepConfig) -> Any:
    """bayes: Optuna TPE behind a ConcurrencyLimiter; grid/random: Tune's variant generator."""
    s = sweep.search
    if s.algo == "bayes":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials)
        # Without the limiter TPE would propose every trial before any has finished.
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=s.max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Concurrency is set here: Tune ignores TuneConfig.max_concurrent_trials for a generator.
    return BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=s.seed)


def num_samples(sweep: SweepConfig) -> int:
    return max(sweep.search.num_samples, 1)


def num_trials(sweep: SweepConfig) -> int:
    """Trials the sweep creates in all: a resumed or interrupted sweep is complete at this."""
    if sweep.search.algo != "grid":
        return num_samples(sweep)
    points = 1
    for spec in sweep.space.values():
        points *= len(spec.values)
    return points * num_samples(sweep)


def scheduler(sweep: SweepConfig, epochs: int) -> Any:
    """ASHA or PBT on the per-epoch reports (time axis = the `epoch` the trainer logs), or None
    (FIFO)."""
    if sweep.scheduler == "pbt":
        return pbt_scheduler(sweep, epochs)
    if sweep.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = sweep.asha.max_t or epochs
    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_t,
        grace_period=min(sweep.asha.grace_period, max_t),
        reduction_factor=sweep.asha.reduction_factor,
    )


def pbt_scheduler(sweep: SweepConfig, epochs: int) -> Any:
    """Tune's PopulationBasedTraining; a trial it exploits restarts from the better trial's
    checkpoint with perturbed values, which tune/pbt.py writes into that checkpoint."""
    from ray.tune.schedulers import PopulationBasedTraining

    class FinalEpochPBT(PopulationBasedTraining):
        """Tune's PBT would also exploit at (or from) the last epoch: the trial would restart
        from a finished checkpoint, train nothing and end as a copy of the other trial."""

        def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
            states = [self._trial_state[t] for t in (trial, trial_to_clone)]
            times = [s.last_train_time for s in states]
            times += [(s.last_result or {}).get("epoch", 0) for s in states]
            if max(times) >= epochs:
                return
            super()._exploit(tune_controller, trial, trial_to_clone)

    p = sweep.pbt
    return FinalEpochPBT(
        time_attr="epoch",
        perturbation_interval=p.interval,
        burn_in_period=p.burn_in,
        quantile_fraction=p.quantile_fraction,
        resample_probability=p.resample_probability,
        synch=p.synch,
        # a list mutates to a neighbouring value; a Domain is resampled or scaled x1.2 / x0.8
        hyperparam_mutations={
            key: list(spec.values) if spec.values else _domain(spec, grid=False)
            for key, spec in sweep.space.items()
        },
    )
