"""The base of every plugin's settings model (see :mod:`attestor.plugin`).

    class UnixSettings(Settings):
        hash_binary: bool = True
        max_binary_size: int = Field(default=64 * 1024 * 1024, gt=0)

Settings are frozen, refuse keys the model does not name, and are strict: a
TOML value must already have the field's type (``"64MiB"`` is not a number,
``1`` is not ``true``). A path is written as a string, so :data:`FilePath`
accepts one.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sdk.durations import parse_duration
from sdk.errors import InvalidArgument

__all__ = ["Duration", "FilePath", "NoSettings", "Settings"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NoSettings(Settings):
    """For plugins that take no settings."""


def _not_empty(value: Any) -> Any:
    if value == "":
        raise ValueError("must be a file path, not an empty string")
    return value


FilePath = Annotated[Path, BeforeValidator(_not_empty), Field(strict=False)]
"""A path given as a TOML string (not an empty one)."""


def _duration(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'must be a duration such as "90s", "15m" or "1h", got {value!r}')
    try:
        return parse_duration(value)
    except InvalidArgument as err:
        raise ValueError(err.message.removeprefix("duration ")) from None


Duration = Annotated[timedelta, BeforeValidator(_duration)]
"""A duration written as seconds (``90``) or with a unit (``"90s"``, ``"15m"``, ``"1h"``,
``"365d"``); more than zero."""
