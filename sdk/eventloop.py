"""The event loop every long-running Tessera process runs on.

The server and the agent run on uvloop when it is installed (a dependency on
Linux), the sidecar on asyncio's own loop (see below); ``TESSERA_EVENT_LOOP``
(``auto``, ``uvloop`` or ``asyncio``) overrides the choice for any process::

    eventloop.run(server.run())
    eventloop.run(sidecar(), default="asyncio")

uvloop does the socket and TLS record work of the node API and the Workload
API in C; see docs/performance.md for what it saves. The sidecar proxy stays
on asyncio: its inbound listener accepts plain connections, pauses reading in
``connection_made`` and upgrades them with ``start_tls``. uvloop 0.23 starts
reading after ``connection_made`` returns, whatever it asked, so a ClientHello
that arrives before ``start_tls`` lands in the plain reader and that handshake
stalls until its timeout.

Tessera-internal: used by the server, the agent and the sidecar, not part of the SDK's
public API (it is not in ``sdk.__all__``) and may change without notice.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from sdk.errors import ConfigError

__all__ = [
    "ENV",
    "Loop",
    "T",
    "loop_factory",
    "run",
]

T = TypeVar("T")
Loop = Literal["uvloop", "asyncio"]

ENV = "TESSERA_EVENT_LOOP"


def loop_factory(default: Loop = "uvloop") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default loop."""
    asked = os.environ.get(ENV, "auto").strip().lower()
    if asked not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"{ENV} must be auto, uvloop or asyncio, not {asked!r}")
    choice = default if asked == "auto" else asked
    if choice == "asyncio":
        return None
    if importlib.util.find_spec("uvloop") is None:
        if asked == "uvloop":
            raise ConfigError(f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop)")
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, default: Loop = "uvloop") -> T:
    """Run ``main`` to completion on a new loop of the chosen kind, like :func:`asyncio.run`."""
    try:
        factory = loop_factory(default)
    except ConfigError:
        main.close()  # never to run: do not leave it to warn that it was never awaited
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
