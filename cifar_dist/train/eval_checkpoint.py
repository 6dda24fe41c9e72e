"""`cifar-dist eval`: rebuild the model a checkpoint was trained with and evaluate it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar_dist.config.load import config_from_dict, config_to_dict, merge_trees, parse_overrides
from cifar_dist.train.checkpoint import load_checkpoint
from cifar_dist.train.common import AMP_DTYPES, build_model, resolve_amp
from cifar_dist.train.fit import build_data
from cifar_dist.train.metrics import evaluate
from cifar_dist.utils.dist import distributed_session


def _ema_weights(ema_state: dict[str, Any]) -> dict[str, Any]:
    """AveragedModel keys are 'module.<name>' plus 'n_averaged'."""
    return {k.removeprefix("module."): v for k, v in ema_state.items() if k.startswith("module.")}


def evaluate_checkpoint(
    path: str | Path, overrides: list[str] | None = None, use_ema: bool = True
) -> dict[str, float]:
    if Path(path).is_dir():  # a DeepSpeed checkpoint: merge its shards in memory
        from cifar_dist.deepspeed.checkpoint import consolidate

        ckpt = consolidate(Path(path))
    else:
        ckpt = load_checkpoint(Path(path))
    base = config_from_dict(ckpt["config"])
    # CLI overrides (e.g. --data.dir) apply on top of the checkpoint's own config.
    cfg = _with_overrides(base, overrides or [])
    with distributed_session(cfg.train.device, cfg.parallel.backend) as info:
        cfg = resolve_amp(cfg, info.device)  # e.g. --train.amp=auto on another machine
        model = build_model(cfg, info.device)
        weights = _ema_weights(ckpt["ema"]) if use_ema and ckpt.get("ema") else ckpt["model"]
        model.load_state_dict(weights)
        _, loaders, _ = build_data(cfg, info.rank, info.world_size, info.device)
        out: dict[str, float] = {}
        for split, loader in loaders.items():
            res = evaluate(
                model,
                loader,
                cfg.data.num_classes,
                info.device,
                amp_dtype=AMP_DTYPES[cfg.train.amp],
                channels_last=cfg.train.channels_last,
                tta=cfg.train.tta,
                tta_translate=cfg.train.tta_translate,
            )
            out.update({f"{split}_{k}": float(v) for k, v in res.items()})
    return out


def _with_overrides(base: Any, overrides: list[str]) -> Any:
    return config_from_dict(merge_trees(config_to_dict(base), parse_overrides(overrides)))
