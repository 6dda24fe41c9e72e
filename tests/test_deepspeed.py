"""DeepSpeed on CPU (its CPU accelerator + gloo): ZeRO vs DDP, resume, consolidation, pipeline.

Every 2-rank job runs once per module (fixtures) and several tests read its run directory.
DeepSpeed's shared-memory CPU kernel is never built (see cifar_dist/deepspeed/runtime.py), so no test
pays a JIT compilation; optimisers are torch's (DeepSpeed's FusedAdam would JIT-build too).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.models import create_model
from cifar_dist.train.checkpoint import load_checkpoint
from cifar_dist.train.fit import fit
from tests.conftest import tiny_overrides
from tests.forked_ranks import run_forked
from tests.test_distributed import ENV, cli_args, run_deepspeed_script, run_torchrun, step_losses

ROOT = Path(__file__).resolve().parents[1]
needs_ds = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (the 'deepspeed' extra: DS_BUILD_OPS=0 pip install -e '.[deepspeed]')",
)
pytestmark = pytest.mark.distributed
DS = {"parallel.engine": "deepspeed"}


def _over(data: Path, runs: Path, name: str, **extra: object) -> dict[str, object]:
    """10 optimiser steps of 2 micro-batches (global batch 32)."""
    return tiny_overrides(
        data,
        runs,
        **{
            "log.name": name,
            "log.every_steps": 1,
            "train.max_steps": 10,
            "train.grad_accum": 2,
            "optim.momentum": 0.9,
            **extra,
        },
    )


def _grad_norms(run_dir: Path) -> list[float]:
    return [
        json.loads(x)["step/grad_norm"] for x in (run_dir / "steps.jsonl").read_text().splitlines()
    ]


def _summary(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())


def _check(proc: subprocess.CompletedProcess) -> None:
    # A string message: pytest prints it whole (a tuple's repr is cut to one line).
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n----- stderr -----\n{proc.stderr[-6000:]}"


# --- ZeRO-0/1/2 against DDP -----------------------------------------------------------------
# The ViT with clipping on (grad norms 2.5-10, clip 1.0: every step is clipped), so the
# comparison also covers gradient clipping through DeepSpeed's config.
ZERO_RUN = {"model.name": "vit_nano", "train.clip_norm": 1.0}
# EMA on in the DDP, ZeRO-1 and ZeRO-2 runs (it changes no step): test_zero_ema_matches_ddp.
EMA = {"train.ema_decay": 0.8}


@pytest.fixture(scope="module")
def runs(synth_cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ds_runs")


@pytest.fixture(scope="module")
def ddp_run(synth_cifar10: Path, runs: Path) -> Path:
    over = _over(synth_cifar10, runs, "ddp", **ZERO_RUN, **EMA)
    _check(run_forked(2, "train", *cli_args(over), env=ENV))
    return runs / "ddp"


@pytest.fixture(scope="module")
def zero1_run(synth_cifar10: Path, runs: Path) -> Path:
    """ZeRO-1 through launch/deepspeed.sh, i.e. DeepSpeed's own launcher (`--num_gpus 2`)."""
    over = _over(
        synth_cifar10, runs, "zero1", **ZERO_RUN, **EMA, **DS, **{"deepspeed.zero_stage": 1}
    )
    proc = run_deepspeed_script(over)
    _check(proc)
    assert "--module cifar_dist train" in proc.stderr  # the launcher line the script echoes
    return runs / "zero1"


@pytest.fixture(scope="module")
def zero0_run(synth_cifar10: Path, runs: Path) -> Path:
    """The DeepSpeed engine without ZeRO partitioning (stage 0), on forked ranks."""
    extra = {**ZERO_RUN, **EMA, **DS, "deepspeed.zero_stage": 0}
    _check(run_forked(2, "train", *cli_args(_over(synth_cifar10, runs, "zero0", **extra)), env=ENV))
    return runs / "zero0"


