"""``tessera sidecar proxy``: mTLS in front of a local app, and mTLS on its way out.

::

    config = load_proxy_config("proxy.toml")
    proxy = Proxy(config, source)           # source: the workload's SVID (sdk.sidecar.connect)
    await proxy.start()                     # binds every listener, or SidecarConfigError
    ...
    await proxy.stop()                      # stop accepting, let connections finish (5 s)

**Inbound** listeners accept mTLS with the :mod:`sdk.tls` server context, so
the SVID presented and the bundles trusted follow every rotation without a
restart. With ``protocol = "tcp"`` the caller is judged *during the
handshake* (a refused peer never gets a byte through) and the bytes are then
spliced to ``forward``. With ``protocol = "http"`` the caller is judged right
*after* the handshake, so that it can be told why: a peer no allow rule names
(whatever its methods and paths), or a deny rule without methods and paths
names, gets its first request answered ``403`` with the rule and reason, and
the connection closed; then each request is judged with its method and path
(:mod:`sdk.sidecar.http_exchange`): ``403`` with the rule and reason, or on
to the app with ``X-Forwarded-Client-Spiffe-Id``.

**Outbound** listeners accept plain TCP from the local app, connect to
``upstream`` with the :mod:`sdk.tls` client context and refuse, in the
handshake, an upstream whose SPIFFE ID does not match; the local connection
is then closed and the reason logged. An upstream that closes right after
the handshake without a byte (how a TLS 1.3 server refusing the client's
certificate looks) is logged and counted as ``refused_by_upstream``.

While the source holds no SVID (``no_identity()``: the Workload API withdrew
it), every new connection is closed at once, both ways. Policy files are
read again when they change and on :meth:`Proxy.reload_policies` (SIGHUP); a
file that does not load leaves the policy in effect.

An inbound listener may be judged by another :class:`Judge` than its policy
(``Proxy(config, source, judges={"inbound": judge})``, then
:meth:`InboundListener.set_policy`): ``tessera sidecar run`` judges its
callers by the mesh's AuthorizationPolicies, replaced on every change.

Every decision and handshake is counted (:mod:`sdk.sidecar.metrics`), and
refusals are logged at INFO on the ``tessera.sidecar`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from sdk.address import HostPort
from sdk.errors import AuthorizationError, SdkError
from sdk.policy import Decision, Policy
from sdk.sidecar.config import (
    InboundConfig,
    ListenerProtocol,
    OutboundConfig,
    ProxyConfig,
)
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.http_exchange import (
    CLIENT_CERT_HEADER,
    SPIFFE_ID_HEADER,
    ConnectionState,
    HttpExchange,
    Judge,
    RequestObserver,
)
from sdk.sidecar.metrics import ProxyMetrics
from sdk.sidecar.streams import STREAM_LIMIT, Stream, splice
from sdk.sources import X509Source
from sdk.spiffeid import SpiffeId
from sdk.tls import mtls_client_context, mtls_server_context, peer_spiffe_id

__all__ = ["SHUTDOWN_GRACE_SECONDS", "Judge", "Proxy", "handshake_form", "handshake_policy"]

_log = logging.getLogger("tessera.sidecar")

HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
CONNECT_TIMEOUT_SECONDS: Final = 5.0
SHUTDOWN_GRACE_SECONDS: Final = 5.0
POLICY_CHECK_SECONDS: Final = 1.0
"""How often policy files are checked for a change."""
ACCEPT_RETRY_SECONDS: Final = 1.0
"""How long a listener waits before accepting again after accept() failed (no descriptors)."""
LISTEN_BACKLOG: Final = 1024


class Proxy:
    """Every listener of a proxy configuration, started and stopped together."""

    def __init__(
        self,
        config: ProxyConfig,
        source: X509Source,
        *,
        metrics: ProxyMetrics | None = None,
        policy_check_seconds: float = POLICY_CHECK_SECONDS,
        judges: Mapping[str, Judge] | None = None,
        observers: Mapping[str, RequestObserver] | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``judges``: by listener name, what judges an inbound listener instead of its
        ``policy``; ``observers``: by listener name, what an HTTP inbound listener tells of
        every request (``tessera sidecar run``'s telemetry). ``reuse_port``: bind every
        listener with ``SO_REUSEPORT``, so that other processes of this user (the workers
        of ``--workers``) can listen on the same addresses and the kernel spreads the
        connections among them."""
        self.config = config
        self._policy_check_seconds = policy_check_seconds
        self._policy_watch: asyncio.Task[None] | None = None
        self.metrics = metrics or ProxyMetrics()
        judges = judges or {}
        observers = observers or {}
        self.listeners: list[_Listener] = [
            *(InboundListener(c, source, self.metrics, judge=judges.get(c.name),
                              observer=observers.get(c.name))
              for c in config.inbound),
            *(OutboundListener(c, source, self.metrics) for c in config.outbound),
        ]
        # A source that can drop its identity (WorkloadApiX509Source) says so; others never do.
        no_identity: Callable[[], str | None] = getattr(source, "no_identity", _always_held)
        for listener in self.listeners:
            listener.no_identity = no_identity
            listener.reuse_port = reuse_port
        self._started = False

    async def start(self) -> None:
        """Listen everywhere; if one address cannot be bound, none stays bound."""
        try:
            for listener in self.listeners:
                await listener.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._started = True
        _freeze_startup_objects()
        if any(listener.config.policy_file for listener in self._inbound()):
            self._policy_watch = asyncio.create_task(self._watch_policy_files())

    def reload_policies(self) -> None:
        """Read every policy file again (SIGHUP); a file that does not load changes nothing."""
        for listener in self._inbound():
            if listener.config.policy_file is None:
                _log.info("%s: the policy is inline in %s; it changes with a restart (put it "
                          "in a policy file to reload it)", listener.name,
                          self.config.source)  # fmt: skip
            else:
                listener.reload_policy("on SIGHUP")

    async def _watch_policy_files(self) -> None:
        """Reload a policy file when it changes (its inode, size or modification time)."""
        while True:
            await asyncio.sleep(self._policy_check_seconds)
            for listener in self._inbound():
                if listener.policy_file_changed():
                    listener.reload_policy("the file changed")

    def _inbound(self) -> list[InboundListener]:
        return [listener for listener in self.listeners if isinstance(listener, InboundListener)]

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, close idle connections, give the others ``grace`` seconds."""
        self._started = False
        if self._policy_watch is not None:
            self._policy_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._policy_watch
            self._policy_watch = None
        for listener in self.listeners:
            listener.stop_accepting()
        tasks = [task for listener in self.listeners for task in listener.begin_shutdown()]
        if tasks:
            pending = set(tasks)
            if grace > 0:
                _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self.listeners:
            await listener.wait_closed()

    def ready_problem(self) -> str | None:
        return None if self._started else "the listeners are not open"

    def bound(self, name: str) -> HostPort:
        """The address listener ``name`` really listens on."""
        return next(listener.bound for listener in self.listeners if listener.name == name)


def handshake_policy(policy: Policy) -> Policy:
    """What an HTTP listener checks at the handshake, before any request is known.

    Allow rules count without their methods and paths (a peer one of them
    names may be allowed some request), and deny rules with methods or paths
    are left for the requests.
    """
    return dataclasses.replace(
        policy,
        allow=tuple(dataclasses.replace(r, methods=frozenset(), paths=()) for r in policy.allow),
        deny=tuple(r for r in policy.deny if not r.methods and not r.paths),
    )


def handshake_form(judge: Policy | Judge) -> Policy | Judge:
    """What an HTTP listener judged by ``judge`` checks at the handshake: a policy's
    :func:`handshake_policy`, another judge's :meth:`~Judge.at_handshake`."""
    if isinstance(judge, Policy):
        return handshake_policy(judge)
    return judge.at_handshake()


