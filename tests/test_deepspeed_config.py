"""The DeepSpeed JSON generated from the project config, user JSON overrides, refusals, and
DeepSpeed's schedules against ours. In-process and fast: no process group is started."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cifar_dist.config import ConfigError, load_config
from cifar_dist.deepspeed import ds_json
from cifar_dist.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
needs_ds = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (the 'deepspeed' extra: DS_BUILD_OPS=0 pip install -e '.[deepspeed]')",
)
DS = {"parallel.engine": "deepspeed"}

ROUND_TRIP = [
    # (overrides, dp)
    ({"data.batch_size": 512, "train.grad_accum": 4, "deepspeed.zero_stage": 2}, 8),
    ({"data.batch_size": 96, "train.amp": "bf16", "train.clip_norm": 2.5}, 3),
    ({"data.batch_size": 64, "train.grad_accum": 2, "deepspeed.zero_stage": 3}, 1),
    ({"data.batch_size": 128, "train.amp": "fp16", "train.device": "cuda"}, 2),
    ({"data.batch_size": 32, "parallel.pp": 2, "deepspeed.zero_stage": 0}, 1),
]


@pytest.mark.parametrize(("over", "dp"), ROUND_TRIP)
def test_json_round_trips_the_project_config(over: dict, dp: int) -> None:
    cfg = load_config(None, {**DS, **over})
    ds = ds_json.generate(cfg, dp, steps_per_epoch=100)
    assert ds_json.project_view(ds) == {
        "data.batch_size": cfg.data.batch_size,
        "micro_batch": cfg.data.batch_size // (dp * cfg.train.grad_accum),
        "train.grad_accum": cfg.train.grad_accum,
        "train.clip_norm": cfg.train.clip_norm,
        "train.amp": cfg.train.amp,
        "deepspeed.zero_stage": cfg.deepspeed.zero_stage,
    }
    json.dumps(ds)  # plain JSON, as written to <run>/ds_config.json


@needs_ds
@pytest.mark.parametrize(("over", "dp"), [r for r in ROUND_TRIP if r[1] == 1])
def test_deepspeed_parses_the_json_the_same_way(over: dict, dp: int) -> None:
    """DeepSpeed's own config parser (one process: its world size is 1) reads our values."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, {**DS, **over})
    parsed = DeepSpeedConfig(ds_json.generate(cfg, dp, steps_per_epoch=100))
    assert parsed.train_batch_size == cfg.data.batch_size
    assert parsed.gradient_accumulation_steps == cfg.train.grad_accum
    assert parsed.train_micro_batch_size_per_gpu == cfg.data.batch_size // cfg.train.grad_accum
    assert parsed.gradient_clipping == cfg.train.clip_norm
    assert parsed.bfloat16_config.enabled == (cfg.train.amp == "bf16")
    assert parsed.zero_optimization_stage == cfg.deepspeed.zero_stage


