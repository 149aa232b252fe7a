"""What one client may hold of the server's HTTP listeners, for all of them alike.

The node API, the federation bundle endpoint and the admin socket are uvicorn
listeners whose connections are :class:`LimitedProtocol`: uvicorn's protocol on
httptools (a C HTTP parser: h11, in Python, cost the node API about a tenth of
the CPU of a one-CSR request), which puts the handshake's client certificate in
each request as the SDK's :class:`~sdk.integrations.asgi.TLSIdentityProtocol`
does, and writes an answer's head with the first part of its body; each listener has a
:class:`ConnectionGuard` that the protocol asks when a connection is made and
tells when it is gone. Together they bound:

- the time to a complete request: from accepting the connection (the TLS
  handshake included, which :class:`LimitedServer` hands the loop as its
  handshake timeout) or from the first byte of a later request, to the end of
  its body (``request_timeout``; a head left unfinished gets a 408, then the
  connection is closed);
- the idle time between requests on a kept-alive connection (uvicorn's
  ``timeout_keep_alive``, set from ``idle_timeout``);
- the size of a request's head (:data:`MAX_HEAD_BYTES`, h11's own bound): a
  larger one is answered 400 and the connection closed;
- the open connections from one IP address (``max_connections_per_peer``) and
  on the listener (``max_connections``): one more is closed at once.

Refusals and timeouts are logged as one line per listener at most every
:data:`REPORT_INTERVAL`, whatever their number::

    guard = ConnectionGuard("node API", limits.max_connections, limits.max_connections_per_peer)
    config = listener_config(app, guard, limits, host="0.0.0.0", port=8081, ssl=context)
    await LimitedServer(config, limits).serve()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import ssl
import sys
from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ca.config import ConnectionLimits
from sdk.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 42\r\nconnection: close\r\n\r\n"
    b"the request did not arrive whole in time\r\n"
)

MAX_HEAD_BYTES = 16 * 1024
"""A request's line and headers, at most (what h11, which served before, allowed)."""
HEAD_TOO_LARGE = f"the request head is larger than {MAX_HEAD_BYTES} bytes"

REPORT_INTERVAL = timedelta(seconds=10)
DESCRIPTOR_RESERVE = 64
"""File descriptors kept for the datastore, the key files, logs and the admin socket."""