@pytest.fixture(scope="module")
def zero2_run(synth_cifar10: Path, runs: Path) -> Path:
    """ZeRO-2 on forked ranks (torchrun's environment), checkpointing every 5 steps (the resume
    test restarts at 5)."""
    extra = {**ZERO_RUN, **EMA, **DS, "deepspeed.zero_stage": 2, "train.ckpt_every_steps": 5}
    _check(run_forked(2, "train", *cli_args(_over(synth_cifar10, runs, "zero2", **extra)), env=ENV))
    return runs / "zero2"


# Tolerance: DDP and ZeRO see bitwise-identical data and initial weights and, with 2 ranks,
# sum the same two gradient values (one exactly rounded addition either way). What differs:
# DeepSpeed divides by the world size before or after that sum and computes the clipping norm
# in float64, where torch's clip_grad_norm_ accumulates in float32 (on vit_tiny's 590k-element
# weights the float32 norm was off by ~1e-5 relative). That changes the clip factor in the
# 5th digit; the ViT does not amplify it (max |loss difference| over 10 steps: ~3e-7 on
# vit_tiny, 0.9e-7 / 1.5e-7 for ZeRO-1 / ZeRO-2 on vit_nano, which these tests now use).
# 1e-5 leaves >30x headroom and is far below what a real mistake does: no clipping, a wrong
# accumulation scale or a missing gradient reduction change the loss by > 1e-2 within 3 steps.
# (The ReLU/max-pool CNNs amplify such 1e-5 clip differences ~10x per step, hence the ViT.)
LOSS_TOL = 1e-5
NORM_RTOL = 1e-4  # the logged pre-clip norms: float32 vs float64 accumulation (~1e-5)


@needs_ds
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_matches_ddp(request: pytest.FixtureRequest, ddp_run: Path, stage: int) -> None:
    zero = request.getfixturevalue(f"zero{stage}_run")
    a, b = step_losses(ddp_run), step_losses(zero)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) <= LOSS_TOL, (a, b)
    assert b[-1] < b[0] - 0.3  # and it trains
    na, nb = _grad_norms(ddp_run), _grad_norms(zero)
    assert min(na) > 1.0  # clipping was active on every step
    assert all(abs(x - y) <= NORM_RTOL * x for x, y in zip(na, nb)), (na, nb)
    # The JSON DeepSpeed ran with is saved with the run and encodes the run's config.
    ds_json = json.loads((zero / "ds_config.json").read_text())
    assert ds_json["zero_optimization"]["stage"] == stage
    assert ds_json["train_micro_batch_size_per_gpu"] == 8  # 32 / (2 ranks x 2 micro-batches)
    assert ds_json["gradient_clipping"] == 1.0


