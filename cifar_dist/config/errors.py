"""The config error type and the one-line check every section's __post_init__ uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key."""


def check(ok: bool, key: str, why: str) -> None:
    """Raise ConfigError("key: why") unless ok."""
    if not ok:
        raise ConfigError(f"{key}: {why}")
