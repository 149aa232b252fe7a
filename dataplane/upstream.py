"""The built-in proxy's connections to upstream instances: mTLS, HTTP/1.1, kept alive.

An endpoint of a cluster is another sidecar's inbound listener (built-in or Envoy, which
takes HTTP/1.1 by ALPN). The proxy presents its own SVID and accepts the upstream only if
its certificate carries one of the cluster's SPIFFE IDs (the Service's ``spiffeIds``),
judged in the handshake, as :class:`sdk.sidecar.proxy.OutboundListener` judges its
upstream::

    upstreams = Upstreams(source)
    connection = upstreams.idle(cluster, endpoint)            # a kept-alive one, or None
    connection = connection or await upstreams.connect(cluster, endpoint)  # or ConnectFailed
    connection.stream.write(...); ...                         # one request and its response
    upstreams.release(connection, cluster, reusable=True)     # back to the pool, or closed

The pool keeps at most :data:`MAX_IDLE_PER_ENDPOINT` idle connections per endpoint, each
for the cluster's ``connectionPool.idleTimeout`` at most; one the upstream closed while
idle is dropped when taken. Connections are keyed by address and the SPIFFE IDs accepted,
so a Service whose IDs change never reuses a connection judged by the old ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Final

from mesh.view import Cluster, Endpoint
from sdk.address import HostPort
from sdk.authorize import Authorizer, authorize_one_of
from sdk.errors import AuthorizationError, SdkError
from sdk.sidecar.deadline import Deadline
from sdk.sidecar.streams import STREAM_LIMIT, Stream
from sdk.sources import X509Source
from sdk.spiffeid import SpiffeId
from sdk.tls import mtls_client_context, peer_spiffe_id

__all__ = [
    "MAX_IDLE_PER_ENDPOINT", "STREAM_IDLE_TIMEOUT", "ConnectFailed", "UpstreamConnection",
    "Upstreams",
]  # fmt: skip

MAX_IDLE_PER_ENDPOINT: Final = 64
"""Idle connections kept per endpoint; one more released is closed."""
STREAM_IDLE_TIMEOUT: Final = 300.0
"""Without a route timeout, how long a response head may take (Envoy's stream idle
timeout, 5 minutes), and how long a body may stall."""

_Key = tuple[HostPort, tuple[str, ...]]


class ConnectFailed(Exception):
    """No connection to the endpoint (refused, timed out, the TLS handshake failed or the
    upstream's SPIFFE ID is not the Service's): nothing of the request reached it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamConnection:
    """One mTLS connection to an endpoint, and who answered on it."""

    __slots__ = (
        "address", "idle_since", "key", "peer", "requests", "reused", "stream", "waiting",
    )  # fmt: skip

    def __init__(self, stream: Stream, key: _Key, peer: str) -> None:
        self.stream = stream
        self.waiting = Deadline(STREAM_IDLE_TIMEOUT)
        """On each response head waited for (Envoy's stream idle timeout)."""
        self.key = key
        self.address = key[0]
        self.peer = peer
        """The upstream's SPIFFE ID, as its certificate proved it."""
        self.requests = 0
        self.reused = False
        """Taken from the pool (it may have been closed by the upstream while idle)."""
        self.idle_since = 0.0

    def closed(self) -> bool:
        return self.stream.at_eof() or self.stream.writer.is_closing()

    async def close(self) -> None:
        self.waiting.cancel()
        await self.stream.close()


def _refuse_all(peer_id: SpiffeId) -> None:
    raise AuthorizationError(peer_id, "the cluster", "the Service names no SPIFFE ID")


