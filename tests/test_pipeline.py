"""Pipeline parallelism on CPU: 2 (and 4) gloo ranks (forked, tests/forked_ranks.py) against
single-process runs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.config.schema import ConfigError
from cifar_dist.models import create_model
from cifar_dist.parallel import pipeline
from cifar_dist.train.checkpoint import load_checkpoint
from tests.forked_ranks import run_forked
from tests.parallel_helpers import (
    CNN,
    STEPS,
    Runs,
    assert_fails_on_every_rank,
    assert_same_run,
    overrides,
    runs_fixture,  # noqa: F401  (the `runs` fixture)
)
from tests.test_distributed import ENV, cli_args

pytestmark = pytest.mark.distributed


PP2 = {"parallel.pp": 2, "parallel.microbatches": 4}
CASES = {
    # The CNN clips its gradients (the norm must be global across stages for the clip to agree)
    # and runs channels_last (stage boundaries must still be sent as contiguous tensors).
    "airbench_net-gpipe": ("airbench_net_nano", {"parallel.pp_schedule": "gpipe", **CNN}),
    "airbench_net-1f1b": ("airbench_net_nano", {"parallel.pp_schedule": "1f1b", **CNN}),
    "vit_nano-gpipe": ("vit_nano", {"parallel.pp_schedule": "gpipe"}),
    "vit_nano-1f1b": ("vit_nano", {"parallel.pp_schedule": "1f1b"}),
    "vit_nano-interleaved": (
        "vit_nano",
        {"parallel.pp_schedule": "interleaved_1f1b", "parallel.stages_per_rank": 2},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pp2_matches_single_process(runs: Runs, case: str) -> None:
    """2 stages x 4 micro-batches == 1 process, same global batch of 16, for 10 steps."""
    model, extra = CASES[case]
    single = runs.single(model, **{k: v for k, v in extra.items() if k.startswith("train.")})
    assert_same_run(single, runs.ranks(2, case, model, **PP2, **extra))


def test_dp2_pp2_matches_single_process(runs: Runs) -> None:
    """4 ranks: 2 data-parallel replicas (DDP over the dp group) of a 2-stage 1F1B pipeline."""
    single = runs.single("vit_nano")
    extra = {**PP2, "parallel.microbatches": 2, "parallel.pp_schedule": "1f1b"}
    assert_same_run(single, runs.ranks(4, "dp2pp2", "vit_nano", **extra))


def test_pp_checkpoint_evaluates_in_single_process(runs: Runs) -> None:
    """`cifar-dist eval` merges the per-stage shards into one model; its metrics are the ones
    the pipeline computed at the end of training."""
    from cifar_dist.train.eval_checkpoint import evaluate_checkpoint

    run = runs.ranks(2, "vit_nano-gpipe", "vit_nano", **PP2, **CASES["vit_nano-gpipe"][1])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.pt",
        "pp0",
        "pp1",
        f"step_{STEPS:08d}.pt",
    ]
    shard0 = torch.load(run / "checkpoints/pp0/last.pt", weights_only=True)["model"]
    assert shard0 and all(k.startswith(("embed.", "blocks.")) for k in shard0)  # one stage only
    summary = json.loads((run / "summary.json").read_text())
    res = evaluate_checkpoint(run / "checkpoints/last.pt")
    for split in ("val", "test"):
        assert res[f"{split}_acc"] == summary[f"{split}_acc"]
        assert res[f"{split}_loss"] == pytest.approx(summary[f"{split}_loss"], abs=1e-9)


def test_pp_resume_is_bit_identical(runs: Runs) -> None:
    """5 steps, stop, resume from the manifest + shards: the weights of an uninterrupted run."""
    whole = runs.ranks(2, "vit_nano-gpipe", "vit_nano", **PP2, **CASES["vit_nano-gpipe"][1])
    extra = {**PP2, **CASES["vit_nano-gpipe"][1]}
    runs.ranks(2, "split", "vit_nano", **extra, **{"train.max_steps": 5})
    over = overrides(runs.data, runs.root, "split", "vit_nano", **extra, **{"train.resume": "auto"})
    proc = run_forked(2, "train", *cli_args(over), timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed at epoch 1, step 5" in proc.stdout + proc.stderr
    wa = load_checkpoint(whole / "checkpoints/last.pt")["model"]
    wb = load_checkpoint(runs.root / "split/checkpoints/last.pt")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (
            ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b"]
            + ["--parallel.stages_per_rank=4"],
            "parallel.pp: 8 pipeline stages but the model has only 6 pipeline layers",
        ),
    ],
)
def test_impossible_pipeline_fails_on_every_rank(
    synth_cifar10: Path, tmp_path: Path, extra: list[str], line: str
) -> None:
    assert_fails_on_every_rank(synth_cifar10, tmp_path, extra, line)


# ----- in-process units ------------------------------------------------------------------------
def test_balanced_split_minimises_the_heaviest_stage() -> None:
    assert pipeline.balanced_split([1, 1, 1, 1], 2) == [2]
    assert pipeline.balanced_split([8, 1, 1, 1, 1], 2) == [1]
    assert pipeline.balanced_split([1, 2, 3, 4, 5, 6], 3) == [3, 5]  # 6 | 9 | 6
    model = create_model("resnet18", norm="group")
    bounds = pipeline.stage_bounds(model, 2, [])
    sizes = [
        sum(p.numel() for i in r for p in model.pipeline_layers()[i].parameters()) for r in bounds
    ]
    assert len(bounds) == 2 and max(sizes) < 0.75 * sum(sizes)
    assert pipeline.stage_bounds(model, 2, [3]) == [range(0, 3), range(3, 10)]


def _flop_shares(model: torch.nn.Module, num_stages: int) -> list[float]:
    flops = pipeline.layer_flops(model, torch.zeros(2, 3, 32, 32))
    bounds = pipeline.stage_bounds(model, num_stages, [], flops)
    assert len(bounds) == num_stages
    return [sum(flops[i] for i in r) / sum(flops) for r in bounds]


def test_default_split_balances_compute_not_parameters() -> None:
    model = create_model("resnet18", norm="group")
    two = _flop_shares(model, 2)  # parameter balance gave 86% / 14%
    assert all(0.45 <= s <= 0.55 for s in two), two
    four = _flop_shares(model, 4)  # parameter balance gave 76 / 11 / 14 / 0%
    assert min(four) >= 0.15, four
    # ties go to the earliest cut, the same answer every call
    assert pipeline.balanced_split([1, 1, 1], 2) == [1]
    assert pipeline.balanced_split([2, 1, 1, 2], 3) == [1, 3]


def test_pp_split_names_layers_and_rejects_unknown_ones() -> None:
    model = create_model("resnet18", norm="group")
    assert pipeline.named_split_points(model, ["blocks.4"]) == [5]
    with pytest.raises(ConfigError, match="^parallel.pp_split: 'blocks.9' is not a pipeline"):
        pipeline.named_split_points(model, ["blocks.9"])
    with pytest.raises(ConfigError, match="^parallel.pp_split: .* not in model order"):
        pipeline.named_split_points(model, ["blocks.4", "blocks.2"])
    for over in (
        {"parallel.pp": 2, "parallel.pp_split": ["blocks.2", "blocks.4"]},
        {"parallel.pp": 2, "parallel.pp_split": ["blocks.2"], "parallel.split_points": [3]},
        {"parallel.pp": 2, "parallel.pp_split": ["blocks.2"], "parallel.engine": "deepspeed"},
    ):
        with pytest.raises(ConfigError, match="^parallel.pp_split: "):
            load_config(None, over)


def test_pipeline_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = {
        "parallel.stages_per_rank": {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b"},
        "parallel.split_points": {"parallel.pp": 2, "parallel.split_points": [2, 4]},
        "parallel.microbatches": {"parallel.pp": 4, "parallel.microbatches": 2},
        "train.grad_accum": {"parallel.pp": 2, "train.grad_accum": 2},
        "parallel.sequence_parallel": {
            "parallel.pp": 2,
            "parallel.tp": 2,
            "parallel.sequence_parallel": True,
        },
    }
    for key, over in cases.items():
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_config(None, over)
    with pytest.raises(ConfigError, match="^parallel.split_points: 9 is out of range"):
        pipeline.check_pipeline(create_model("vit_nano"), 2, [9])


def test_batchnorm_under_a_pipeline_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_warned_batchnorm", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.warn_batchnorm(create_model("airbench_net_nano", norm="group"), True)
        assert not caught
        for _ in range(3):
            pipeline.warn_batchnorm(create_model("airbench_net_nano", norm="batch"), True)
    assert len(caught) == 1 and "micro-batch" in str(caught[0].message)
