"""Every shipped config runs the way its header says: the smoke matrix (tests/smoke_matrix.py).

`pytest tests/test_config_smoke.py -v` lists each config with its launcher; the module ends
with a table of what ran and how long it took.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest

from cifar_dist.config import load_config
from tests import smoke_matrix as sm

CASES = [(p, launch) for p in sm.config_files() for launch in sm.launches(p)]
IDS = [f"{p.relative_to(sm.CONFIGS)} [{launch.label}]" for p, launch in CASES]
RAN: list[tuple[str, str, float]] = []


# ----- fast: the header convention ------------------------------------------------------------
def test_every_config_has_a_valid_launch_line() -> None:
    """A config without a `# launch:` line (or with one the matrix cannot run) fails here."""
    files = sm.config_files()
    assert len(files) >= 15, files
    for path in files:
        found = sm.launches(path)  # raises on a malformed launch line
        assert found, (
            f"{path}: no '# launch: ...' line in its header comment (see tests/smoke_matrix.py)"
        )
        kinds = {x.kind for x in found}
        if sm.is_sweep(path):
            assert kinds == {"tune"}, f"{path}: a sweep file's launch line is '# launch: tune'"
        else:
            assert "tune" not in kinds, f"{path}: '# launch: tune' is for configs/tune/ files"
        assert len(set(found)) == len(found), f"{path}: repeated launch line"


def test_launch_lines_are_parsed_strictly(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "# a run\n# launch: torchrun --nproc_per_node=4\n# launch: single\ndata: {}\n# launch: tune\n"
    )
    assert sm.launches(good) == [sm.Launch("torchrun", 4), sm.Launch("single")]  # header only
    bad = tmp_path / "bad.yaml"
    bad.write_text("# launch: torchrun -n 2\ndata: {}\n")
    with pytest.raises(ValueError, match="unknown launch line"):
        sm.launches(bad)


def test_every_config_loads() -> None:
    from cifar_dist.tune import load_sweep

    for path in sm.config_files():
        if sm.is_sweep(path):
            load_sweep(path)
        else:
            load_config(path)


# ----- slow: the matrix -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic CIFAR-10 and CIFAR-100 files and their array stores, written once."""
    from cifar_dist.data import prepare_store, write_synthetic

    root = tmp_path_factory.mktemp("smoke_data")
    for dataset in ("cifar10", "cifar100"):
        write_synthetic(root, dataset, n_train=sm.SYNTH_TRAIN, n_test=sm.SYNTH_TEST, seed=0)
        prepare_store(load_config(None, {"data.dir": str(root), "data.dataset": dataset}).data)
    return root


@pytest.fixture(scope="module", autouse=True)
def _table(request: pytest.FixtureRequest) -> object:
    yield
    if RAN:
        width = max(len(x[0]) for x in RAN)
        lines = ["", "config smoke matrix (this machine, not a benchmark):"]
        lines += [f"  {c:<{width}}  {how:<28} {s:6.1f} s" for c, how, s in RAN]
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():  # shown without -s
            print("\n".join(lines), flush=True)


@pytest.fixture(scope="module")
def ray_session() -> object:
    """One Ray runtime for every sweep config: `cifar-dist tune` joins a running Ray instead of
    starting its own (tune/driver.py), which saves a process start and a ray.init per file. The
    smoke environment is set before ray.init so the trial processes inherit it."""
    import ray

    saved = dict(os.environ)
    os.environ.update(sm.ENV)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _run_sweep_in_process(argv: list[str]) -> int:
    """`cifar-dist tune -c FILE ...` through the CLI's own main(), inside the Ray session (the
    console entry point and a fresh process are tested in tests/test_tune.py)."""
    from cifar_dist.cli import main

    assert argv[1:4] == ["-m", "cifar_dist", "tune"], argv
    return main(argv[3:])


def _skip_without(launch: sm.Launch) -> None:
    need = {"deepspeed": "deepspeed", "tune": "ray"}.get(launch.kind)
    if need and importlib.util.find_spec(need) is None:
        pytest.skip(f"{need} is not installed (the '{launch.kind}' extra)")


def _check_run(run_dir: Path, launch: sm.Launch) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2, summary  # one epoch of 2 optimiser steps, as shortened
    assert summary["world_size"] == launch.nproc, summary
    scores = [v for k, v in summary.items() if k.endswith(("_acc", "_loss"))]
    assert scores and all(math.isfinite(v) for v in scores), summary


def _check_sweep(sweep_root: Path) -> None:
    (sweep_dir,) = [p for p in sweep_root.iterdir() if p.is_dir()]
    with (sweep_dir / "sweep_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed"], rows


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("path", "launch"), CASES, ids=IDS)
def test_config_runs_as_its_header_says(
    path: Path, launch: sm.Launch, smoke_data: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _skip_without(launch)
    if launch.kind == "tune":
        request.getfixturevalue("ray_session")
        argv, _ = sm.command(path, launch, sm.shorten_tune(path, smoke_data, tmp_path / "sweeps"))
        t0 = time.monotonic()
        assert _run_sweep_in_process(argv) == 0, " ".join(argv)
        took = time.monotonic() - t0
        _check_sweep(tmp_path / "sweeps")
        RAN.append((str(path.relative_to(sm.CONFIGS)), launch.label, took))
        return
    args = sm.shorten_train(load_config(path), smoke_data, tmp_path, "run", launch.nproc)
    argv, env = sm.command(path, launch, args)
    t0 = time.monotonic()
    proc = sm.run(argv, env, timeout=240)
    took = time.monotonic() - t0
    assert proc.returncode == 0, (
        f"{' '.join(argv)}\n----- stdout -----\n{proc.stdout[-2000:]}\n"
        f"----- stderr -----\n{proc.stderr[-6000:]}"
    )
    _check_run(tmp_path / "run", launch)
    RAN.append((str(path.relative_to(sm.CONFIGS)), launch.label, took))


@pytest.mark.distributed
def test_too_small_dataset_is_one_line_from_rank_0(smoke_data: Path, tmp_path: Path) -> None:
    """configs/vit_pp2.yaml on fewer images than its global batch (512): one line naming
    data.batch_size, printed by rank 0 only, no Python traceback from any rank."""
    path = sm.CONFIGS / "vit_pp2.yaml"
    argv, env = sm.command(path, sm.Launch("torchrun", 2), [])
    over = [f"--data.dir={smoke_data}", "--data.val_size=32", f"--log.dir={tmp_path}"]
    proc = sm.run([*argv, *over], env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [x for x in out.splitlines() if "cifar-dist: error:" in x]
    assert lines == [
        "cifar-dist: error: data.batch_size: 512 is more than the 224 images of the train "
        "split (fewer than one global batch); lower data.batch_size or use more data"
    ], out[-3000:]
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-3000:]