class Upstreams:
    """mTLS connections to endpoints, a pool of idle ones per endpoint."""

    def __init__(
        self,
        source: X509Source,
        *,
        max_idle_per_endpoint: int = MAX_IDLE_PER_ENDPOINT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._max_idle = max_idle_per_endpoint
        self._clock = clock
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._idle: dict[_Key, list[UpstreamConnection]] = {}

    def _context(self, identities: tuple[str, ...]) -> ssl.SSLContext:
        context = self._contexts.get(identities)
        if context is None:
            authorizer: Authorizer = authorize_one_of(*identities) if identities else _refuse_all
            context = mtls_client_context(self._source, authorizer)
            context.set_alpn_protocols(["http/1.1"])
            if len(self._contexts) > 256:  # Services come and go: keep the cache bounded
                self._contexts.clear()
            self._contexts[identities] = context
        return context

    def idle(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamConnection | None:
        """A kept-alive connection to ``endpoint``, or None."""
        key = (endpoint.address, cluster.peer_identities.spiffe_ids)
        pool = self._idle.get(key)
        if not pool:
            return None
        horizon = self._clock() - cluster.connection_pool.idle_timeout.total_seconds()
        while pool:
            connection = pool.pop()
            if connection.idle_since >= horizon and not connection.closed():
                connection.reused = True
                return connection
            _close_soon(connection)
        return None

    async def connect(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamConnection:
        """A new connection to ``endpoint``; ConnectFailed says why there is none."""
        address = endpoint.address
        identities = cluster.peer_identities.spiffe_ids
        timeout = cluster.connection_pool.connect_timeout.total_seconds()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    address.host, address.port, ssl=self._context(identities),
                    server_hostname=address.host, ssl_handshake_timeout=timeout,
                    limit=STREAM_LIMIT,
                ),
                timeout,
            )  # fmt: skip
        except TimeoutError as err:
            raise ConnectFailed(f"no connection to {address} within {timeout:g} s") from err
        except ssl.SSLError as err:
            raise ConnectFailed(f"the TLS handshake with {address} failed: {_tls(err)}") from err
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise ConnectFailed(f"cannot connect to {address}: {reason}") from err
        try:
            peer = str(peer_spiffe_id(writer.get_extra_info("ssl_object")))
        except SdkError as err:  # not reached with a context of sdk.tls
            writer.close()
            raise ConnectFailed(f"{address}: {err}") from err
        return UpstreamConnection(Stream(reader, writer), (address, identities), peer)

    def release(self, connection: UpstreamConnection, cluster: Cluster, *, reusable: bool) -> None:
        """The request on ``connection`` is done: keep it for the next, or close it."""
        connection.requests += 1
        limit = cluster.connection_pool.max_requests_per_connection
        pool = self._idle.setdefault(connection.key, [])
        if (
            not reusable
            or (limit is not None and connection.requests >= limit)
            or len(pool) >= self._max_idle
            or connection.closed()
        ):
            _close_soon(connection)
            return
        connection.idle_since = self._clock()
        connection.reused = False
        pool.append(connection)

    def discard(self, connection: UpstreamConnection) -> None:
        """Close ``connection`` (it failed, or its response was not read to the end)."""
        _close_soon(connection)

    def prune(self, addresses: set[HostPort]) -> None:
        """Close the idle connections to endpoints no longer in the view."""
        for key in [key for key in self._idle if key[0] not in addresses]:
            for connection in self._idle.pop(key):
                _close_soon(connection)

    async def close(self) -> None:
        idle = [connection for pool in self._idle.values() for connection in pool]
        self._idle.clear()
        await asyncio.gather(*(connection.close() for connection in idle), return_exceptions=True)


_closing: set[asyncio.Task[None]] = set()


def _close_soon(connection: UpstreamConnection) -> None:
    """Close without waiting for the close_notify to go out (the request goes on)."""
    writer = connection.stream.writer
    if writer.is_closing():
        return
    with contextlib.suppress(RuntimeError):  # no running loop: nothing to wait for
        task = asyncio.get_running_loop().create_task(connection.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return
    writer.close()


def _tls(err: ssl.SSLError) -> str:
    cause = err.__cause__
    if isinstance(cause, SdkError):
        return cause.message
    if isinstance(err, ssl.SSLCertVerificationError):
        return err.verify_message or str(err)
    return err.reason or str(err)
