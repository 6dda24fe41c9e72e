"""Ray Tune sweeps over the run config: `cifar-dist tune -c configs/tune/lr_bs_bayes.yaml`.

config.py (typed sweep file), load.py (YAML + overrides, checked against the run config),
space.py (Tune domains, searcher, ASHA), report.py (per-epoch reports + checkpoints),
trainable.py (a trial = one `fit`), driver.py (the Tuner, --resume), results.py (CSV, plots,
best YAML), summary.py (printed lines, W&B summary run), pbt.py (PBT's checkpoint adoption),
ended.py (which trials ended on their own: interrupted vs finished).
Ray is imported only when a sweep runs.
"""

from cifar_dist.tune.config import SweepConfig, SweepError
from cifar_dist.tune.load import load_sweep

__all__ = ["SweepConfig", "SweepError", "load_sweep"]
