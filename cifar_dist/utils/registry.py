"""One name -> factory table, shared by the model, loader and backend registries (timm-style:
a model, loader or backend is added by writing one function and decorating it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from cifar_dist.config.schema import ConfigError

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind  # "model", "loader", ...: for messages
        self.config_key = config_key  # the config field that names an entry
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(factory: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> F:
        """The factory, or a one-line ConfigError naming the config key and the known names."""
        if name not in self._entries:
            raise ConfigError(
                f"{self.config_key}: unknown {self.kind} {name!r} (known: {', '.join(self.names())})"
            )
        return self._entries[name]
