"""What one client may cost the server's HTTP listeners: the node API, the
federation bundle endpoint and the admin socket all run under these limits.

Any host that reaches the node API may connect to it (attestation needs no
client certificate), so a client that sends a request one byte at a time, or
opens connection after connection, must not be able to hold the server's file
descriptors::

    limits = ConnectionLimits(request_timeout=10.0, max_connections_per_client=64)
    config = uvicorn.Config(app, http=limited_protocol(limits, TLSIdentityProtocol),
                            **uvicorn_settings(limits), ...)
    server = LimitedUvicorn(config, limits)

- **TLS handshake.** A client has ``tls_handshake_timeout`` to finish it.
- **Request.** From a connection's handshake, and from the first byte of
  each next request, the client has ``request_timeout`` to send the whole
  request, head and body; then the connection is closed (with ``408`` when a
  request had begun). Reading the response is not bounded here.
- **Idle keep-alive.** A connection with no request in progress is closed
  after ``keep_alive_timeout`` (uvicorn's own timer, armed after a response).
- **Connections per client.** One client address may hold at most
  ``max_connections_per_client`` connections; one more is closed as soon as
  its handshake ends, and logged — once per client until it is back under.

uvicorn has no hook for the handshake timeout or for a deadline on the
request as a whole (its keep-alive timer is disarmed by every byte received),
so this module adds both around its h11 protocol and its ``create_server``
call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ca.config import DEFAULT_LIMITS, ConnectionLimits

__all__ = ["LimitedUvicorn", "limited_protocol", "uvicorn_settings"]

log = logging.getLogger(__name__)

_REQUEST_DONE: Final = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
_REQUEST_TIMEOUT_RESPONSE: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
)


def limited_protocol(
    limits: ConnectionLimits, base: type[H11Protocol] = H11Protocol
) -> type[H11Protocol]:
    """``base`` under ``limits``, counting connections in a table of its own (one per
    listener)."""
    return _limited(base, limits, _ClientTable(limits.max_connections_per_client))


def uvicorn_settings(limits: ConnectionLimits) -> dict[str, Any]:
    """The limits uvicorn applies itself."""
    return {"timeout_keep_alive": max(1, round(limits.keep_alive_timeout))}


@dataclass
class _ClientTable:
    """Open connections per client address, and which clients were told they are over."""

    limit: int
    open: Counter[str] = field(default_factory=Counter)
    warned: set[str] = field(default_factory=set)

    def admit(self, client: str) -> bool:
        if self.open[client] >= self.limit:
            if client not in self.warned:
                self.warned.add(client)
                log.warning(
                    "client %s already holds %d connections, the most one client may hold "
                    "(max_connections_per_client); closing its new connections until it has "
                    "fewer", client, self.limit,
                )  # fmt: skip
            return False
        self.open[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]
            self.warned.discard(client)


def _limited(
    base: type[H11Protocol], limits: ConnectionLimits, clients: _ClientTable
) -> type[H11Protocol]:
    class LimitedProtocol(base):  # type: ignore[misc,valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _client_key: str | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:  # TCP; a Unix socket has no address
                if not clients.admit(str(peer[0])):
                    transport.abort()
                    return
                self._client_key = str(peer[0])
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._client_key is not None:
                clients.release(self._client_key)
                self._client_key = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state not in _REQUEST_DONE:
                self._arm()  # the first byte of the next request
            super().data_received(data)
            if self.conn.their_state in _REQUEST_DONE:
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            log.info(
                "closed a connection from %s: no whole request within %gs (request_timeout)",
                self._client_key or "a local client", limits.request_timeout,
            )  # fmt: skip
            begun = self.conn.their_state is h11.SEND_BODY or (
                self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
            )
            if begun and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.write(_REQUEST_TIMEOUT_RESPONSE)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app's receive() sees the client gone
                self.cycle.message_event.set()
            self.transport.close()

    LimitedProtocol.__name__ = LimitedProtocol.__qualname__ = f"Limited{base.__name__}"
    return LimitedProtocol


class LimitedUvicorn(uvicorn.Server):
    """uvicorn giving TLS clients ``tls_handshake_timeout`` to finish their handshake,
    and leaving signals to the caller (the server stops all its listeners together)."""

    def __init__(self, config: uvicorn.Config, limits: ConnectionLimits = DEFAULT_LIMITS):
        super().__init__(config)
        self.limits = limits

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: Any = None) -> None:
        async with self._handshake_timeout():
            await super().startup(sockets=sockets)

    @contextlib.asynccontextmanager
    async def _handshake_timeout(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        create_server = loop.create_server
        timeout = self.limits.tls_handshake_timeout

        async def with_timeout(*args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", timeout)
            return await create_server(*args, **kwargs)

        loop.create_server = with_timeout  # type: ignore[method-assign]
        try:
            yield
        finally:
            loop.create_server = create_server  # type: ignore[method-assign]
