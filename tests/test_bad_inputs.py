"""The bad-input catalogue: each fault ends in ONE line naming the problem, never a traceback,
and never damages what was there (docs/distributed.md, "Failure handling")."""

from __future__ import annotations

import errno
import io
import sys
from pathlib import Path

import pytest
import torch

from cifar_dist.cli import main
from cifar_dist.config import load_config
from cifar_dist.train.checkpoint import load_checkpoint, step_checkpoints
from cifar_dist.train.fit import fit
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _argv(over: dict[str, object]) -> list[str]:
    return ["train", *(f"--{k}={v}" for k, v in over.items())]


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_model_fails_at_load_before_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    over = tiny_overrides(data, runs, **{"model.name": "resnet19", "data.synthetic": 100})
    assert main(_argv(over)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("cifar-dist: error: model.name: unknown model 'resnet19' (known: ")
    assert "resnet18" in line and "airbench_net" in line
    assert not data.exists() and not runs.exists()  # nothing was prepared or written


# module hidden (None in sys.modules: `import` fails, find_spec finds nothing) -> argv -> extra
EXTRAS = {
    "ffcv": (["ffcv"], ["--data.loader=ffcv"], "ffcv"),
    "deepspeed": (["deepspeed"], ["--parallel.engine=deepspeed"], "deepspeed"),
    "ray": (["ray", "ray.tune", "ray.train", "ray.train.torch", "optuna"], None, "tune"),
    "onnx": (["onnx", "onnxscript", "onnxruntime"], None, "compress"),
}


@pytest.mark.parametrize("missing", sorted(EXTRAS))
def test_missing_extra_names_what_to_install(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    modules, flags, extra = EXTRAS[missing]
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)
    data = tmp_path / "data"
    if missing == "ray":
        argv = ["tune", "-c", str(REPO / "configs/tune/debug_grid.yaml")]
    elif missing == "onnx":
        argv = ["compress", "--checkpoint", str(tmp_path / "last.pt"), "--export", "onnx"]
    else:
        argv = _argv(tiny_overrides(data, tmp_path / "runs", **{"data.synthetic": 100})) + flags
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"pip install 'cifar-dist[{extra}]'" in line, line
    assert not data.exists()  # checked at load, before any data work


def _fault_over(data: Path, runs: Path, name: str, **extra: object) -> dict[str, object]:
    return tiny_overrides(
        data,
        runs,
        **{
            "model.name": "airbench_net_nano",
            "model.norm": "batch",
            "train.epochs": 2,
            "train.ckpt_every_steps": 5,
            "log.name": name,
            **extra,
        },
    )


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(
    synth_cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """last.pt (= step 20, a hard link) truncated: naming it is one line; resume=auto says so in
    one line, continues from step 15 and still ends with the uninterrupted run's weights."""
    fit(load_config(None, _fault_over(synth_cifar10, tmp_path, "whole")))
    fit(load_config(None, _fault_over(synth_cifar10, tmp_path, "split", **{"train.max_steps": 20})))
    ckpts = tmp_path / "split/checkpoints"
    assert [p.name for p in step_checkpoints(ckpts)] == ["step_00000015.pt", "step_00000020.pt"]
    last = ckpts / "last.pt"
    with last.open("r+b") as f:  # truncated in place, as by a crash or a full disk
        f.truncate(last.stat().st_size // 2)
    capsys.readouterr()

    over = _fault_over(synth_cifar10, tmp_path, "split", **{"train.resume": str(last)})
    assert main(_argv(over)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"cifar-dist: error: checkpoint {last}: unreadable"), line

    res = fit(
        load_config(None, _fault_over(synth_cifar10, tmp_path, "split", **{"train.resume": "auto"}))
    )
    out = capsys.readouterr()
    warning = _one_error_line(out.err)
    assert "step_00000020.pt: unreadable" in warning and "older checkpoint" in warning
    assert "resumed at epoch 2, step 15" in out.out
    assert (res["start_step"], res["steps_this_run"]) == (15, 15)
    whole = load_checkpoint(tmp_path / "whole/checkpoints/last.pt")["model"]
    split = load_checkpoint(last)["model"]
    for k, v in whole.items():
        assert torch.equal(v, split[k]), k


def test_disk_full_while_checkpointing_keeps_the_previous_one(
    synth_cifar10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The 2nd checkpoint's file fills the disk after 4 KiB (ENOSPC from write(), under
    torch.save's own writer): one line naming the file; the previous checkpoint (step 5) is
    intact and still last.pt; no temp file is left behind."""

    class FullDisk(io.FileIO):
        written = 0

        def write(self, b: bytes) -> int:  # type: ignore[override]
            FullDisk.written += len(b)
            if FullDisk.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    real_open = Path.open

    def open_(self: Path, mode: str = "r", *a: object, **k: object):  # noqa: ANN202
        if self.name.startswith(".step_00000010.pt") and "w" in mode:
            return FullDisk(str(self), "wb")
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", open_)
    over = _fault_over(synth_cifar10, tmp_path, "full", **{"train.max_steps": 12})
    assert main(_argv(over)) == 2
    line = _one_error_line(capsys.readouterr().err)
    path = tmp_path / "full/checkpoints/step_00000010.pt"
    assert line == (
        f"cifar-dist: error: checkpoint {path}: write failed (No space left on device); "
        "the previous checkpoint is intact"
    )
    ckpts = tmp_path / "full/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_00000005.pt"]
    assert load_checkpoint(ckpts / "last.pt")["train_state"]["step"] == 5


def test_read_only_data_dir_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Canonical files in a data dir that cannot be written (EROFS, simulated: the tests run as
    root, for whom chmod does not block writes): the array store cannot be built there."""
    from cifar_dist.data import arrays, write_synthetic

    ro = tmp_path / "ro"
    write_synthetic(ro, "cifar10", n_train=100, n_test=20, seed=0)
    real_open = open

    def ro_open(file: object, mode: str = "r", *a: object, **k: object):  # noqa: ANN202
        if str(file).startswith(str(ro)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(arrays, "open", ro_open, raising=False)
    assert main(_argv(tiny_overrides(ro, tmp_path / "runs"))) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Read-only file system" in line and str(ro) in line and "data.dir" in line, line
    assert not (ro / "cifar10").exists()


def test_unwritable_log_dir_names_the_key(
    synth_cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """log.dir below a regular file: one line naming log.dir and the OS's reason."""
    (tmp_path / "file").write_text("")
    assert main(_argv(tiny_overrides(synth_cifar10, tmp_path / "file" / "runs"))) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("cifar-dist: error: log.dir: cannot write the run directory"), line
    assert "Not a directory" in line, line


# Imported by every rank at interpreter start-up (sitecustomize on PYTHONPATH): the disk fills
# while rank 0 writes the step-10 checkpoint.
FULL_DISK_SITE = """
import errno, io, pathlib

class _FullDisk(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")

_open = pathlib.Path.open

def _open_full(self, mode="r", *a, **k):
    if self.name.startswith(".step_00000010.pt") and "w" in mode:
        return _FullDisk(str(self), "wb")
    return _open(self, mode, *a, **k)

pathlib.Path.open = _open_full
"""


@pytest.mark.distributed
def test_disk_full_stops_every_rank(synth_cifar10: Path, tmp_path: Path) -> None:
    """2 ranks, rank 0's checkpoint write fails: both ranks stop with one line each (rank 1 is
    told through an all-reduce) instead of rank 1 waiting in its next collective."""
    from tests.test_distributed import cli_args, run_torchrun

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK_SITE)
    over = _fault_over(synth_cifar10, tmp_path, "full", **{"train.max_steps": 12})
    proc = run_torchrun(
        2,
        "train",
        *cli_args(over),
        env={"PYTHONPATH": f"{site}:{REPO}"},
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    path = tmp_path / "full/checkpoints/step_00000010.pt"
    assert out.count(f"cifar-dist: error: checkpoint {path}: write failed (No space") == 1, out
    assert out.count("cifar-dist: error: checkpoint at step 10: rank 0 could not write it") == 1
    assert load_checkpoint(tmp_path / "full/checkpoints/last.pt")["train_state"]["step"] == 5
