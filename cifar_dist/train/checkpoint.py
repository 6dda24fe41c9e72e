"""Atomic checkpoints (temp file + fsync + rename), loaded with weights_only=True.

Step checkpoints are `checkpoints/step_XXXXXXXX.pt`; `last.pt` is a hard link to the newest one.
A crash mid-write leaves only a `.tmp` file, which is never picked; an unreadable file is skipped.

Sharded checkpoints (pipeline parallel): each shard is written first, in its own directory,
then a manifest `step_XXXXXXXX.pt` whose "shards" entry lists them (relative paths). The
manifest is the commit record: it exists only once every shard does. Loading a manifest merges
the shards' "model" entries into one single-process state dict.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj: Any, path: Path) -> None:
    """Write `obj` to `path` through a temp file; on any OSError (disk full, read-only, quota)
    the temp file is removed, `path` and every other file are untouched, and a one-line
    CheckpointError names `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        # torch.save's C++ writer turns a failed write into RuntimeError("unexpected pos ...");
        # the OSError (e.g. ENOSPC) that caused it is its __context__: name that instead.
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        reason = (cause.strerror if cause is not None else None) or str(e).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path}: write failed ({reason}); the previous checkpoint is intact"
        ) from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def step_filename(step: int) -> str:
    return f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep: int = 2) -> Path:
    """Write step_<step>.pt atomically, point last.pt at it, keep the newest `keep` step files."""
    path = ckpt_dir / step_filename(step)
    atomic_save(state, path)
    link_tmp = ckpt_dir / f".last.pt.{os.getpid()}.tmp"
    link_tmp.unlink(missing_ok=True)
    try:
        os.link(path, link_tmp)
    except OSError:  # filesystems without hard links: a second atomic write
        atomic_save(state, link_tmp)
    os.replace(link_tmp, ckpt_dir / "last.pt")
    for old in step_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step checkpoint files, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path}: not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/truncated files
        raise CheckpointError(f"checkpoint {path}: unreadable ({_why_unreadable(e)})") from None
    if isinstance(state, dict) and "shards" in state and "model" not in state:
        state = _merge_shards(Path(path).parent, state, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path}: not a cifar-dist checkpoint (no 'model' entry)")
    return state


def _merge_shards(
    ckpt_dir: Path, manifest: dict[str, Any], map_location: str | torch.device
) -> dict[str, Any]:
    """The manifest plus "model" (the union of the shards' disjoint "model" entries; "ema"
    likewise), and "shard_states" (each shard as loaded, for a resume in the same layout)."""
    shards = [load_checkpoint(ckpt_dir / rel, map_location) for rel in manifest["shards"]]
    model: dict[str, Any] = {}
    for shard in shards:
        model.update(shard["model"])
    merged = {**manifest, "model": model, "shard_states": shards}
    if any(s.get("ema") for s in shards):  # the EMA weights, for `cifar-dist eval/predict`
        merged["ema"] = {k: v for s in shards for k, v in (s.get("ema") or {}).items()}
    return merged


def latest_checkpoint(
    ckpt_dir: Path, map_location: str | torch.device = "cpu", warn: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, or None; corrupt or half-written files are skipped
    (with `warn`, one line each on stderr, so a fallback to an older step is never silent)."""
    for path in reversed(step_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            if warn:
                print(f"cifar-dist: warning: {e}; trying an older checkpoint", file=sys.stderr)
    return None


def _why_unreadable(e: Exception) -> str:
    """The informative part of torch.load's error, in one line. weights_only=True failures open
    with paragraphs of advice to load unsafely; the reason itself follows "WeightsUnpickler
    error:" (an unknown opcode for a foreign or corrupt file, a refused Python object else)."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0]
        reason = reason.split(" was not an allowed global")[0].strip()
        if reason.startswith("Unsupported global"):
            return f"holds a Python object weights_only=True refuses: {reason[:120]}"
        return f"not a torch checkpoint, or a corrupt one: {reason[:120]}"
    if "PytorchStreamReader" in text:  # the zip container itself is cut short or damaged
        return f"truncated or corrupt: {text.split('. ')[0][:120]}"
    return f"{type(e).__name__}: {text.split('. ')[0][:120]}" if text else type(e).__name__
