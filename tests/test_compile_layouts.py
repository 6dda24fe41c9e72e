"""The compile column of the composition matrix, in its own file so that pytest-xdist can run
it beside the other recipe rows (inductor's first compile costs ~30-60 s per process)."""

from __future__ import annotations

import pytest
import torch

from tests.forked_ranks import run_forked
from tests.parallel_helpers import (
    Runs,
    assert_same_run,
    overrides,
    runs_fixture,  # noqa: F401  (the `runs` fixture)
)
from tests.test_distributed import ENV, cli_args, run_torchrun
from tests.test_recipe_layouts import RECIPE, _ema


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ddp_compiled_with_recipe_callbacks_matches_eager_single_process(runs: Runs) -> None:
    """The compile column of the matrix: DDP(torch.compile(model)) on 2 ranks with the whitening
    stem, EMA and Lookahead against the eager single process (float64, so compiled kernels'
    other summation orders stay far below the 1e-5 per-step tolerance). Inductor really ran:
    its cache directory holds the generated kernels."""
    single = runs.single("airbench_net_nano", **RECIPE)
    cache = runs.root / "inductor_cache"
    over = overrides(runs.data, runs.root, "recipe_ddp_compile", "airbench_net_nano", **RECIPE)
    over["train.compile"] = True
    proc = run_torchrun(
        2, "train", *cli_args(over), env={"TORCHINDUCTOR_CACHE_DIR": str(cache)}, timeout=540
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(cache.rglob("*.py")), "no inductor output: the model was not compiled"
    assert_same_run(single, runs.root / "recipe_ddp_compile")
    a, b = _ema(single), _ema(runs.root / "recipe_ddp_compile")
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0, msg=k)


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("name", "layout"),
    [("tp2", {"parallel.tp": 2}), ("fsdp2", {"parallel.dp_mode": "fsdp"})],
    ids=["tp2", "fsdp2"],
)
def test_sharded_compiled_with_recipe_callbacks_matches_eager_single_process(
    runs: Runs, name: str, layout: dict[str, object]
) -> None:
    """The compile column for the sharded layouts: torch.compile over the DTensor net (tp2:
    channel-split convs; fsdp2: parameters sharded over dp) with the whitening stem, EMA and
    Lookahead, against the eager single process. Ranks forked (tests/forked_ranks.py); the DDP
    test above keeps torchrun."""
    single = runs.single("airbench_net_nano", **RECIPE)
    cache = runs.root / f"inductor_cache_{name}"
    run = f"recipe_{name}_compile"
    over = overrides(runs.data, runs.root, run, "airbench_net_nano", **RECIPE, **layout)
    over["train.compile"] = True
    env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    proc = run_forked(2, "train", *cli_args(over), env=env, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(cache.rglob("*.py")), "no inductor output: the model was not compiled"
    assert_same_run(single, runs.root / run)
    a, b = _ema(single), _ema(runs.root / run)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0, msg=k)