def test_example_user_json_merges_and_owned_keys_are_guarded(tmp_path: Path) -> None:
    example = ROOT / "configs/ds/zero2_tuned.json"
    cfg = load_config(None, {**DS, "deepspeed.zero_stage": 2, "deepspeed.config": str(example)})
    ds = ds_json.build(cfg, dp=2, steps_per_epoch=10)
    user = json.loads(example.read_text())
    assert ds["zero_optimization"]["overlap_comm"] == user["zero_optimization"]["overlap_comm"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 128

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 1024, "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, {**DS, "deepspeed.config": str(bad)})
    with pytest.raises(ConfigError, match=r"sets train_batch_size=1024 .* set data\.batch_size"):
        ds_json.build(cfg, dp=2, steps_per_epoch=10)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=3 .* deepspeed\.zero_stage"):
        ds_json.build(cfg, dp=2, steps_per_epoch=10)
    bad.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True .* set train\.amp"):
        ds_json.build(cfg, dp=2, steps_per_epoch=10)
    bad.write_text(json.dumps({"optimizer": {"type": "Lamb"}}))
    with pytest.raises(ConfigError, match=r"'optimizer' section but deepspeed\.optimizer=torch"):
        ds_json.build(cfg, dp=2, steps_per_epoch=10)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^deepspeed\.config: .*bad\.json is not valid JSON"):
        ds_json.build(cfg, dp=2, steps_per_epoch=10)


REFUSED = [
    (
        {"parallel.pp": 2, "deepspeed.zero_stage": 3},
        r"^deepspeed\.zero_stage: DeepSpeed's pipeline",
    ),
    ({"deepspeed.zero_stage": 4}, r"^deepspeed\.zero_stage: must be 0, 1, 2 or 3"),
    (
        {"train.ema_decay": 0.99, "deepspeed.zero_stage": 3},
        r"^train\.ema_decay: EMA with engine=deepspeed needs the whole module",
    ),
    ({"train.dtype": "float64", "deepspeed.zero_stage": 3}, r"^train\.dtype: float64"),
    ({"parallel.pp": 2, "model.norm": "sync_batch"}, r"^model\.norm: sync_batch cannot"),
    ({"deepspeed.optimizer": "deepspeed"}, r"^deepspeed\.optimizer: DeepSpeed has no sgd"),
    (
        {"deepspeed.scheduler": "deepspeed", "schedule.name": "multistep"},
        r"^deepspeed\.scheduler: DeepSpeed has no multistep",
    ),
    ({"deepspeed.partition": "greedy"}, r"^deepspeed\.partition: must be"),
    ({"train.amp": "fp16", "train.device": "cpu"}, r"^train\.amp: fp16 needs a GPU"),
]


@pytest.mark.parametrize(("over", "message"), REFUSED)
def test_impossible_combinations_fail_at_load(over: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**DS, **over})


def test_deepspeed_optimizer_section_uses_the_project_hyperparameters() -> None:
    cfg = load_config(
        None,
        {
            **DS,
            "optim.name": "adamw",
            "optim.lr": 1e-3,
            "optim.lr_scaling": "linear",
            "data.batch_size": 256,
            "deepspeed.optimizer": "deepspeed",
        },
    )
    opt = ds_json.generate(cfg, dp=2, steps_per_epoch=10)["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"]["lr"] == pytest.approx(2e-3)  # 1e-3 x 256 / 128 (linear scaling)
    assert opt["params"]["betas"] == [0.9, 0.999]


def _lrs(sched: object, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # type: ignore[attr-defined]
    return out


@needs_ds
@pytest.mark.parametrize(
    ("schedule", "tol"),
    # Per-step |lr difference| / peak lr. constant/cosine: DeepSpeed's warm-up starts one step
    # later than torch's LinearLR (one warm-up increment, 1/(W+1) = 1/11 of the peak; its
    # WarmupCosineLR even runs the very first step at lr 0).
    # onecycle: linear instead of cosine ramps (up to 0.105 of the span between them) on a
    # descent to lr/25 instead of ~0: measured 0.15 of the peak.
    [("constant", 1 / 11 + 1e-9), ("cosine", 1 / 11 + 1e-9), ("onecycle", 0.16)],
)
def test_deepspeed_schedules_track_the_project_schedules(schedule: str, tol: float) -> None:
    from deepspeed.runtime import lr_schedules

    over = {**DS, "schedule.name": schedule, "train.epochs": 10, "optim.lr": 0.4}
    if schedule != "onecycle":
        over["schedule.warmup_epochs"] = 1.0
    cfg = load_config(None, {**over, "deepspeed.scheduler": "deepspeed"})
    steps_per_epoch = 10
    section = ds_json.scheduler_section(cfg, steps_per_epoch)
    model = torch.nn.Linear(2, 2)
    ours_opt = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    ours = _lrs(build_scheduler(ours_opt, cfg.schedule, steps_per_epoch, 10), ours_opt, 100)
    ds_opt = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    ds_sched = getattr(lr_schedules, section["type"])(ds_opt, **section["params"])
    theirs = _lrs(ds_sched, ds_opt, 100)
    peak = max(ours)
    # WarmupCosineLR is already one cosine step past its peak when warm-up ends (-3e-4 here).
    assert max(theirs) == pytest.approx(peak, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= tol * peak, (ours, theirs)
    assert ours.index(peak) - 1 <= theirs.index(max(theirs)) <= ours.index(peak) + 1
