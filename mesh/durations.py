"""Durations as Istio's resources write them: ``2s``, ``100ms``, ``1.5s``, ``1m``, ``1h30m``.

A duration is one or more numbers, each with a unit (``h``, ``m``, ``s``, ``ms``), as
Go's ``time.ParseDuration`` reads them (which is what Istio's YAML goes through); the
total must be at least 1ms, at most 24h, and a whole number of milliseconds (Envoy
keeps more, but no timeout, interval or ejection time needs it)::

    parse_duration("1.5s")      # timedelta(seconds=1, microseconds=500000)
    parse_duration("1h30m")     # timedelta(seconds=5400)
    parse_duration("5")         # ValueError: must be a duration ...

The resources keep the text as written (so a document round-trips unchanged); the
compiler calls :func:`parse_duration` to get the value.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

__all__ = [
    "MAX_DURATION",
    "MIN_DURATION",
    "check_duration",
    "parse_duration",
]

MIN_DURATION = timedelta(milliseconds=1)
MAX_DURATION = timedelta(hours=24)

_UNIT_MILLISECONDS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_MAX_TEXT = 32


def parse_duration(text: str) -> timedelta:
    """The duration ``text`` stands for; raise ``ValueError`` saying what is wrong."""
    if len(text) > _MAX_TEXT or _WHOLE.fullmatch(text) is None:
        raise ValueError(
            "must be a duration: a number with a unit h, m, s or ms, e.g. 2s, 100ms, 1.5s, 1m"
        )
    milliseconds = sum(
        (Decimal(number) * _UNIT_MILLISECONDS[unit] for number, unit in _PART.findall(text)),
        Decimal(0),
    )
    if milliseconds != milliseconds.to_integral_value():
        raise ValueError("must be a whole number of milliseconds (e.g. 1.5s, 250ms)")
    duration = timedelta(milliseconds=int(milliseconds))
    if duration < MIN_DURATION:
        raise ValueError("must be at least 1ms")
    if duration > MAX_DURATION:
        raise ValueError("must be at most 24h")
    return duration


def check_duration(text: str) -> None:
    parse_duration(text)
