"""Moved to :mod:`sdk.durations`; re-exported here for code written against the old path."""

from sdk.durations import (
    format_duration,
    parse_duration,
)

__all__ = [
    "format_duration",
    "parse_duration",
]
