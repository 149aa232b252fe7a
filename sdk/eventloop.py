"""The event loop every long-running Tessera process runs on.

The server, the agent, ``tessera sidecar proxy`` and ``tessera sidecar run --proxy
builtin`` run on uvloop when it is installed (a dependency on Linux; grpc.aio works on
it); ``tessera sidecar run --proxy envoy``, which only supervises Envoy, on asyncio's own
loop. ``TESSERA_EVENT_LOOP`` (``auto``, ``uvloop`` or ``asyncio``) overrides the choice
for any process::

    eventloop.run(server.run())
    eventloop.run(sidecar(), default="asyncio")

uvloop does the socket and TLS record work in C (Cython); see
docs/performance.md for what it saves. uvloop starts reading a connection as
soon as its protocol's ``connection_made`` returns, whatever that asked, so a
listener that upgrades accepted connections with ``start_tls`` may see a
ClientHello land in the plain reader: the sidecar's inbound listeners take
TLS from the first byte instead (``loop.connect_accepted_socket`` with the
server context).

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
