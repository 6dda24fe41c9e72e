"""Recipe options as callbacks, built from the config, and the one check of their layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar_dist.config.schema import ConfigError
from cifar_dist.train.callbacks.base import BACKENDS, Callback
from cifar_dist.train.callbacks.ema import EMA
from cifar_dist.train.callbacks.recipe import EarlyStopping, LookaheadAveraging, WhiteningStem

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config

__all__ = ["BACKENDS", "Callback", "backend_name", "build_callbacks", "validate"]


def backend_name(cfg: Config) -> str:
    """The backend a config trains with, from (parallel.engine, pp > 1)."""
    if cfg.parallel.engine == "deepspeed":
        return "deepspeed"
    return "pipeline" if cfg.parallel.pp > 1 else "torch"


def build_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks the config turns on, in the order their hooks run (EMA before
    Lookahead after a step: both see the weights the optimiser just wrote)."""
    t = cfg.train
    out: list[Callback] = []
    if cfg.model.whiten_init > 0:
        out.append(WhiteningStem())
    if t.ema_decay > 0:
        out.append(EMA(t.ema_decay))
    if t.lookahead_every > 0:
        out.append(LookaheadAveraging())
    if t.early_stopping > 0:
        out.append(EarlyStopping(t.early_stopping))
    return out


def validate(cfg: Config) -> None:
    """One ConfigError naming the key when a recipe option cannot run with the layout."""
    backend = backend_name(cfg)
    for cb in build_callbacks(cfg):
        reason = cb.supports(backend, cfg)
        if reason:
            raise ConfigError(f"{cb.config_key}: {reason}")