@needs_ds
def test_zero2_resume_continues_the_same_curve(
    synth_cifar10: Path, runs: Path, zero2_run: Path
) -> None:
    """Restart from ZeRO-2's step-5 checkpoint (copied, `latest` pointed at it): steps 6-10
    repeat the uninterrupted run's losses (same ranks, deterministic kernels)."""
    resumed = runs / "zero2_resumed"
    shutil.copytree(zero2_run / "checkpoints", resumed / "checkpoints")
    assert (resumed / "checkpoints/step_00000005").is_dir()
    (resumed / "checkpoints/latest").write_text("step_00000005")
    extra = {**ZERO_RUN, **EMA, **DS, "deepspeed.zero_stage": 2, "train.resume": "auto"}
    proc = run_forked(
        2, "train", *cli_args(_over(synth_cifar10, runs, resumed.name, **extra)), env=ENV
    )
    _check(proc)
    assert "resumed at epoch 1, step 5" in proc.stdout + proc.stderr
    after = [json.loads(x) for x in (resumed / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [6, 7, 8, 9, 10]
    full = step_losses(zero2_run)[5:]
    assert max(abs(r["step/loss"] - f) for r, f in zip(after, full)) <= 1e-6, (after, full)
    # The EMA went through the checkpoint's client state and went on averaging.
    a, b = (_ema(r / "checkpoints/step_00000010") for r in (zero2_run, resumed))
    assert int(b["n_averaged"]) == 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def _ema(tag_dir: Path) -> dict[str, torch.Tensor]:
    from cifar_dist.deepspeed.checkpoint import client_state

    return client_state(tag_dir)["ema"]


@needs_ds
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_ema_matches_ddp(request: pytest.FixtureRequest, ddp_run: Path, stage: int) -> None:
    """EMA with ZeRO: every rank averages the whole updated module after each applied step,
    in float32; the average equals DDP's (same tolerance reasoning as the losses) and the run
    is evaluated with it (its val loss is DDP's, EMA-evaluated too)."""
    zero = request.getfixturevalue(f"zero{stage}_run")
    ddp = load_checkpoint(ddp_run / "checkpoints/last.pt")["ema"]
    ours = _ema(zero / "checkpoints/step_00000010")
    assert ours.keys() == ddp.keys() and int(ours["n_averaged"]) == int(ddp["n_averaged"]) == 10
    raw = load_checkpoint(ddp_run / "checkpoints/last.pt")["model"]
    moved = 0
    for k, v in ddp.items():
        if k != "n_averaged" and v.is_floating_point():
            assert ours[k].dtype == torch.float32
            torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=0, msg=k)
            moved += not torch.equal(v, raw[k.removeprefix("module.")])
    assert moved  # the average is not the raw final weights
    assert _summary(zero)["val_loss"] == pytest.approx(_summary(ddp_run)["val_loss"], abs=1e-4)


@needs_ds
def test_bf16_engine_tracks_fp32_ddp_with_a_float32_ema(
    synth_cifar10: Path, runs: Path, ddp_run: Path
) -> None:
    """DeepSpeed's bf16 mode, asked for explicitly (train.amp=auto picks none on CPUs without
    native bf16, so this is its CPU coverage): ZeRO-2 with bf16 weights and fp32 master
    weights follows fp32 DDP's losses within 5e-3 over 10 steps (9.4e-4 measured on an AVX2
    EPYC), and the EMA, kept in float32, is DDP's within 1e-2 (1.9e-3 measured; EMA and raw
    weights differ by ~0.05 there, so an EMA of the wrong tensors would fail)."""
    extra = {**ZERO_RUN, **EMA, **DS, "deepspeed.zero_stage": 2, "train.amp": "bf16"}
    over = _over(synth_cifar10, runs, "zero2_bf16", **extra)
    _check(run_forked(2, "train", *cli_args(over), env=ENV))
    run = runs / "zero2_bf16"
    assert json.loads((run / "ds_config.json").read_text())["bf16"]["enabled"] is True
    a, b = step_losses(ddp_run), step_losses(run)
    loss_gap = max(abs(x - y) for x, y in zip(a, b))
    assert len(b) == 10 and loss_gap < 5e-3, (a, b)
    ours = _ema(run / "checkpoints/step_00000010")
    ref = load_checkpoint(ddp_run / "checkpoints/last.pt")["ema"]
    assert int(ours["n_averaged"]) == 10
    ema_gap = 0.0
    for k, v in ref.items():
        if k != "n_averaged" and v.is_floating_point():
            assert ours[k].dtype == torch.float32, k
            torch.testing.assert_close(ours[k], v, atol=1e-2, rtol=0, msg=k)
            ema_gap = max(ema_gap, float((ours[k] - v).abs().max()))
    print(f"bf16 ZeRO-2 vs fp32 DDP: max |loss gap| {loss_gap:.2g}, max |EMA gap| {ema_gap:.2g}")


def _optimizer_state_numel(path: Path) -> int:
    """Elements of the optimiser state (momentum buffers) in one rank's ZeRO checkpoint file."""
    # DeepSpeed's own files pickle its LossScaler and enums: weights_only=True cannot load them.
    opt = torch.load(path, weights_only=False, map_location="cpu")["optimizer_state_dict"]
    inner = opt.get("base_optimizer_state") or opt["optimizer_state_dict"]  # ZeRO-1/2 | ZeRO-3
    return sum(t.numel() for s in inner["state"].values() for t in s.values() if torch.is_tensor(t))


@needs_ds
@pytest.mark.timeout(300)
def test_zero_1_2_3_split_the_optimizer_state_across_ranks(
    synth_cifar10: Path, runs: Path, ddp_run: Path, zero1_run: Path, zero2_run: Path
) -> None:
    """Each of the 2 ranks holds the momentum of ~1/2 of the parameters (DDP holds all), in the
    checkpoint shards and in parallel.json; ZeRO-3 also holds ~1/2 of the parameters."""
    extra = {**ZERO_RUN, **DS, "deepspeed.zero_stage": 3, "train.max_steps": 2}
    over = _over(synth_cifar10, runs, "zero3", **{**extra, "train.ckpt_every_steps": 2})
    _check(run_forked(2, "train", *cli_args(over), timeout=240, env=ENV))
    params = sum(p.numel() for p in create_model("vit_nano").parameters())
    for step in (
        zero1_run / "checkpoints/step_00000010",
        zero2_run / "checkpoints/step_00000010",
        runs / "zero3/checkpoints/step_00000002",
    ):
        held = [
            _optimizer_state_numel(step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
            for r in (0, 1)
        ]
        for n in held:  # half each, up to DeepSpeed's alignment padding
            assert abs(n - params / 2) <= 0.01 * params, (step, held, params)
        assert sum(held) >= params
    whole = json.loads((ddp_run / "parallel.json").read_text())["ranks"][0]
    for run, stage in ((zero1_run, 1), (zero2_run, 2), (runs / "zero3", 3)):
        rep = json.loads((run / "parallel.json").read_text())
        assert rep["mesh"]["engine"] == "deepspeed" and rep["mesh"]["zero_stage"] == stage
        for r in rep["ranks"]:
            padding = r["optimizer_state_bytes"] - whole["optimizer_state_bytes"] / 2
            assert 0 <= padding <= 0.01 * whole["optimizer_state_bytes"], (stage, r)
            if stage < 3:  # whole parameters on every rank
                assert r["local"] == params and r["sharded_local"] == 0, r
            else:  # ZeRO-3: the rank's partition of the parameters
                assert r["local"] == r["sharded_local"], r
                assert abs(r["local"] - params / 2) <= 0.01 * params, r


@needs_ds
def test_consolidated_zero_checkpoint_evaluates_like_the_run(zero2_run: Path) -> None:
    """ZeRO-2 shards -> one plain file (weights_only) -> `cifar-dist eval` gives the metrics
    the run itself reported with its final weights."""
    from cifar_dist.train.eval_checkpoint import evaluate_checkpoint

    proc = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "ds-consolidate", str(zero2_run / "checkpoints")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "PYTHONPATH": str(ROOT)},
    )
    _check(proc)
    out = zero2_run / "checkpoints/consolidated-step_00000010.pt"
    plain = load_checkpoint(out)  # weights_only=True
    assert plain["train_state"]["step"] == 10
    assert all(v.dtype == torch.float32 for v in plain["model"].values() if v.is_floating_point())
    summary = _summary(zero2_run)
    for source in (out, zero2_run / "checkpoints"):  # the file, and the directory directly
        res = evaluate_checkpoint(source)
        assert res["val_acc"] == pytest.approx(summary["val_acc"], abs=1e-9)
        assert res["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
        assert res["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-5)


def _run_single(over: dict[str, object]) -> subprocess.CompletedProcess:
    """One process (DeepSpeed gets a private world of one), in a subprocess: DeepSpeed keeps
    process-wide state that should not leak into the test process."""
    return subprocess.run(
        [sys.executable, "-m", "cifar_dist", "train", *cli_args(over)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "PYTHONPATH": str(ROOT)},
    )


@needs_ds
def test_deepspeed_builds_optimizer_and_schedule_from_the_json(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    """deepspeed.optimizer/scheduler=deepspeed: DeepSpeed's AdamW and WarmupCosineLR from the
    generated JSON (torch_adam via a user JSON: FusedAdam would JIT-build for ~80 s on CPU)."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    user = tmp_path / "torch_adam.json"
    user.write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    over = _over(synth_cifar10, tmp_path, "dsopt", **DS)
    over.update({"model.name": "airbench_net_nano", "train.grad_accum": 1, "train.epochs": 2})
    over["train.max_steps"] = 6
    over["optim.name"] = "adamw"
    over.update({"optim.lr": 2e-3, "schedule.name": "cosine", "schedule.warmup_epochs": 0.2})
    over.update({"deepspeed.optimizer": "deepspeed", "deepspeed.scheduler": "deepspeed"})
    _check(_run_single({**over, "deepspeed.config": str(user), "deepspeed.zero_stage": 2}))
    ds_json = json.loads((tmp_path / "dsopt/ds_config.json").read_text())
    assert ds_json["optimizer"]["type"] == "AdamW" and ds_json["optimizer"]["params"]["torch_adam"]
    sched = ds_json["scheduler"]
    assert sched["type"] == "WarmupCosineLR" and sched["params"]["total_num_steps"] == 30
    opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=2e-3)
    ref = WarmupCosineLR(opt, **sched["params"])
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        ref.step()
    logged = [
        json.loads(x)["step/lr"] for x in (tmp_path / "dsopt/steps.jsonl").read_text().splitlines()
    ]
    assert logged == pytest.approx(expected, rel=1e-9)
    losses = step_losses(tmp_path / "dsopt")
    assert losses[-1] < losses[1]  # step 1 runs at lr 0 (WarmupCosineLR starts there)


@needs_ds
def test_nonfinite_steps_stop_a_deepspeed_run(synth_cifar10: Path, tmp_path: Path) -> None:
    """Stage 0 (DeepSpeed applies every update; our norm hook sees the NaN gradients)."""
    over = tiny_overrides(synth_cifar10, tmp_path, **DS, **{"model.name": "airbench_net_nano"})
    over.update({"optim.lr": 1e30, "optim.momentum": 0.0, "train.max_nonfinite": 3})
    over["deepspeed.zero_stage"] = 0
    proc = _run_single(over)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "3 consecutive non-finite" in proc.stderr and "Traceback" not in proc.stderr


# --- the pipeline engine ------------------------------------------------------------------
PIPE_RUN = {"model.name": "airbench_net", "model.norm": "group"}


@needs_ds
def test_pipeline_two_stages_matches_single_process(
    synth_cifar10: Path, runs: Path, tmp_path: Path
) -> None:
    """DeepSpeed's pipeline engine, 2 stages x 2 micro-batches of 16, ZeRO-1, GroupNorm CNN,
    against one process taking the same 2 micro-batches per step: the same computation."""
    fit(load_config(None, _over(synth_cifar10, runs, "single", **PIPE_RUN)))
    extra = {**PIPE_RUN, **DS, "parallel.pp": 2, "deepspeed.zero_stage": 1}
    _check(run_forked(2, "train", *cli_args(_over(synth_cifar10, runs, "pipe", **extra)), env=ENV))
    a, b = step_losses(runs / "single"), step_losses(runs / "pipe")
    assert len(a) == len(b) == 10
    # No clipping here (see LOSS_TOL), so both sides apply the same averaged gradients; the
    # logged step loss (mean of the 2 micro-batch losses) is summed in another order: observed
    # <= 1.2e-7. 1e-5 leaves ~100x headroom; a wrong stage hand-off or micro-batch
    # accumulation is off by > 1e-2 from step 2.
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert sum(b[-3:]) / 3 < sum(b[:3]) / 3 - 0.2  # it learns
    na, nb = _grad_norms(runs / "single"), _grad_norms(runs / "pipe")
    assert all(abs(x - y) <= NORM_RTOL * x for x, y in zip(na, nb)), (na, nb)
    pipe = _summary(runs / "pipe")
    assert pipe["samples_per_s"] > 0 and pipe["params"] == _summary(runs / "single")["params"]
    from cifar_dist.train.eval_checkpoint import evaluate_checkpoint

    res = evaluate_checkpoint(runs / "pipe/checkpoints")  # per-layer files -> the plain model
    assert res["val_loss"] == pytest.approx(pipe["val_loss"], abs=1e-5)
    assert res["val_acc"] == pytest.approx(pipe["val_acc"], abs=1e-9)


def test_pipeline_refuses_zero2_with_one_line(synth_cifar10: Path, tmp_path: Path) -> None:
    over = tiny_overrides(synth_cifar10, tmp_path, **DS, **{"parallel.pp": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "train", *cli_args(over), "--deepspeed.zero_stage=2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == [
        "cifar-dist: error: deepspeed.zero_stage: DeepSpeed's pipeline engine (parallel.pp=2) "
        "supports ZeRO stage 0 or 1 only, got 2 (ZeRO-2/3 shard gradients/parameters that the "
        "pipeline schedule accumulates across micro-batches)"
    ], proc.stderr
    assert not (tmp_path / "t").exists()  # refused before any run directory was made


@needs_ds
def test_pipeline_stages_with_different_param_groups_stop_with_one_line(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    """seed_cnn split by parameter count: stage 0 (conv blocks) has weight, vector and
    norm-bias groups, stage 1 (the MLP head) no norm biases. DeepSpeed's ZeRO-1 all-reduces the
    gradient norm once per group, so that run hung in its first step (configs/ds_pipe2.yaml
    did); now every rank stops before the engine, rank 0 printing one line."""
    extra = {**DS, "parallel.pp": 2, "model.name": "seed_cnn", "deepspeed.zero_stage": 1}
    over = tiny_overrides(synth_cifar10, tmp_path, **extra, **{"deepspeed.partition": "parameters"})
    proc = run_torchrun(2, "train", *cli_args(over), timeout=180)
    assert proc.returncode != 0
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "cifar-dist: error:" in x]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(
        "cifar-dist: error: deepspeed.partition: 'parameters' gives the pipeline stages "
        "different optimizer parameter groups (stage 0: weights, vectors, norm_bias; "
        "stage 1: weights, vectors)"
    ), lines


def test_fp16_on_cpu_is_refused_before_deepspeed_starts(
    synth_cifar10: Path, tmp_path: Path
) -> None:
    from cifar_dist.config import ConfigError

    over = tiny_overrides(synth_cifar10, tmp_path, **DS, **{"train.amp": "fp16"})
    with pytest.raises(ConfigError, match=r"^train\.amp: fp16 needs a GPU"):
        fit(load_config(None, {**over, "train.device": "auto"}))  # found when CUDA is absent
    with pytest.raises(ConfigError, match=r"^train\.amp: fp16 needs a GPU"):
        load_config(None, {**over, "train.device": "cpu"})  # found at load


@needs_ds
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_no_extension_was_built(tmp_path: Path) -> None:
    """The CPU path builds no DeepSpeed op: a fresh TORCH_EXTENSIONS_DIR stays empty."""
    code = (
        "import torch; from cifar_dist.deepspeed.runtime import prepare_runtime;"
        "prepare_runtime(torch.device('cpu')); from deepspeed.comm import comm;"
        "print(comm.cdb.shm_comm_op)"
    )
    ext = tmp_path / "ext"
    env = {**ENV, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    _check(proc)
    assert proc.stdout.strip().splitlines()[-1] == "None"
    assert not ext.exists() or not any(ext.rglob("*.so"))
