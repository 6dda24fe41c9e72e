"""Tensor parallelism (DTensor) on CPU: 2 and 4 gloo ranks (forked) against one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_dist.config.schema import ConfigError, ParallelConfig
from cifar_dist.parallel.mesh import ParallelDims
from tests.parallel_helpers import (
    CNN,
    Runs,
    assert_fails_on_every_rank,
    assert_same_run,
    runs_fixture,  # noqa: F401  (the `runs` fixture)
)

pytestmark = pytest.mark.distributed


# Augmentation is on in these runs (Runs' overrides): the tp peers of a replica must draw the
# same crops and flips, i.e. the loaders shard and seed by the dp coordinate, not the rank.
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_vit_matches_single_process(runs: Runs, sequence_parallel: bool) -> None:
    """Heads, MLP units (and with SP the 65 tokens, unevenly) split over 2 ranks."""
    single = runs.single("vit_nano")
    extra = {"parallel.tp": 2, "parallel.sequence_parallel": sequence_parallel}
    name = f"tp2_sp{int(sequence_parallel)}"
    assert_same_run(single, runs.ranks(2, name, "vit_nano", **extra))


def test_dp2_tp2_vit_matches_single_process(runs: Runs) -> None:
    """2x2 mesh: TP inside each replica, FSDP2 over dp (dp_mode auto), clipping on: the
    gradient norm spans the 2-D (dp, tp) shards."""
    single = runs.single("vit_nano", **{"train.clip_norm": 0.5})
    extra = {"parallel.tp": 2, "parallel.dp": 2, "train.clip_norm": 0.5}
    assert_same_run(single, runs.ranks(4, "dp2tp2", "vit_nano", **extra))


def test_tp2_cnn_classifier_matches_single_process(runs: Runs) -> None:
    """The CNN plan (channel-split conv pairs, row-wise parallel classifier)."""
    single = runs.single("airbench_net_nano", **CNN)  # shared with the pipeline tests
    assert_same_run(
        single, runs.ranks(2, "tp2_cnn", "airbench_net_nano", **CNN, **{"parallel.tp": 2})
    )


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (
            ["--model.name=vit_tiny", "--parallel.tp=2"],
            "parallel.tp: 2 does not divide the ViT's 3 attention heads",
        ),
        (["--parallel.dp=2", "--parallel.tp=2"], "parallel: dp*tp*pp = 2*2*1 = 4 != world size 2"),
    ],
    ids=["heads", "mesh-size"],
)
def test_impossible_tp_fails_on_every_rank(
    synth_cifar10: Path, tmp_path: Path, extra: list[str], line: str
) -> None:
    assert_fails_on_every_rank(synth_cifar10, tmp_path, extra, line)


# ----- in-process units ------------------------------------------------------------------------
def test_mesh_layout_and_dp_mode() -> None:
    dims = ParallelDims.from_config(ParallelConfig(tp=2), 8)
    assert (dims.dp, dims.tp, dims.pp, dims.dp_mode) == (4, 2, 1, "fsdp")  # auto: fsdp with tp
    assert ParallelDims.from_config(ParallelConfig(pp=2), 8).dp_mode == "ddp"
    with pytest.raises(ConfigError, match="^parallel.dp_mode: ddp cannot"):
        ParallelDims.from_config(ParallelConfig(tp=2, dp_mode="ddp"), 4)
    assert ParallelDims.from_config(ParallelConfig(tp=2, dp_mode="ddp"), 2).dp == 1  # no dp: fine
    # row-major over (pp, dp, tp), the layout init_device_mesh gives to the same shape
    dims = ParallelDims(dp=2, tp=2, pp=2, world_size=8)
    coords = [tuple(dims.coords(r)) for r in range(8)]
    assert coords[:3] == [(0, 0, 0), (0, 0, 1), (0, 1, 0)] and coords[4] == (1, 0, 0)
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(8))


def test_tp_plan_checks_name_the_problem() -> None:
    from cifar_dist.models import create_model
    from cifar_dist.parallel.tensor import check_tp

    check_tp(create_model("vit_small"), 2)  # 6 heads
    with pytest.raises(ConfigError, match="^parallel.tp: 4 does not divide the ViT's 6"):
        check_tp(create_model("vit_small"), 4)
    check_tp(create_model("seed_cnn"), 4)
    with pytest.raises(
        ConfigError, match="^parallel.tp: 3 does not divide the 64 channels of blocks.0.conv1$"
    ):
        check_tp(create_model("resnet18"), 3)
