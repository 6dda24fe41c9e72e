"""Recipe callbacks (whitening stem + bias freeze, EMA, Lookahead) under tensor and pipeline
parallelism, which refused them before, and FSDP2 (which the old recipe trainer silently left
without full-state checkpoints): 2 and 4 gloo ranks (dp x pp, dp x tp, tp x pp) against one
process with the same options, most runs stopped mid-epoch and resumed from their
checkpoints. The compile column: test_compile_layouts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.config.schema import ConfigError
from cifar_dist.train.callbacks.base import like_live
from cifar_dist.train.checkpoint import load_checkpoint
from tests.parallel_helpers import (
    Runs,
    assert_same_run,
    runs_fixture,  # noqa: F401  (the `runs` fixture)
)

# 150 training images / 16 = 9 steps per epoch: the 10 steps cross an epoch end (Lookahead
# syncs, EMA weights are evaluated), the stem's bias freezes at step 3, Lookahead averages at
# steps 3, 6, 9 and EMA after every step. 100 validation images, not the 450 left beside the 150
# (evaluation through a 4-rank pipeline costs ~1 s per 100 images here).
RECIPE: dict[str, object] = {
    "data.val_size": 100,
    "data.subset": 150,
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
    ("name", "nproc", "layout"),
    [
        ("tp2", 2, {"parallel.tp": 2}),
        ("pp2", 2, {"parallel.pp": 2}),
        ("fsdp2", 2, {"parallel.dp_mode": "fsdp"}),
        ("dp2xpp2", 4, {"parallel.pp": 2}),  # DDP over 2 replicas of a 2-stage pipeline
        ("dp2xtp2", 4, {"parallel.tp": 2, "parallel.dp": 2}),  # 2 replicas of a tp2 split
    ],
    ids=["tp2", "pp2", "fsdp2", "dp2xpp2", "dp2xtp2"],
)
def test_recipe_callbacks_match_single_process(
    runs: Runs, name: str, nproc: int, layout: dict[str, object]
) -> None:
    single = runs.single("airbench_net_nano", **RECIPE)
    # Stopped after step 5 (mid-epoch, after the bias freeze and Lookahead's first average)
    # and resumed: weights, optimiser, EMA and Lookahead state go through the checkpoint.
    # dp2 x pp2 writes the pipeline's shard format that pp2 (and tp2 x pp2 below) resume from:
    # it runs straight through (4 ranks on 2 cores: a restart costs the most there).
    if name in ("dp2xpp2", "dp2xtp2"):
        other = runs.ranks(nproc, f"recipe_{name}", "airbench_net_nano", **RECIPE, **layout)
    else:
        other = runs.resumed(nproc, f"recipe_{name}", "airbench_net_nano", 5, **RECIPE, **layout)
    assert_same_run(single, other)  # per-step loss and grad norm, final (Lookahead) weights
    a, b = _ema(single), _ema(other)
    assert a.keys() == b.keys() and int(a["n_averaged"]) == int(b["n_averaged"]) == 10
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0, msg=k)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (single, other))
    assert sb["val_loss"] == pytest.approx(sa["val_loss"], abs=1e-6)  # evaluated with EMA
    if name in ("pp2", "dp2xpp2"):  # each pipeline rank averaged only its own stages' tensors
        shards = load_checkpoint(other / "checkpoints/last.pt")["shard_states"]
        k0, k1 = (set(s["ema"]) - {"n_averaged"} for s in shards)
        assert k0 and k1 and not k0 & k1 and k0 | k1 == set(a) - {"n_averaged"}
    if name == "fsdp2":  # the parameters really were sharded (parallel.json, each rank's view)
        rep = json.loads((other / "parallel.json").read_text())
        r0, r1 = rep["ranks"]
        replicated = r0["local"] - r0["sharded_local"]
        assert rep["mesh"]["dp_mode"] == "fsdp" and replicated == r1["local"] - r1["sharded_local"]
        assert replicated + r0["sharded_local"] + r1["sharded_local"] == rep["params_total"]
        assert max(r0["local"], r1["local"]) < 0.6 * rep["params_total"]
    if name == "dp2xtp2":  # FSDP2 over dp of the tp-split convs: each rank holds ~1/4
        rep = json.loads((other / "parallel.json").read_text())
        assert rep["mesh"]["dp"] == rep["mesh"]["tp"] == 2 and rep["mesh"]["dp_mode"] == "fsdp"
        assert [(r["dp"], r["tp"]) for r in rep["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert max(r["local"] for r in rep["ranks"]) < 0.3 * rep["params_total"], rep["ranks"]


def test_deepspeed_refusals_say_why() -> None:
    """What DeepSpeed cannot run is refused at config load, in one line naming the key (EMA
    itself runs with ZeRO 0-2: test_deepspeed.py::test_zero_ema_matches_ddp)."""
    ds = {"parallel.engine": "deepspeed"}
    refused = [
        ({"train.lookahead_every": 2}, "train.lookahead_every", "DeepSpeed"),
        (
            {"model.whiten_init": 64, "model.name": "airbench_net_nano"},
            "model.whiten_init",
            "DeepSpeed",
        ),
        ({"train.ema_decay": 0.9, "deepspeed.zero_stage": 3}, "train.ema_decay", "ZeRO-3"),
        ({"train.ema_decay": 0.9, "parallel.pp": 2}, "train.ema_decay", "pipeline engine"),
    ]
    for over, key, why in refused:
        with pytest.raises(ConfigError, match=rf"^{key}: .*{why}"):
            load_config(None, {**ds, **over})
    for stage in (0, 1, 2):
        load_config(None, {**ds, "train.ema_decay": 0.9, "deepspeed.zero_stage": stage})


@pytest.mark.distributed
def test_tp2_pp2_vit_with_ema_and_lookahead_matches_single_process(runs: Runs) -> None:
    """tp x pp on the 3-D mesh: each of 2 pipeline stages split over 2 tensor-parallel ranks
    (4 gloo ranks) with the declared ViT plan applied stage by stage; EMA and Lookahead on.
    Stopped after 5 steps (mid-epoch, after Lookahead's first average) and resumed: the shards'
    full tensors re-sharded into the DTensor weights, optimiser state, EMA and Lookahead."""
    recipe = {k: v for k, v in RECIPE.items() if not k.startswith("model.whiten")}
    single = runs.single("vit_nano", **recipe)
    layout = {"parallel.tp": 2, "parallel.pp": 2}
    other = runs.resumed(4, "vit_tp2pp2", "vit_nano", 5, **recipe, **layout)
    assert_same_run(single, other)
    a, b = _ema(single), _ema(other)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0, msg=k)
    # The pipeline split: each pipeline rank's shard file holds only its stage's layers (the
    # tensor-parallel split of a stage: test_tp_plan_applies_stage_by_stage).
    shards = load_checkpoint(other / "checkpoints/last.pt")["shard_states"]
    k0, k1 = (set(s["model"]) for s in shards)
    whole = load_checkpoint(single / "checkpoints/last.pt")["model"]
    assert k0 and k1 and not k0 & k1 and k0 | k1 == set(whole)


def test_tp_plan_applies_stage_by_stage() -> None:
    """pp rank 0 of a tp2 x pp2 ViT: its stage carries the model's plan renamed to the stage's
    layers, and parallelize() shards exactly those (local shapes halved), on a fake 4-rank
    process group (no communication: placements and shapes only)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from cifar_dist.models import create_model
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.parallel.parallelize import parallelize
    from cifar_dist.parallel.pipeline import plan_pipeline

    cfg = load_config(None, {"model.name": "vit_nano", "parallel.tp": 2, "parallel.pp": 2})
    dist.init_process_group("fake", rank=0, world_size=4, store=FakeStore())
    try:
        dims = ParallelDims.from_config(cfg.parallel, 4, "cpu")
        plan = plan_pipeline(
            create_model("vit_nano"), 0, 2, cfg.parallel, torch.zeros(4, 3, 32, 32)
        )
        stage = plan.modules[0]
        styles = stage.tensor_parallel_plan()
        assert (
            styles["layers.1.attn.q"] == "colwise" and styles["layers.1.mlp.fc2"] == "rowwise_seq"
        )
        assert not any(k.startswith(f"layers.{len(stage.layers)}") for k in styles)
        parallelize(stage, dims, cfg, torch.device("cpu"))
        q = stage.layers[1].attn.q.weight
        fc2 = stage.layers[1].mlp.fc2.weight
        assert isinstance(q, DTensor) and q.placements == (Shard(0),)
        assert q.to_local().shape[0] * 2 == q.shape[0]
        assert fc2.placements == (Shard(1),) and fc2.to_local().shape[1] * 2 == fc2.shape[1]
        assert not isinstance(stage.layers[0].patch.weight, DTensor)  # the embedding: whole
        # A checkpoint's full tensor goes back as this rank's (tp rank 0's) shard.
        full = torch.arange(q.numel(), dtype=q.dtype).view(q.shape)
        torch.testing.assert_close(like_live(full, q).to_local(), full.chunk(2, dim=0)[0])
    finally:
        dist.destroy_process_group()
