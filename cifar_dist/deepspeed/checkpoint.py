"""DeepSpeed checkpoints: safe loading, an atomic `latest`, and consolidation to a plain file.

Layout: `<run>/checkpoints/` is DeepSpeed's save_dir; each save is a tag directory
`step_XXXXXXXX/` written by every rank (`engine.save_checkpoint`), and `latest` names the
newest complete tag. Our own state (config, TrainState, every rank's RNG) rides along as the
client state under the key `cifar_dist`.

Safety, as for the torch path: DeepSpeed's files are read with `weights_only=True`, with only
DeepSpeed's few bookkeeping classes allow-listed, and are written atomically (temp + rename).
`consolidate` turns a tag into the plain checkpoint dict `cifar-dist eval` loads: ZeRO 1-3
through DeepSpeed's zero_to_fp32 (fp32 master weights), stage 0 from the saved module, the
pipeline engine from its per-layer files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

from cifar_dist.train.checkpoint import CheckpointError, atomic_save

CLIENT_KEY = "cifar_dist"
TAG_RE = re.compile(r"^step_\d{8}$")
LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
# Classes DeepSpeed pickles into its optimiser/model-state files (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, bf16 and pipeline saves).
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_classes() -> list[Any]:
    import importlib

    out = []
    for dotted in SAFE_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


@contextmanager
def _allow_ds_classes() -> Iterator[None]:
    with torch.serialization.safe_globals(_safe_classes()):
        yield


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) that also accepts DeepSpeed's bookkeeping classes."""
    try:
        with _allow_ds_classes():
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding classes we do not allow
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise CheckpointError(
            f"checkpoint {path}: unreadable ({type(e).__name__}: {first})"
        ) from None


@cache
def _engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save engine with atomic writes and weights_only loads."""

        def save(self, state_dict: Any, path: str) -> None:
            atomic_save(state_dict, Path(path))

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    return SafeTorchCheckpointEngine


def install_safe_engine(engine: Any) -> None:
    """Swap DeepSpeed's default checkpoint engine for the safe one.

    DeepSpeed has no config key for a custom engine; it builds `engine.checkpoint_engine` once
    and uses it for every save and load, so replacing that attribute is enough. A user JSON
    that chose another engine (fast/decoupled writers, DataStates) is left alone.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = _engine_class()(engine._config)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(save_dir: Path) -> str | None:
    latest = save_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (save_dir / tag).is_dir() else None


def commit_latest(save_dir: Path, tag: str, keep: int = 2) -> None:
    """Point `latest` at `tag` atomically, then delete all but the newest `keep` tags.

    Called by rank 0 only after save_checkpoint's closing barrier, i.e. once every rank has
    written its files: DeepSpeed's own `latest` is written before that barrier and in place.
    """
    tmp = save_dir / f".latest.{os.getpid()}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, save_dir / "latest")
    tags = sorted(p for p in save_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for old in tags[:-keep]:
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: Path) -> tuple[Path, str]:
    """A save_dir (its `latest` tag) or a tag directory -> (save_dir, tag)."""
    if path.is_dir() and (tag := read_latest(path)) is not None:
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(
        f"checkpoint {path}: not a DeepSpeed checkpoint (expected a directory with a 'latest' "
        "file, or a tag directory holding *model_states.pt)"
    )


def _model_states_file(tag_dir: Path) -> Path:
    """The file holding the client state: mp_rank_00 (or rank 0's ZeRO-3 file)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"checkpoint {tag_dir}: no mp_rank_00 model states file")


def client_state(tag_dir: Path) -> dict[str, Any]:
    states = safe_load(_model_states_file(tag_dir), map_location="cpu")
    ours = states.get(CLIENT_KEY) if isinstance(states, dict) else None
    if not isinstance(ours, dict):
        raise CheckpointError(f"checkpoint {tag_dir}: not written by cifar-dist (no client state)")
    return ours


def _check_pickles(tag_dir: Path) -> None:
    """zero_to_fp32 unpickles with weights_only=False: refuse files holding other classes."""
    allowed = set(SAFE_GLOBALS)
    for f in sorted(tag_dir.glob("*.pt")):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed
        if unsafe:
            raise CheckpointError(f"checkpoint {f}: refusing to unpickle {sorted(unsafe)}")


def _pipeline_weights(tag_dir: Path, layer_files: list[Path], config: dict[str, Any]) -> dict:
    """Per-layer files of the pipeline engine, renamed to the plain model's state-dict keys."""
    from cifar_dist.config.load import config_from_dict
    from cifar_dist.train.common import build_model

    model = build_model(config_from_dict(config), torch.device("cpu"))
    names = {id(m): n for n, m in model.named_modules()}
    layers = model.pipeline_layers()  # type: ignore[operator]
    out: dict[str, torch.Tensor] = {}
    for f in layer_files:
        idx = int(LAYER_RE.match(f.name).group(1))  # type: ignore[union-attr]
        prefix = names[id(layers[idx])]
        for k, v in safe_load(f, map_location="cpu").items():
            out[f"{prefix}.{k}" if prefix else k] = v
    return out


def consolidate(path: Path, tag: str | None = None) -> dict[str, Any]:
    """A DeepSpeed checkpoint -> the plain checkpoint dict `cifar-dist eval` loads."""
    save_dir, found = resolve(path)
    tag_dir = save_dir / (tag or found)
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir}: no such tag")
    ours = client_state(tag_dir)
    layer_files = sorted(p for p in tag_dir.iterdir() if LAYER_RE.match(p.name))
    if layer_files:
        weights = _pipeline_weights(tag_dir, layer_files, ours["config"])
    elif ours["config"]["deepspeed"]["zero_stage"] >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        _check_pickles(tag_dir)
        weights = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag_dir.name)
    else:
        weights = safe_load(_model_states_file(tag_dir), map_location="cpu")["module"]
    # A plain fp32 state dict, whatever precision DeepSpeed trained in.
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return {
        "model": weights,
        "ema": ours.get("ema"),  # float32 full tensors (ZeRO 0-2 runs with train.ema_decay)
        "config": ours["config"],
        "train_state": ours["train_state"],
        "source": str(tag_dir),
    }


def write_consolidated(path: Path, out: Path | None = None, tag: str | None = None) -> Path:
    """`cifar-dist ds-consolidate`: write the plain checkpoint next to the tag (atomically)."""
    ckpt = consolidate(path, tag)
    source = Path(ckpt["source"])
    target = out or source.with_name(f"consolidated-{source.name}.pt")
    atomic_save(ckpt, target)
    return target
