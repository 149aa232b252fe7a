"""Moved to :mod:`sdk.eventloop`; re-exported here for code written against the old path."""

from sdk.eventloop import (
    ENV,
    Loop,
    T,
    loop_factory,
    run,
)

__all__ = [
    "ENV",
    "Loop",
    "T",
    "loop_factory",
    "run",
]
