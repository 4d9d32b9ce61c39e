"""Config dataclasses serialised to JSON: one ``to_dict`` / ``from_dict`` for all of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from insloc_hub.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
    """Mixin for dataclass configs written next to outputs and read back.

    ``from_dict`` rejects unknown fields with the names listed, so a typo or a config from a newer
    version is an error instead of being silently ignored.

    Example:
        >>> @dataclasses.dataclass
        ... class Toy(JsonConfig):
        ...     size: int = 1
        >>> Toy.from_dict({"size": 2})
        Toy(size=2)
    """

    config_kind = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown {cls.config_kind} fields {sorted(unknown)}; "
                              "is this config from a newer insloc-hub?")
        return cls(**dict(data))
