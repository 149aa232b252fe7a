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

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["FilePath", "NoSettings", "Settings"]


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
