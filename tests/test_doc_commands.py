"""The commands in README.md and docs/*.md still work (classification: tests/doc_commands.py).

Fast: every fenced command is classified, the files it names exist, and each `Check` command's
arguments parse and its config loads. Slow: each `Run` command runs, shortened (CPU, synthetic
data, 2 steps), in document order (the README's eval reads the run its train command wrote).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest

from cifar_dist.config import load_config
from tests import doc_commands as dc
from tests import smoke_matrix as sm

COMMANDS = dc.all_commands()
RUNS = [c for c in COMMANDS if isinstance(dc.CLASSIFIED.get(c.text), dc.Run)]
CHECKS = [c for c in COMMANDS if isinstance(dc.CLASSIFIED.get(c.text), dc.Check)]
LAUNCH_SCRIPTS = ("launch/torchrun.sh", "launch/deepspeed.sh")
HELP = {"-h", "--help"}


def cifar_dist_argv(words: list[str]) -> list[str] | None:
    """The `cifar-dist ...` arguments of a command line, whatever launches it."""
    for i, w in enumerate(words):
        if w.endswith("cifar-dist"):
            return words[i + 1 :]
        if w in ("-m", "--module") and words[i + 1 : i + 2] == ["cifar_dist"]:
            return words[i + 2 :]
        if w.endswith(LAUNCH_SCRIPTS):
            return ["train", *words[i + 1 :]]
    return None


def nproc(words: list[str]) -> int:
    for w in words:
        m = re.match(r"^(--nproc[_-]per[_-]node=|NPROC=)(\d+)$", w)
        if m:
            return int(m.group(2))
    return 2 if any(w.endswith(LAUNCH_SCRIPTS) for w in words) else 1  # the scripts' CPU default


def parse(argv: list[str]) -> tuple[object, list[str]]:
    from cifar_dist.cli import build_parser

    try:
        return build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"cifar-dist rejects the arguments: {shlex.join(argv)}")


# ----- fast ---------------------------------------------------------------------------------
def test_every_documented_command_is_classified() -> None:
    """A new fenced command must be added to tests/doc_commands.py CLASSIFIED (one line)."""
    assert len(COMMANDS) >= 40, COMMANDS
    missing = [f"{c.where}: {c.text}" for c in COMMANDS if c.text not in dc.CLASSIFIED]
    assert not missing, "classify these in tests/doc_commands.py (Run/Check/Skip):\n" + "\n".join(
        missing
    )
    stale = sorted(set(dc.CLASSIFIED) - {c.text for c in COMMANDS})
    assert not stale, "no longer in the docs; remove from tests/doc_commands.py:\n" + "\n".join(
        stale
    )


def test_documented_files_exist() -> None:
    missing = [
        f"{c.where}: {p}"
        for c in COMMANDS
        for p in dc.repo_paths(c.text)
        if not (dc.REPO / p).exists()
    ]
    assert not missing, missing


def test_extraction_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shell blocks: every line, comments stripped, continuations joined. Untagged blocks: only
    lines that start like a command. Other languages: nothing."""
    monkeypatch.setattr(dc, "REPO", tmp_path)
    doc = tmp_path / "x.md"
    doc.write_text(
        "```bash\n# a comment\nNPROC=2 launch/torchrun.sh -c a.yaml \\\n  --x=1   # why\n"
        "echo '# not a comment'\n```\n"
        "```\nsweep output: 4 trials\ncifar-dist train -c b.yaml\n```\n"
        "```yaml\ncifar-dist: not a command\n```\n"
    )
    assert [(c.line, c.text) for c in dc.extract(doc)] == [
        (3, "NPROC=2 launch/torchrun.sh -c a.yaml --x=1"),
        (5, "echo '# not a comment'"),
        (9, "cifar-dist train -c b.yaml"),
    ]


def smoke_launch(words: list[str]) -> sm.Launch:
    """The config-smoke launch line a command line corresponds to."""
    if any(w.endswith("launch/deepspeed.sh") or w == "deepspeed" for w in words):
        return sm.Launch("deepspeed", nproc(words))
    if any(w.endswith("launch/torchrun.sh") or w == "torchrun" for w in words):
        return sm.Launch("torchrun", nproc(words))
    argv = cifar_dist_argv(words) or [""]
    return sm.Launch("tune") if argv[0] == "tune" else sm.Launch("single")


def test_commands_said_to_run_in_the_smoke_matrix_do() -> None:
    """Check(SMOKE) is a claim: the config's header has the launch line the command uses."""
    claimed = [c for c in CHECKS if dc.CLASSIFIED[c.text] == dc.Check(dc.SMOKE)]
    assert len(claimed) >= 10, claimed
    for c in claimed:
        words = shlex.split(c.text)
        config = dc.REPO / words[words.index("-c") + 1]
        assert smoke_launch(words) in sm.launches(config), f"{c.where}: {c.text}"


