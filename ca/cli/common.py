"""What several ``tessera server`` nouns share beyond :mod:`ca.commandline`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sdk.commandline import emit
from sdk.durations import parse_duration


def seconds(value: str | None, what: str) -> int:
    """A duration flag (``600``, ``10m``) in whole seconds; 0 when not given."""
    if value in (None, ""):
        return 0
    return int(parse_duration(str(value), what=what).total_seconds())


def timestamp(unix: int) -> str:
    """A UNIX time as SPIRE prints it: ``2025-01-02 03:04:05 +0000 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(unix))


def emit_found(
    output: str,
    key: str,
    items: Sequence[dict[str, Any]],
    nouns: tuple[str, str],
    describe: Callable[[dict[str, Any]], str],
) -> None:
    """Print ``{key: items}`` as JSON, or ``Found N <noun>`` and a block per item.

    ``nouns`` is the singular and the plural (``("entry", "entries")``)."""

    def text() -> str:
        found = f"Found {len(items)} {nouns[0] if len(items) == 1 else nouns[1]}"
        return "\n\n".join([found, *(describe(item) for item in items)])

    emit(output, {key: list(items)}, text)
