"""The built-in proxy's ``--outbound`` listener: the app's calls, routed by the mesh.

Plain HTTP/1.1 from the app (keep it on loopback), read with the inbound's parser and
limits (:mod:`sdk.sidecar.http`). Each request's ``Host`` names the Service called —
``users-service``, ``users-service:80``, ``users-service.<namespace>.svc[.cluster.local]``
or any name beginning ``users-service.``, as Envoy's outbound virtual hosts take it
(:func:`mesh.hosts.service_name`) — and that Service's routes in the view in effect for
that request choose what happens (:mod:`dataplane.forwarding`)::

    routes = OutboundRoutes(view)                 # per view: Host -> OutboundService, cached
    listener = OutboundListener(HostPort("127.0.0.1", 15001), forwarder, lambda: routes)
    await listener.start()
    ...
    listener.stop_accepting(); await listener.stop(grace=5.0)

A Host that names no Service of the mesh is answered 404 with a sentence naming it
(flag ``NR``); before the first mesh snapshot every request is answered 503. A new view
takes effect at the next request of every open connection: nothing is dropped.

The request loop (heads read with limits, idle timeouts, keep-alive, graceful stop) is
:class:`HttpListener`'s, which a gateway's ports share (:mod:`dataplane.builtin_gateway`,
over TLS on an HTTPS port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from ssl import SSLContext
from typing import Final

from dataplane.forwarding import Forwarder
from mesh.hosts import service_name
from mesh.request import HttpRequest, split_host
from mesh.view import OutboundService, Route, View
from sdk.address import HostPort
from sdk.sidecar.deadline import Deadline
from sdk.sidecar.errors import HttpError, SidecarConfigError
from sdk.sidecar.http import RequestHead, read_request_head, simple_response
from sdk.sidecar.http_exchange import IDLE_TIMEOUT_SECONDS
from sdk.sidecar.streams import STREAM_LIMIT, Stream

__all__ = [
    "OUTBOUND", "TLS_HANDSHAKE_SECONDS", "HttpListener", "OutboundListener", "OutboundRoutes",
]  # fmt: skip

_log = logging.getLogger("tessera.sidecar")

OUTBOUND: Final = "outbound"
"""The outbound listener's name, in logs and in the access log's ``listener``."""
TLS_HANDSHAKE_SECONDS: Final = 10.0
"""How long a TLS client may take over its handshake (a gateway's HTTPS port)."""
_HOST_CACHE: Final = 4096
"""Host names remembered per view (beyond them, each is looked up again)."""


class OutboundRoutes:
    """A view's outbound Services by the ``Host`` names that call them (built once per
    view; each host looked up once)."""

    def __init__(self, view: View) -> None:
        self.view = view
        self._services = {service.service: service for service in view.outbound}
        self._hosts: dict[str, OutboundService | None] = {}

    def service_for(self, host: str) -> OutboundService | None:
        """The Service a ``Host`` name (lower case, without its port) calls, or None."""
        try:
            return self._hosts[host]
        except KeyError:
            pass
        name = service_name(host)
        found = self._services.get(name) if name is not None else None
        if found is None and "." in host:  # Envoy's "users-service.*" domain
            found = self._services.get(host.partition(".")[0])
        if len(self._hosts) < _HOST_CACHE:
            self._hosts[host] = found
        return found


class HttpListener:
    """HTTP/1.1 requests read one after the other on each connection, each handed to
    :meth:`_handle` (a subclass's): the outbound's, a gateway port's. With ``ssl``, the
    connections are TLS (the handshake bounded by :data:`TLS_HANDSHAKE_SECONDS`)."""

    def __init__(
        self,
        listen: HostPort,
        forwarder: Forwarder,
        *,
        name: str,
        ssl: SSLContext | None = None,
    ) -> None:
        self.listen = listen
        self.name = name
        self._forwarder = forwarder
        self._ssl = ssl
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], list[bool]] = {}
        """Each connection's task, and whether it waits for its next request (idle)."""
        self._stopping = False

    @property
    def bound(self) -> HostPort:
        if self._server is None or not self._server.sockets:
            return self.listen
        return HostPort(self.listen.host, int(self._server.sockets[0].getsockname()[1]))

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accepted, self.listen.host or None, self.listen.port,
                limit=STREAM_LIMIT, reuse_address=True, ssl=self._ssl,
                ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS if self._ssl is not None else None,
            )  # fmt: skip
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise SidecarConfigError(self._bind_error(reason)) from err

    def _bind_error(self, reason: str) -> str:
        return f"cannot listen on {self.listen}: {reason}"

    def stop_accepting(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, give the others ``grace`` seconds."""
        self.stop_accepting()
        for task, idle in list(self._connections.items()):
            if idle[0]:
                task.cancel()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace) if grace > 0 else ((), tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        idle = [True]
        self._connections[task] = idle
        client = Stream(reader, writer)
        peer = writer.get_extra_info("peername")
        source_ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
        try:
            await self._serve(client, idle, source_ip)
        except asyncio.CancelledError:
            pass  # shutdown
        except OSError as err:
            _log.debug("%s: the connection from %s ended: %s", self.name, client.peer, err)
        except Exception:
            _log.exception("%s: the connection from %s failed", self.name, client.peer)
        finally:
            del self._connections[task]
            with contextlib.suppress(asyncio.CancelledError):
                await client.close()

    async def _serve(self, client: Stream, idle: list[bool], source_ip: str | None) -> None:
        waiting = Deadline(IDLE_TIMEOUT_SECONDS)  # one timer for all the connection's heads
        try:
            while not self._stopping:
                idle[0] = True
                try:
                    head = await waiting.wait(read_request_head(client))
                except TimeoutError:
                    return
                except HttpError as err:
                    client.write(
                        simple_response(err.status, err.message + "\n", keep_alive=False)
                    )
                    await client.drain()
                    return
                finally:
                    idle[0] = False
                if head is None:
                    return
                if not await self._handle(client, head, source_ip):
                    return
        finally:
            waiting.cancel()

    async def _handle(self, client: Stream, head: RequestHead, source_ip: str | None) -> bool:
        """Answer one request; whether the connection may go on."""
        raise NotImplementedError


class OutboundListener(HttpListener):
    """Plain HTTP from the app, each request routed by ``routes()`` (the view in effect)."""

    def __init__(
        self,
        listen: HostPort,
        forwarder: Forwarder,
        routes: Callable[[], OutboundRoutes | None],
        *,
        name: str = OUTBOUND,
    ) -> None:
        super().__init__(listen, forwarder, name=name)
        self._routes = routes

    def _bind_error(self, reason: str) -> str:
        return f"cannot listen on --outbound {self.listen}: {reason}; choose another --outbound"

    async def _handle(self, client: Stream, head: RequestHead, source_ip: str | None) -> bool:
        forwarder = self._forwarder
        exchange = forwarder.begin(self.name, client, head, source_ip=source_ip)
        routes = self._routes()
        if routes is None:
            return await forwarder.respond(
                exchange, 503, "this sidecar has not received the mesh configuration from its "
                "agent yet, so it routes nothing; try again shortly\n", details="not_ready",
            )  # fmt: skip
        host, port = split_host(exchange.authority)
        service = routes.service_for(host)
        if service is None:
            return await forwarder.respond(
                exchange, 404, f"the Host {exchange.authority or '(none)'!r} names no Service "
                "of the mesh this sidecar may call: send the Service's name (users-service, "
                "users-service:80) as the Host\n", flags="NR", details="route_not_found",
            )  # fmt: skip
        exchange.destination_service = service.service
        routes_of = service.routes
        request: HttpRequest | None = None
        if routes_of and not routes_of[0].matches:  # it takes every request: nothing to read
            route: Route | None = routes_of[0]
        else:
            request = HttpRequest(head.method, head.target, dict(head.headers), port)
            route = service.route_for(request)
        if route is None:
            return await forwarder.respond(
                exchange, 404, f"no route of {service.source} takes {head.method} "
                f"{head.target}: the Service has no HTTP port\n", flags="NR",
                details="route_not_found",
            )  # fmt: skip
        return await forwarder.forward(exchange, route, request)
