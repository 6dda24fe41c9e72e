"""The forked-rank launcher the equivalence tests use (tests/forked_ranks.py) reports failures
and never leaves a rank behind: otherwise a broken launch could pass for a run."""

from __future__ import annotations

import os
import time

from tests.forked_ranks import _wait_all, run_forked
from tests.test_distributed import ENV


def test_a_failing_rank_fails_the_launch_with_each_ranks_line() -> None:
    proc = run_forked(2, "train", "--nope.key=1", env=ENV, timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:]
    errors = [x for x in proc.stdout.splitlines() if "cifar-dist: error: nope: unknown key" in x]
    assert [x.split(":")[0] for x in errors] == ["[rank0]", "[rank1]"], proc.stdout[-2000:]


def test_a_peer_left_waiting_is_killed_after_the_grace_period() -> None:
    """Rank 0 exits with 3 at once; rank 1 would wait a minute (as in a collective): it is
    killed 0.5 s later and the launch reports rank 0's code."""
    pids = []
    for seconds, code in ((0.0, 3), (60.0, 0)):
        pid = os.fork()
        if pid == 0:
            time.sleep(seconds)
            os._exit(code)
        pids.append(pid)
    t0 = time.monotonic()
    codes = _wait_all(pids, timeout=120, grace=0.5)
    assert codes[0] == 3 and codes[1] == -9, codes  # -9: SIGKILL
    assert time.monotonic() - t0 < 10
