"""Recipe callbacks (whitening stem + bias freeze, EMA, Lookahead) under tensor and pipeline
parallelism, which refused them before: 2 gloo ranks against one process with the same options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.config.schema import ConfigError
from cifar_dist.train.checkpoint import load_checkpoint
from tests.parallel_helpers import (
    Runs,
    assert_same_run,
    runs_fixture,  # noqa: F401  (the `runs` fixture)
)

# 150 training images / 16 = 9 steps per epoch: the 10 steps cross an epoch end (Lookahead
# syncs, EMA weights are evaluated), the stem's bias freezes at step 3, Lookahead averages at
# steps 3, 6, 9 and EMA after every step.
RECIPE: dict[str, object] = {
    "data.val_size": 450,
    "train.epochs": 2,
    "model.whiten_init": 64,
    "model.whiten_bias_epochs": 0.3,
    "train.ema_decay": 0.8,
    "train.lookahead_every": 3,
}


def _ema(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints/last.pt")["ema"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "layout"),
    [("tp2", {"parallel.tp": 2}), ("pp2", {"parallel.pp": 2})],
    ids=["tp2", "pp2"],
)
def test_recipe_callbacks_match_single_process(
    runs: Runs, name: str, layout: dict[str, object]
) -> None:
    single = runs.single("airbench_net", **RECIPE)
    other = runs.torchrun(2, f"recipe_{name}", "airbench_net", **RECIPE, **layout)
    assert_same_run(single, other)  # per-step loss and grad norm, final (Lookahead) weights
    a, b = _ema(single), _ema(other)
    assert a.keys() == b.keys() and int(a["n_averaged"]) == int(b["n_averaged"]) == 10
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0, msg=k)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (single, other))
    assert sb["val_loss"] == pytest.approx(sa["val_loss"], abs=1e-6)  # evaluated with EMA
    if name == "pp2":  # each pipeline rank averaged only its own stages' tensors
        shards = load_checkpoint(other / "checkpoints/last.pt")["shard_states"]
        k0, k1 = (set(s["ema"]) - {"n_averaged"} for s in shards)
        assert k0 and k1 and not k0 & k1 and k0 | k1 == set(a) - {"n_averaged"}


def test_deepspeed_refusals_say_why() -> None:
    for key, value in (("train.ema_decay", 0.9), ("train.lookahead_every", 2)):
        with pytest.raises(ConfigError, match=rf"^{key}: .*DeepSpeed"):
            load_config(None, {"parallel.engine": "deepspeed", key: value})
