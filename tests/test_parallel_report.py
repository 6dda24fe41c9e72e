"""parallel.json: what each rank really holds, checked on runs the pipeline and tensor-parallel
tests already make (the `runs` cache: run with them, these tests spawn nothing new)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cifar_dist.models import create_model
from cifar_dist.parallel import pipeline
from cifar_dist.parallel.report import REPORT_FILE, summary_line
from tests.parallel_helpers import CNN, Runs, runs_fixture  # noqa: F401  (the `runs` fixture)
from tests.test_pipeline import CASES, PP2


def report(run_dir: Path) -> dict[str, Any]:
    rep = json.loads((run_dir / REPORT_FILE).read_text())
    assert set(rep) >= {"mesh", "params_total", "ranks", "pp_stage_flop_share"}
    assert set(rep["mesh"]) >= {"world", "dp", "tp", "pp", "dp_mode", "engine"}
    assert rep["mesh"]["world"] == len(rep["ranks"])
    assert rep["comm_bytes_per_step"] >= 0
    for i, r in enumerate(rep["ranks"]):
        assert r["rank"] == i
        assert {"pp", "dp", "tp", "local", "local_bytes", "sharded_local"} <= set(r)
        assert r["local_bytes"] == r["local"] * rep["bytes_per_element"]
        # written at the end of the run by every rank
        assert r["peak_memory_bytes"] > 2**20 and r["optimizer_state_bytes"] > 0
    return rep


def test_single_process_holds_the_whole_model(runs: Runs) -> None:
    run = runs.single("airbench_net_nano", **CNN)  # shared with the pipeline and TP tests
    rep = report(run)
    total = sum(p.numel() for p in create_model("airbench_net_nano", norm="group").parameters())
    (r,) = rep["ranks"]
    assert rep["params_total"] == r["local"] == total and r["sharded_local"] == 0
    assert rep["comm_bytes_per_step"] == 0 and rep["mesh"]["world"] == 1
    assert rep["bytes_per_element"] == 8  # the run is float64
    # momentum SGD: one buffer per parameter
    assert r["optimizer_state_bytes"] == r["local_bytes"]
    assert summary_line(rep).startswith("parallel: world 1 = dp 1 x tp 1 x pp 1 (ddp, torch)")


@pytest.mark.distributed
def test_cnn_tp2_ranks_each_hold_half_of_the_split_layers(runs: Runs) -> None:
    run = runs.ranks(2, "tp2_cnn", "airbench_net_nano", **CNN, **{"parallel.tp": 2})
    rep = report(run)
    a, b = rep["ranks"]
    assert (a["tp"], b["tp"]) == (0, 1)
    assert a["sharded_local"] == b["sharded_local"] > 0
    replicated = a["local"] - a["sharded_local"]
    assert replicated == b["local"] - b["sharded_local"]
    # every split parameter counted once over the ranks, every replicated one once per rank
    assert replicated + a["sharded_local"] + b["sharded_local"] == rep["params_total"]
    assert replicated < 0.05 * rep["params_total"]  # the convolutions really are split
    assert rep["comm_bytes_per_step"] > 0
    # momentum buffers follow the shards
    assert a["optimizer_state_bytes"] == a["local_bytes"]


@pytest.mark.distributed
def test_pp2_stage_flop_shares_match_the_plan(runs: Runs) -> None:
    model_name, extra = CASES["airbench_net-1f1b"]
    run = runs.ranks(2, "airbench_net-1f1b", model_name, **PP2, **extra)
    rep = report(run)
    model = create_model(model_name, norm="group").double()
    flops = pipeline.layer_flops(model, torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    bounds = pipeline.stage_bounds(model, 2, [], flops)
    assert rep["pp_stage_bounds"] == [[r.start, r.stop] for r in bounds]
    shares = rep["pp_stage_flop_share"]
    assert sum(shares) == pytest.approx(1.0)
    assert shares == pytest.approx([sum(flops[i] for i in r) / sum(flops) for r in bounds])
    layers = model.pipeline_layers()
    for i, (r, stage) in enumerate(zip(rep["ranks"], bounds)):
        assert r["pp"] == i
        assert r["local"] == sum(p.numel() for i in stage for p in layers[i].parameters())
    assert sum(r["local"] for r in rep["ranks"]) == rep["params_total"]


def test_comm_bytes_ddp_is_one_ring_all_reduce_and_fsdp_three_passes() -> None:
    from cifar_dist.config.schema import ParallelConfig
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.parallel.report import comm_bytes

    model = create_model("seed_cnn")
    n = sum(p.numel() for p in model.parameters())
    ddp = ParallelDims.from_config(ParallelConfig(), 4)
    fsdp = ParallelDims.from_config(ParallelConfig(dp_mode="fsdp"), 4)
    assert comm_bytes(model, ddp, 16) == 2 * 3 / 4 * n * 4  # reduce-scatter + all-gather
    assert comm_bytes(model, fsdp, 16) == 3 * 3 / 4 * n * 4
    assert comm_bytes(model, ParallelDims.from_config(ParallelConfig(), 1), 16) == 0
