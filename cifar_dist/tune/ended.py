"""Which trials ended on their own: the difference between a finished and an interrupted sweep.

After a SIGINT/SIGUSR1 stop Tune returns normally, and the trials it was running end up
TERMINATED like finished ones (its clean-up stops them), so neither the ResultGrid nor the trial
statuses tell them apart; a trial's final `done` result may also be missing from a restored
experiment. Tune calls on_trial_complete / on_trial_error only when a trial ends on its own
(completed, stopped by ASHA, failed for good), not when the clean-up stops it: this callback
appends those trial ids to a file in the sweep directory, which a resumed sweep extends (Tune
restores the callback with the rest of the run config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

FILE_NAME = "trials_ended.txt"


class EndedTrials(Callback):
    def __init__(self, sweep_dir: Path) -> None:
        self.path = str(sweep_dir / FILE_NAME)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._add(trial.trial_id)

    def _add(self, trial_id: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trial_id}\n")


def ended_trials(sweep_dir: Path) -> set[str]:
    path = sweep_dir / FILE_NAME
    return set(path.read_text().split()) if path.is_file() else set()
