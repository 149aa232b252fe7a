"""Moved to :mod:`sdk.clock`; this module re-exports it for code written against the old path."""

from sdk.clock import (
    SYSTEM_CLOCK,
    Clock,
    ManualClock,
    SystemClock,
)

__all__ = [
    "SYSTEM_CLOCK",
    "Clock",
    "ManualClock",
    "SystemClock",
]
