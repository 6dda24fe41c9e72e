import math
from pathlib import Path

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cifar_dist.train.optim import build_optimizer, build_scheduler, scaled_lr


def _lrs(name: str, steps: int = 100, **kw: object) -> list[float]:
    cfg = load_config(None, {f"schedule.{k}": v for k, v in kw.items()} | {"schedule.name": name})
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, cfg.optim, 128)
    sched = build_scheduler(opt, cfg.schedule, steps_per_epoch=10, epochs=steps // 10)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warmup_shape() -> None:
    lrs = _lrs("cosine", warmup_epochs=2.0)
    assert lrs[0] < 0.1 * 0.1  # starts near zero
    assert lrs[20] == pytest.approx(0.1, rel=1e-6)  # peak after 20 warmup steps
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # then non-increasing
    assert lrs[-1] < 0.01


def test_onecycle_peaks_at_pct_start() -> None:
    lrs = _lrs("onecycle", pct_start=0.3)
    assert max(range(100), key=lrs.__getitem__) in (29, 30)
    assert max(lrs) == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize("name", ["onecycle", "cosine", "triangle", "multistep"])
def test_schedules_survive_very_short_runs(name: str) -> None:
    for total in range(1, 7):  # e.g. a tiny dataset: a handful of steps in the whole run
        cfg = load_config(None, {"schedule.name": name})
        opt = build_optimizer(torch.nn.Linear(4, 2), cfg.optim, 128)
        sched = build_scheduler(opt, cfg.schedule, steps_per_epoch=total, epochs=1)
        for _ in range(total):
            assert math.isfinite(opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"] > 0
            opt.step()
            sched.step()


def test_multistep_drops() -> None:
    lrs = _lrs("multistep", warmup_epochs=0.0, milestones=[0.5], gamma=0.1)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01)


def test_lr_scaling_rules() -> None:
    cfg = load_config(None, ["--optim.lr_scaling=linear", "--optim.base_batch_size=128"])
    assert scaled_lr(cfg.optim, 512) == pytest.approx(0.4)
    cfg = load_config(None, ["--optim.lr_scaling=sqrt", "--optim.base_batch_size=128"])
    assert scaled_lr(cfg.optim, 512) == pytest.approx(0.2)


def test_no_weight_decay_on_vectors() -> None:
    cfg = load_config(None, ["--optim.weight_decay=0.1"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, cfg.optim, 128)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((3,), v)}, "train_state": {"step": int(v)}}


def test_atomic_checkpoints_and_latest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.pt", "step_00000002.pt", "step_00000003.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.full((3,), 3.0))
    # A corrupt newest file (and a leftover temp file) is never picked.
    (tmp_path / "step_00000004.pt").write_bytes(b"garbage, half written")
    (tmp_path / ".step_00000005.pt.123.tmp").write_bytes(b"partial")
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step_00000003.pt" and state["train_state"]["step"] == 3


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, 1)
    data = (tmp_path / "step_00000001.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"unreadable \(truncated or corrupt: ") as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(e.value) and len(str(e.value)) < 250, str(e.value)
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"unreadable \(not a torch checkpoint, or a corrupt"):
        load_checkpoint(tmp_path / "text.pt")


def test_pickled_code_is_refused_by_weights_only(tmp_path: Path) -> None:
    """One line naming the refused object, without torch's advice to load unsafely."""
    torch.save({"model": {}, "evil": math.floor}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "evil.pt")
    msg = str(e.value)
    assert msg.endswith(
        "unreadable (holds a Python object weights_only=True refuses: "
        "Unsupported global: GLOBAL math.floor)"
    ), msg
    assert "\n" not in msg and "weights_only` set to `False`" not in msg
