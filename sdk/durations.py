"""Durations as users write them: ``90``, ``90s``, ``15m``, ``1h``, ``24h``, ``7d``."""

from __future__ import annotations

import re
from datetime import timedelta

from sdk.errors import InvalidArgument

__all__ = [
    "format_duration",
    "parse_duration",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def parse_duration(value: str | int | timedelta, *, what: str = "duration") -> timedelta:
    """Parse a duration; bare numbers are seconds. Raise InvalidArgument otherwise."""
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
    elif isinstance(value, int):
        seconds = value
    else:
        match = _PATTERN.match(value)
        if match is None:
            raise InvalidArgument(
                f"{what} {value!r} is not a duration; write seconds or a number with "
                "s, m, h or d, e.g. 90s, 15m, 1h, 24h"
            )
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise InvalidArgument(f"{what} must be greater than zero")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
