"""Channel-split CNN tensor parallelism: placements, per-rank parameters and FLOPs, and two
gloo ranks against one process (forked from the test process, small images, float64)."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.flop_counter import FlopCounterMode

from cifar_dist.config.schema import ConfigError
from cifar_dist.models import create_model
from cifar_dist.parallel.tensor import check_tp
from cifar_dist.train.checkpoint import load_checkpoint
from tests.conftest import leave_spawned_worker
from tests.forked_ranks import free_port, run_forked
from tests.parallel_helpers import (
    CNN,
    Runs,
    overrides,
    runs_fixture,  # noqa: F401  (the `runs` fixture)
)
from tests.test_distributed import ENV, cli_args

TP = 2
STEPS = 3
# airbench needs >= 16 px (three 2x pools after the 2x2 stem); 16 px keeps the test fast.
IMAGE = 16


def _conv_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs of every convolution, by module name (without the root class prefix)."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        conv = sum(n for op, n in ops.items() if "convolution" in str(op))
        if conv and "." in name:
            out[name.split(".", 1)[1]] = conv
    return out


def _split_params(model: nn.Module, plan: dict[str, str]) -> tuple[int, int]:
    """(on this rank, in the model) parameter counts of the modules the plan splits."""
    local = total = 0
    for fqn in plan:
        for p in model.get_submodule(fqn).parameters(recurse=False):
            local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
            total += p.numel()
    return local, total


def _check_layout(tp_model: nn.Module, single: nn.Module, x: torch.Tensor) -> None:
    plan = single.tensor_parallel_plan()
    for fqn, style in plan.items():
        mod, ref = tp_model.get_submodule(fqn), single.get_submodule(fqn)
        w = mod.weight
        assert isinstance(w, DTensor), fqn
        dim = {"colwise": 0, "split_norm": 0, "rowwise": 1, "rowwise_whole": 1}[style]
        assert w.placements == (Shard(dim),), (fqn, w.placements)
        shape = list(ref.weight.shape)
        shape[dim] //= TP
        assert list(w.to_local().shape) == shape, (fqn, w.to_local().shape)
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.running_mean.to_local().shape == (ref.num_features // TP,)
    local, total = _split_params(tp_model, plan)
    # 1/tp, up to the replicated biases of row-parallel linears (10 logits' worth).
    assert 0 <= local - total / TP <= 10, (local, total)
    # Per-rank conv FLOPs: 1/tp for every split conv, whole for the replicated ones.
    tp_flops, ref_flops = _conv_flops(tp_model, x), _conv_flops(single, x)
    assert tp_flops.keys() == ref_flops.keys()
    convs = {k for k in ref_flops if isinstance(single.get_submodule(k), nn.Conv2d)}
    ref_flops = {k: n for k, n in ref_flops.items() if k in convs}
    for name, n in ref_flops.items():
        split = plan.get(name) in ("colwise", "rowwise")
        assert tp_flops[name] * (TP if split else 1) == n, (name, tp_flops[name], n)
    split_share = sum(n for k, n in ref_flops.items() if k in plan) / sum(ref_flops.values())
    assert split_share > 0.5  # the split convs are most of the network's compute


def _worker(rank: int, port: int, model_name: str, norm: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from cifar_dist.parallel.tensor import apply_tp

        torch.manual_seed(0)
        single = create_model(model_name, norm=norm).double()
        tp_model = apply_tp(copy.deepcopy(single), init_device_mesh("cpu", (TP,)), False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, IMAGE, IMAGE, dtype=torch.float64, generator=gen)
        _check_layout(tp_model, single, x)
        _compare_steps(single, tp_model, gen)
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


def _compare_steps(single: nn.Module, tp_model: nn.Module, gen: torch.Generator) -> None:
    """A few SGD steps on both; losses and every gradient (gathered) agree within 1e-6."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (single, tp_model)]
    for _ in range(STEPS):
        x = torch.randn(8, 3, IMAGE, IMAGE, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        losses = []
        for model, opt in zip((single, tp_model), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-6, losses
        for (name, p), q in zip(single.named_parameters(), tp_model.parameters()):
            g = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=0, msg=name)
        for opt in opts:
            opt.step()
    ref, got = single.state_dict(), tp_model.state_dict()
    for k, v in ref.items():  # weights and BatchNorm running statistics after the steps
        w = got[k].full_tensor() if isinstance(got[k], DTensor) else got[k]
        torch.testing.assert_close(w.to(v.dtype), v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("model_name", "norm"),
    [("airbench_net_nano", "batch"), ("resnet18", "group"), ("preact_resnet18", "batch")],
)
def test_cnn_tp2_splits_channels_and_matches_single(model_name: str, norm: str) -> None:
    """Split conv weights are Shard(0)/Shard(1) DTensors of 1/tp the channels, their per-rank
    parameters and FLOPs are 1/tp, and 2 gloo ranks train like one process."""
    ctx = mp.start_processes(
        _worker, args=(free_port(), model_name, norm), nprocs=TP, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 180
    # join returns False while a rank is still running (it wakes when any one exits).
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("tensor-parallel workers did not finish in 180 s")


def test_groupnorm_straddling_shards_is_one_line_error() -> None:
    """model.groups=1 gives 1-group GroupNorms: a tp=2 channel split would cut the group."""
    check_tp(create_model("airbench_net", norm="group", groups=8), TP)
    with pytest.raises(ConfigError, match=r"^model.groups: GroupNorm blocks.0.2 has 1 groups") as e:
        check_tp(create_model("airbench_net", norm="group", groups=1), TP)
    assert "\n" not in str(e.value)
    check_tp(create_model("seed_cnn"), 4)


@pytest.mark.distributed
def test_dp2_tp2_cnn_resumes_to_single_process_weights(runs: Runs) -> None:
    """The training path on a 2x2 (dp, tp) mesh (FSDP2 over dp, channel-split convs over tp):
    5 steps, stop, resume from the full-state checkpoint for 5 more: the single process's
    weights after 10 steps. The parallel run is channels_last (weights made contiguous for
    FSDP2, which refuses non-contiguous parameters; the images stay channels_last)."""
    clip = {"train.clip_norm": CNN["train.clip_norm"]}
    single = runs.single("airbench_net_nano", **clip)
    extra = {**clip, "parallel.tp": 2, "parallel.dp": 2, "train.channels_last": True}
    runs.ranks(4, "dp2tp2_cnn", "airbench_net_nano", **extra, **{"train.max_steps": 5})
    over = overrides(
        runs.data, runs.root, "dp2tp2_cnn", "airbench_net_nano", **extra, **{"train.resume": "auto"}
    )
    proc = run_forked(4, "train", *cli_args(over), timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed at epoch 1, step 5" in proc.stdout + proc.stderr
    wa = load_checkpoint(single / "checkpoints/last.pt")["model"]
    wb = load_checkpoint(runs.root / "dp2tp2_cnn/checkpoints/last.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wa[k], wb[k], atol=1e-8, rtol=0, msg=k)