class ConnectionGuard:
    """Counts one listener's open connections, in all and per peer IP address.

    ``admit`` says whether one more may stay open (peer None: a Unix socket
    caller, counted only in all); ``release`` gives its place back. Refusals and
    request timeouts are summed and reported in one log line per interval.
    """

    def __init__(
        self,
        listener: str,
        max_connections: int,
        max_connections_per_peer: int,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.listener = listener
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self._clock = clock
        self._open = 0
        self._per_peer: Counter[str] = Counter()
        self._over_peer: Counter[str] = Counter()
        self._over_total = 0
        self._timed_out = 0
        self._next_report = clock.now()
        self._flush: asyncio.TimerHandle | None = None

    @property
    def open(self) -> int:
        return self._open

    def open_from(self, peer: str) -> int:
        return self._per_peer[peer]

    def admit(self, peer: str | None) -> bool:
        if self._open >= self.max_connections:
            self._over_total += 1
            self._event()
            return False
        if peer is not None:
            if self._per_peer[peer] >= self.max_connections_per_peer:
                self._over_peer[peer] += 1
                self._event()
                return False
            self._per_peer[peer] += 1
        self._open += 1
        return True

    def release(self, peer: str | None) -> None:
        self._open -= 1
        if peer is not None:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]

    def timed_out(self) -> None:
        """A connection was closed for not sending a whole request in time."""
        self._timed_out += 1
        self._event()

    def _event(self) -> None:
        now = self._clock.now()
        if now >= self._next_report:
            self.report()
            return
        if self._flush is None:  # what happens until the next report is not lost
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                delay = (self._next_report - now).total_seconds()
                self._flush = loop.call_later(delay, self.report)

    def report(self) -> None:
        """Log what was refused or timed out since the last report, if anything."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._next_report = self._clock.now() + REPORT_INTERVAL
        parts = []
        if self._over_peer:
            worst = ", ".join(
                f"{count} from {peer}" for peer, count in self._over_peer.most_common(3)
            )
            more = len(self._over_peer) - 3
            parts.append(
                f"refused {sum(self._over_peer.values())} connection(s) over "
                f"max_connections_per_peer ({self.max_connections_per_peer}): {worst}"
                + (f" and {more} more address(es)" if more > 0 else "")
            )
        if self._over_total:
            parts.append(
                f"refused {self._over_total} connection(s) over max_connections "
                f"({self.max_connections})"
            )
        if self._timed_out:
            parts.append(
                f"closed {self._timed_out} connection(s) that sent no whole request "
                "within request_timeout"
            )
        self._over_peer.clear()
        self._over_total = self._timed_out = 0
        if parts:
            log.warning("%s: %s", self.listener, "; ".join(parts))


def connections_per_listener(limits: ConnectionLimits, listeners: int) -> int:
    """``max_connections``, lowered so that ``listeners`` full listeners still leave
    descriptors to the rest of the server.

    The soft limit on open files is raised to the hard one first (as Go programs
    do); a cap that still does not fit is lowered, with a warning saying so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    room = max(1, (soft - DESCRIPTOR_RESERVE) // max(1, listeners))
    if limits.max_connections <= room:
        return limits.max_connections
    log.warning(
        "max_connections %d does not fit the limit of %d open files: each of the %d "
        "listener(s) accepts at most %d connections; raise the limit (ulimit -n) to "
        "allow more",
        limits.max_connections, soft, listeners, room,
    )
    return room


def peer_address(transport: asyncio.BaseTransport) -> str | None:
    """The peer's IP address; None for a Unix socket."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return None


class _HeadTooLarge(Exception):
    """Raised from a parser callback: stops parsing a head over :data:`MAX_HEAD_BYTES`."""


class LimitedProtocol(HttpToolsProtocol):
    """A listener's connection, held to its ``guard`` and ``limits``: asks the guard for a
    place when made, and is closed if it has not sent a whole request in ``request_timeout``.

    Every request's scope carries the handshake's client certificate in the ASGI TLS
    extension (``client_cert_chain``: the PEM, read once per connection, or empty), in
    place of anything else: nothing but the handshake can name the caller.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard = guard
        self._request_timeout = limits.request_timeout.total_seconds()
        # Made when the connection is accepted, before any TLS handshake: the first
        # request's time runs from here.
        self._accepted_at = self.loop.time()
        self._peer: str | None = None
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._chain: list[str] = []
        self._receiving = False  # a request has begun and not arrived whole
        self._head_whole = False  # ... and its head has
        self._head_bytes = 0  # of the head's whole fields, as the parser hands them over
        self._partial_head_bytes = 0  # received while the head was unfinished
        self._head_too_large = False

    def connection_made(self, transport: Any) -> None:
        self._peer = peer_address(transport)
        if not self._guard.admit(self._peer):
            transport.abort()  # no TLS close_notify exchange to wait for
            return
        self._admitted = True
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                self._chain = [ssl.DER_cert_to_PEM_cert(der)]
        self._arm(self._accepted_at + self._request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return  # refused in connection_made: nothing was set up
        self._admitted = False
        self._disarm()
        self._guard.release(self._peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        mid_head = self._receiving and not self._head_whole
        super().data_received(data)
        if mid_head and self._receiving and not self._head_whole:
            # The parser keeps a header it has not seen the end of: bound those bytes too.
            self._partial_head_bytes += len(data)
            if self._partial_head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._head_too_large = True
                self.send_400_response(HEAD_TOO_LARGE)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()

    # -- the request, as the parser reads it ----------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {"client_cert_chain": self._chain}}
        self._receiving, self._head_whole = True, False
        self._head_bytes = self._partial_head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_whole = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._receiving = False
        super().on_message_complete()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse; one that says so for a head over
        :data:`MAX_HEAD_BYTES`."""
        if self._head_too_large:
            msg = HEAD_TOO_LARGE
        super().send_400_response(msg)

    # -- the request deadline -----------------------------------------------------------

    def _follow_request(self) -> None:
        if not self._admitted:
            return
        if self._receiving:
            if self._deadline is None:
                self._arm(self.loop.time() + self._request_timeout)
        elif self.cycle is not None:
            # The request is whole (the app's time is not bounded here), or the
            # connection is between requests (uvicorn's keep-alive timeout holds).
            self._disarm()

    def _arm(self, when: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_at(when, self._request_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self._guard.timed_out()
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._head_whole and self.cycle is not None:
            self.cycle.disconnected = True  # the app stops waiting for a body that never came
        elif self._receiving and not answering:
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)  # a head had begun
        # abort, not close: a TLS close would wait for the slow peer's close_notify
        self.transport.abort()


def listener_config(
    app: Any,
    guard: ConnectionGuard,
    limits: ConnectionLimits,
    *,
    host: str | None = None,
    port: int | None = None,
    uds: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> uvicorn.Config:
    """A loaded uvicorn configuration whose connections ``guard`` and ``limits`` bound."""
    protocol = functools.partial(LimitedProtocol, guard=guard, limits=limits)
    config = uvicorn.Config(
        app,
        **({"uds": uds} if uds is not None else {"host": host, "port": port}),
        http=cast(Any, protocol),
        timeout_keep_alive=int(limits.idle_timeout.total_seconds()),
        log_config=None,
        access_log=False,
        # Nothing here stands behind a proxy whose X-Forwarded-* headers to believe (the
        # caller is its TLS handshake's): no middleware rewriting every request's client.
        proxy_headers=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    config.load()
    config.ssl = ssl_context
    return config


class LimitedServer(uvicorn.Server):
    """uvicorn's server, its TLS listener giving each handshake ``request_timeout``
    (the loop's own default is 60 s, and uvicorn does not pass one)."""

    def __init__(self, config: uvicorn.Config, limits: ConnectionLimits) -> None:
        super().__init__(config)
        self.limits = limits

    async def startup(self, sockets: list[Any] | None = None) -> None:
        config = self.config
        if config.ssl is None or sockets is not None or config.uds or config.fd is not None:
            await super().startup(sockets)
            return
        await self.lifespan.startup()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                create_protocol,
                host=config.host,
                port=config.port,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self.limits.request_timeout.total_seconds(),
            )
        except OSError as err:  # as uvicorn does: the caller sees a server that never started
            logging.getLogger("uvicorn.error").error(err)
            await self.lifespan.shutdown()
            sys.exit(1)
        self.servers = [server]
        self.started = True