# -- listeners ---------------------------------------------------------------------------


def _always_held() -> str | None:
    return None


def _authorize_any(peer_id: SpiffeId) -> None:
    """Any peer with a valid SVID completes the handshake (HTTP listeners judge it after)."""


class _Listener:
    name: str
    listen: HostPort
    no_identity: Callable[[], str | None] = staticmethod(_always_held)
    """Why the sidecar holds no SVID now, or None: checked for every new connection."""
    reuse_port = False
    """Listen with ``SO_REUSEPORT`` (``Proxy(reuse_port=True)``)."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], ConnectionState] = {}
        self._stopping = False
        metrics.register_listener(self.name)

    @property
    def bound(self) -> HostPort:
        sockets = self._listening()
        if not sockets:
            return self.listen
        return HostPort(self.listen.host, int(sockets[0].getsockname()[1]))

    def _listening(self) -> list[Any]:
        return list(self._server.sockets) if self._server is not None else []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._protocol, self.listen.host, self.listen.port, reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        except OSError as err:
            raise self._cannot_listen(err) from err

    def _cannot_listen(self, err: OSError) -> SidecarConfigError:
        return SidecarConfigError(
            f"{self.name}: cannot listen on {self.listen}: {err.strerror or err}; choose "
            "another address in the proxy config"
        )

    def stop_accepting(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()

    def begin_shutdown(self) -> list[asyncio.Task[Any]]:
        """Cancel the idle connections; the tasks of all of them, to wait for."""
        for task, state in list(self._connections.items()):
            state.stopping = True
            if state.idle:
                task.cancel()
        return list(self._connections)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _protocol(self) -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        return asyncio.StreamReaderProtocol(reader, self._accepted)

    def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Stream:
        """A client connection's stream, its bytes counted for this listener."""
        return Stream(
            reader,
            writer,
            on_read=self.metrics.bytes_tally(self.name, "in").add,
            on_write=self.metrics.bytes_tally(self.name, "out").add,
        )

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = self._stream(reader, writer)

        async def serve(state: ConnectionState) -> None:
            await self._serve(client, state)

        await self._run_connection(client.peer, serve, client.close)

    async def _run_connection(
        self,
        peer: str,
        serve: Callable[[ConnectionState], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        """Serve one accepted connection (from ``peer``), counted, and close it afterwards."""
        task = asyncio.current_task()
        assert task is not None
        state = ConnectionState(stopping=self._stopping)
        self._connections[task] = state
        self.metrics.connections.labels(self.name).inc()
        gauge = self.metrics.open_connections.labels(self.name)
        gauge.inc()
        try:
            if self.no_identity() is None:
                await serve(state)
            else:  # never present an SVID that was withdrawn, nor one from before
                self.metrics.handshake_failures.labels(self.name, "no_identity").inc()
                _log.debug("%s: closed the connection from %s: this sidecar holds no SVID now",
                           self.name, peer)  # fmt: skip
        except asyncio.CancelledError:
            pass  # shutdown
        except OSError as err:
            _log.debug("%s: the connection from %s ended: %s", self.name, peer, err)
        except SdkError as err:  # e.g. the SVID was withdrawn during the handshake
            _log.info("%s: the connection from %s ended: %s", self.name, peer, err)
        except Exception:
            _log.exception("%s: the connection from %s failed", self.name, peer)
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await close()
            gauge.dec()
            del self._connections[task]

    async def _serve(self, client: Stream, state: ConnectionState) -> None:
        raise NotImplementedError

    async def _handshake(
        self, stream: Stream, context: ssl.SSLContext, who: str, *, server_hostname: str | None
    ) -> bool:
        """TLS on ``stream``; False (counted, logged) if it failed or the peer was refused."""
        started = time.perf_counter()
        try:
            await stream.writer.start_tls(
                context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS,
            )
        except Exception as err:
            self._handshake_failed(err, who)
            return False
        self.metrics.handshake_seconds.labels(self.name).observe(time.perf_counter() - started)
        return True

    def _handshake_failed(self, err: Exception, who: str) -> None:
        reason, message = _handshake_failure(err)
        self.metrics.handshake_failures.labels(self.name, reason).inc()
        _log.info("%s: TLS handshake with %s failed (%s): %s", self.name, who, reason, message)

    async def _connect(self, address: HostPort, what: str) -> Stream | None:
        try:
            return await Stream.connect(address, timeout=CONNECT_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as err:
            self.metrics.forward_failures.labels(self.name).inc()
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            _log.warning("%s: cannot reach %s at %s: %s", self.name, what, address, reason)
            return None


class InboundListener(_Listener):
    """mTLS in, policy in the handshake (and per request in HTTP mode), plaintext to the app."""

    def __init__(
        self,
        config: InboundConfig,
        source: X509Source,
        metrics: ProxyMetrics,
        *,
        judge: Judge | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self.name = config.name
        self.listen = config.listen
        self.config = config
        super().__init__(metrics)
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._handed: set[asyncio.Task[None]] = set()
        self.policy: Policy | Judge = config.policy if judge is None else judge
        """The policy (or judge) in effect: ``config.policy`` unless a ``judge`` is given;
        replaced by :meth:`set_policy`."""
        self._policy_stamp = _file_stamp(config.policy_file) if config.policy_file else None
        self._source = source
        self._observer = observer
        self._http = config.protocol is ListenerProtocol.HTTP
        # TCP: the policy judges the peer in the handshake. HTTP: after it, so that a refused
        # caller can be told why in a 403 (the handshake still requires a valid SVID).
        authorizer = _authorize_any if self._http else self._authorize_connection
        self._context = mtls_server_context(source, authorizer)

    def set_policy(self, policy: Policy | Judge) -> None:
        """Judge new connections, and the next requests of open HTTP ones, with ``policy``."""
        self.policy = policy

    def policy_file_changed(self) -> bool:
        path = self.config.policy_file
        return path is not None and _file_stamp(path) != self._policy_stamp

    def reload_policy(self, why: str) -> None:
        """Load the policy file again and put it in effect; if it does not load, keep the one in
        effect and say so."""
        path = self.config.policy_file
        if path is None:
            return
        self._policy_stamp = _file_stamp(path)
        try:
            policy = self.config.load_policy()
        except SidecarConfigError as err:
            _log.error("%s: reloading the policy file %s (%s) failed, so the policy loaded before "
                       "stays in effect: %s", self.name, path, why, err.message)  # fmt: skip
            return
        self.set_policy(policy)
        _log.info("%s: reloaded the policy file %s (%s): %d allow and %d deny rules in %s mode "
                  "now judge new connections and the next requests", self.name, path, why,
                  len(policy.allow), len(policy.deny), policy.mode.value)  # fmt: skip

    # TLS from the first byte: the listener accepts the sockets itself and hands each to the
    # loop with the server context, so no byte is ever read as plain text. (Accepted plain
    # and upgraded with start_tls, a ClientHello may arrive before the upgrade: uvloop starts
    # reading as soon as a protocol is connected, whatever it asked.)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._sockets = await _listening_sockets(self.listen, reuse_port=self.reuse_port)
        except OSError as err:
            raise self._cannot_listen(err) from err
        self._accepting = [loop.create_task(self._accept(sock)) for sock in self._sockets]

    def _listening(self) -> list[Any]:
        return list(self._sockets)

    def stop_accepting(self) -> None:
        self._stopping = True
        for task in self._accepting:
            task.cancel()
        for sock in self._sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting, self._sockets = [], []

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listening)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as err:  # e.g. out of file descriptors: wait, as asyncio's servers do
                _log.warning("%s: accepting a connection failed: %s; trying again in %.0f s",
                             self.name, err, ACCEPT_RETRY_SECONDS)  # fmt: skip
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            task = loop.create_task(self._accepted_socket(conn))
            self._handed.add(task)  # until it runs and counts itself in _connections
            task.add_done_callback(self._handed.discard)

    async def _accepted_socket(self, conn: socket.socket) -> None:
        peer = _peer_name(conn)
        opened: list[Stream] = []

        async def serve(state: ConnectionState) -> None:
            client = await self._tls_accept(conn, f"client {peer}")
            if client is not None:
                opened.append(client)
                await self._serve(client, state)

        async def close() -> None:
            if opened:
                await opened[0].close()
            else:
                conn.close()

        await self._run_connection(peer, serve, close)

    async def _tls_accept(self, conn: socket.socket, who: str) -> Stream | None:
        """The TLS server side on ``conn``; None (counted, logged) if the handshake failed or
        the peer was refused."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        started = time.perf_counter()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS,
            )  # fmt: skip
        except Exception as err:
            self._handshake_failed(err, who)
            return None
        self.metrics.handshake_seconds.labels(self.name).observe(time.perf_counter() - started)
        return self._stream(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    def _decide_connection(self, peer_id: SpiffeId) -> Decision:
        """The connection-level decision (for HTTP: without methods and paths), counted."""
        policy = handshake_form(self.policy) if self._http else self.policy
        decision = policy.decide(peer_id)
        self.metrics.decision(self.name, "handshake", decision.rule, decision.allowed)
        return decision

    def _authorize_connection(self, peer_id: SpiffeId) -> None:
        """The authorizer of a TCP listener's handshake."""
        decision = self._decide_connection(peer_id)
        if not decision.allowed:
            raise AuthorizationError(peer_id, f"policy rule {decision.rule!r}", decision.reason)

    def _request_decided(self, decision: Decision) -> None:
        self.metrics.decision(self.name, "request", decision.rule, decision.allowed)

    async def _serve(self, client: Stream, state: ConnectionState) -> None:
        if not self._http:
            app = await self._connect(self.config.forward, "the app")
            if app is None:
                return
            try:
                await splice(client, app)
            finally:
                await app.close()
            return
        tls = client.writer.get_extra_info("ssl_object")
        peer_id = peer_spiffe_id(tls)
        exchange = HttpExchange(
            client,
            peer_id,
            forward=self.config.forward,
            policy=lambda: self.policy,
            identity_headers=self._identity_headers(peer_id, tls.getpeercert(binary_form=True)),
            decided=self._request_decided,
            listener=self.name,
            state=state,
            observer=self._observer,
        )
        decision = self._decide_connection(peer_id)
        if decision.allowed:
            await exchange.run()
        else:
            _log.info("%s: refused %s (client %s) by policy rule %r: %s; answering 403",
                      self.name, peer_id, client.peer, decision.rule, decision.reason)  # fmt: skip
            await exchange.refuse(decision)

    def _identity_headers(self, peer_id: SpiffeId, peer_der: bytes) -> list[tuple[str, str]]:
        own_id = self._source.x509_svid().spiffe_id
        digest = hashlib.sha256(peer_der).hexdigest()
        return [
            (SPIFFE_ID_HEADER, str(peer_id)),
            (CLIENT_CERT_HEADER, f"By={own_id};Hash={digest};URI={peer_id}"),
        ]


class OutboundListener(_Listener):
    """Plaintext in from the local app, mTLS out to an upstream whose SPIFFE ID must match."""

    def __init__(self, config: OutboundConfig, source: X509Source, metrics: ProxyMetrics) -> None:
        self.name = config.name
        self.listen = config.listen
        self.config = config
        super().__init__(metrics)
        authorizer = config.authorizer()

        def authorize(peer_id: SpiffeId) -> None:
            try:
                authorizer(peer_id)
            except AuthorizationError:
                self.metrics.decision(self.name, "handshake", config.accept, False)
                raise
            self.metrics.decision(self.name, "handshake", config.accept, True)

        self._source = source
        self._context = mtls_client_context(source, authorize)

    async def _serve(self, client: Stream, state: ConnectionState) -> None:
        upstream_address = self.config.upstream
        upstream = await self._connect(upstream_address, "the upstream")
        if upstream is None:
            return
        try:
            who = f"upstream {upstream_address} (for {client.peer})"
            if await self._handshake(upstream, self._context, who,
                                     server_hostname=upstream_address.host):  # fmt: skip
                received = _ByteCount()
                upstream.count_reads(received)
                ended_first = await splice(client, upstream)
                if ended_first is upstream and not received.total:
                    self._refused_by_upstream(upstream)
        finally:
            await upstream.close()

    def _refused_by_upstream(self, upstream: Stream) -> None:
        """The upstream closed right after the handshake without a byte: in TLS 1.3 that is how
        a server refusing the client's certificate looks (it cannot send an alert in time)."""
        self.metrics.handshake_failures.labels(self.name, "refused_by_upstream").inc()
        tls = upstream.writer.get_extra_info("ssl_object")
        try:
            upstream_id = str(peer_spiffe_id(tls)) if tls is not None else "unknown"
            own_id = str(self._source.x509_svid().spiffe_id)
        except SdkError:
            own_id = "(none held now)"
        _log.info("%s: upstream %s (%s) closed the connection right after the TLS handshake, "
                  "before sending a byte: it most likely refused this sidecar's SVID %s; its "
                  "own log says why", self.name, self.config.upstream, upstream_id,
                  own_id)  # fmt: skip


@dataclasses.dataclass
class _ByteCount:
    total: int = 0

    def __call__(self, size: int) -> None:
        self.total += size


@functools.cache
def _freeze_startup_objects() -> None:
    """Once per process: keep what exists once the listeners are open out of the cyclic GC.

    Modules, configuration and the SVID source live as long as the process;
    left to the collector, every full collection walks all of them (tens of
    ms under load, with every connection stalled). Frozen, a full collection
    only walks what connections created since.
    """
    gc.collect()
    gc.freeze()


async def _listening_sockets(address: HostPort, *, reuse_port: bool = False
                             ) -> list[socket.socket]:
    """Non-blocking sockets listening on every address ``address`` names (as
    ``loop.create_server`` binds them), with ``SO_REUSEPORT`` if ``reuse_port``; OSError if
    one cannot be bound (none stays open)."""
    loop = asyncio.get_running_loop()
    host = address.host or None
    infos = await loop.getaddrinfo(host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # Linux: only sockets of the same effective uid share the address
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _peer_name(conn: socket.socket) -> str:
    """``host:port`` of the other end of ``conn``, for log lines."""
    try:
        name = conn.getpeername()
    except OSError:
        return "unknown"
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
        return f"{host}:{name[1]}"
    return "unknown"


def _file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is edited or replaced; None while it cannot be read."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _handshake_failure(err: Exception) -> tuple[str, str]:
    """(metrics reason, words) for a failed handshake."""
    cause = err.__cause__
    if isinstance(cause, AuthorizationError):
        return "refused", cause.message
    if isinstance(cause, SdkError):
        return "unauthenticated", cause.message
    if isinstance(err, ssl.SSLCertVerificationError):
        return "unauthenticated", err.verify_message or str(err)
    if isinstance(err, ssl.SSLError):
        reason = err.reason or str(err)
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "unauthenticated", "the peer presented no X509-SVID"
        return "tls", reason
    if isinstance(err, ConnectionAbortedError) and "longer than" in str(err):
        return "timeout", str(err)
    return "closed", str(err) or type(err).__name__