@pytest.mark.parametrize("cmd", CHECKS, ids=[c.where for c in CHECKS])
def test_checked_command_parses_and_loads(cmd: dc.DocCommand) -> None:
    """Commands that cannot run here: the arguments parse and the config/sweep loads."""
    words = shlex.split(cmd.text)
    argv = cifar_dist_argv(words)
    if argv is None:
        assert any(w.startswith("benchmarks/") for w in words), cmd  # --help: the slow test
        return
    if HELP & set(argv):
        return  # argparse would exit; the slow test runs help commands classified Run
    args, rest = parse(argv)
    if args.cmd in ("train", "lr-find"):
        load_config(args.config, rest)
    elif args.cmd == "tune":
        from cifar_dist.tune import load_sweep

        load_sweep(args.config, rest)
    else:  # eval, compress, data, ...: what is left must be config overrides
        from cifar_dist.config.load import parse_overrides

        parse_overrides(rest)


# ----- slow ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def doc_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(temporary root, synthetic data dir, environment): `cifar-dist` on PATH runs this
    checkout; the default data dir is the synthetic one."""
    from cifar_dist.data import prepare_store, write_synthetic

    root = tmp_path_factory.mktemp("doc_commands")
    data = root / "data"
    for dataset in ("cifar10", "cifar100"):
        write_synthetic(data, dataset, n_train=sm.SYNTH_TRAIN, n_test=sm.SYNTH_TEST, seed=0)
        prepare_store(load_config(None, {"data.dir": str(data), "data.dataset": dataset}).data)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "cifar-dist"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cifar_dist "$@"\n')
    shim.chmod(0o755)
    with socket.socket() as s:  # plain `torchrun` (no --standalone) rendezvous on this port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **sm.ENV,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "CIFAR_DIST_DATA": str(data),
        "LOG_DIR": str(root / "torchrun-logs"),
        "PET_MASTER_PORT": str(port),
    }
    return root, data, env


def shortened(cmd: dc.DocCommand, spec: dc.Run, root: Path, data: Path) -> str:
    """The command with its paths moved under `root` and the shortening arguments appended."""
    # One pass: `runs/...` (relative) and `/tmp/...` both move under root.
    text = re.sub(r"(?<![\w/.])(runs/|/tmp/)", lambda m: f"{root}/{m[1].strip('/')}/", cmd.text)
    words = shlex.split(cmd.text)
    argv = cifar_dist_argv(words) or []
    if HELP & set(argv):
        return " ".join([text, spec.extra]).strip()
    args, rest = parse(argv) if argv else (None, [])
    extra: list[str] = []
    sub = getattr(args, "cmd", None)
    if sub in ("train", "lr-find"):
        cfg = load_config(args.config, rest)  # type: ignore[attr-defined]
        name = f"doc{cmd.line}"
        extra = sm.shorten_train(cfg, data, root / "runs", name, nproc(words))
        if any(a.startswith("--log.name") for a in rest):  # the docs name it: keep that
            extra = [a for a in extra if not a.startswith("--log.name=")]
        extra += ["--steps=4"] if sub == "lr-find" else []
    elif sub == "tune":
        extra = sm.shorten_tune(Path(args.config), data, root / "sweeps")  # type: ignore[attr-defined]
    return " ".join([text, shlex.join(extra), spec.extra]).strip()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("cmd", RUNS, ids=[f"{c.where} {c.text}" for c in RUNS])
def test_documented_command_runs(cmd: dc.DocCommand, doc_env: tuple[Path, Path, dict]) -> None:
    root, data, env = doc_env
    spec = dc.CLASSIFIED[cmd.text]
    assert isinstance(spec, dc.Run)
    line = shortened(cmd, spec, root, data)
    proc = sm.run(["bash", "-c", line], env, timeout=180)
    assert proc.returncode == 0, (
        f"{cmd.where}: {line}\n----- stdout -----\n{proc.stdout[-2000:]}\n"
        f"----- stderr -----\n{proc.stderr[-5000:]}"
    )


@pytest.mark.slow
def test_documented_benchmark_scripts_answer_help(doc_env: tuple[Path, Path, dict]) -> None:
    """Benchmarks are too long to run here: each documented script still imports and parses."""
    _, _, env = doc_env
    scripts = sorted(
        {w for c in CHECKS for w in shlex.split(c.text) if w.startswith("benchmarks/")}
    )
    assert scripts
    for script in scripts:
        proc = sm.run([sys.executable, script, "--help"], env, timeout=120)
        assert proc.returncode == 0 and "usage" in proc.stdout, (script, proc.stderr[-2000:])
