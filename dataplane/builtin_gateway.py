"""``tessera gateway run --proxy builtin``: the mesh's ingress on the built-in proxy.

The same gateway as :mod:`dataplane.gateway` (Envoy's), carried by Tessera's own proxy::

    gateway = BuiltinGateway(GatewaySettings(labels={"istio": "ingressgateway"}), source,
                             socket="unix:///run/tessera/agent.sock",
                             health_bind=HostPort("127.0.0.1", 15021), progress=print)
    await gateway.run(stop)

Every snapshot of the mesh from the agent (:class:`~dataplane.mesh_watch.MeshWatch`)
compiles the gateway's view (:func:`mesh.compile.compile_view` for a
:class:`~mesh.proxy.GatewayProxy` of its SPIFFE ID and labels), the view Envoy's gateway
gets over xDS. Each of the view's ports gets a listener on ``host:port + port_offset``;
a port that leaves the view is closed (its open connections get the grace period), a new
one opened, and one whose protocol or certificates changed opened again. A request is
taken as Envoy's gateway takes it: the server whose host fits its ``Host`` (or a 404),
an HTTPS redirect if the server asks for one, the VirtualService bound to that server
and host, its first matching route (else a 404), the AuthorizationPolicies that select
the gateway (a caller from outside has no SPIFFE ID: a rule naming principals never
matches it), then :class:`~dataplane.forwarding.Forwarder` carries the route out into the
mesh with the gateway's own SVID, as a sidecar's outbound does.

An HTTPS port terminates TLS with its servers' certificate files (``tls.mode: SIMPLE``;
the server is chosen by SNI when several on a port have certificates of their own).

What it does not do: validate JWTs. A ``RequestAuthentication`` that applies to the
gateway would be a check Envoy makes and this proxy cannot, so every request on such a
gateway is refused (401, naming the resource) rather than let through unchecked; run
``--proxy envoy`` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from dataplane.balancing import Balancers
from dataplane.builtin_metrics import BalancingCollector
from dataplane.forwarding import Forwarder
from dataplane.gateway import GRACE_SECONDS, SOURCE_CHECK_SECONDS, GatewaySettings
from dataplane.mesh_watch import MeshSnapshot, MeshWatch
from dataplane.metrics import follow_svid_expiry
from dataplane.outbound import OutboundListener
from dataplane.telemetry import RequestTelemetry
from dataplane.upstream import Upstreams
from mesh.compile import compile_view
from mesh.proxy import GatewayProxy
from mesh.request import HttpRequest, split_host
from mesh.view import GatewayListener, ServerTls, View
from sdk.address import HostPort
from sdk.errors import SourceError
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.http import RequestHead
from sdk.sidecar.metrics import SvidMetrics
from sdk.sidecar.streams import Stream
from sdk.sources import WorkloadApiX509Source

__all__ = ["BuiltinGateway"]

_log = logging.getLogger("tessera.gateway")

_NO_RAW_VALUE: Final = "(none)"


@dataclass(frozen=True)
class _PortShape:
    """What a port's listener is opened with: a change reopens it."""

    protocol: str
    certificates: tuple[ServerTls, ...]


def _shape(listener: GatewayListener) -> _PortShape:
    certificates = tuple(server.tls for server in listener.servers if server.tls is not None)
    return _PortShape(listener.protocol, certificates)


def _tls_context(listener: GatewayListener) -> ssl.SSLContext:
    """The server context of an HTTPS port: the first server's certificate, and the
    others' by SNI. OSError / ssl.SSLError when a file does not load."""
    contexts: list[tuple[tuple[str, ...], ssl.SSLContext]] = []
    for server in listener.servers:
        if server.tls is None:
            continue
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(server.tls.server_certificate, server.tls.private_key)
        context.set_alpn_protocols(["http/1.1"])
        contexts.append((server.hosts, context))
    if not contexts:
        raise ssl.SSLError(f"no server of {listener.source} has a certificate")
    default = contexts[0][1]
    if len(contexts) > 1:

        def by_name(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            server = listener.server_for(name or "")
            chosen = next((context for hosts, context in contexts
                           if server is not None and hosts == server.hosts), None)  # fmt: skip
            if chosen is not None:
                sock.context = chosen

        default.sni_callback = by_name
    return default


class _GatewayPort(OutboundListener):
    """One port of the gateway: each request routed by the Gateway servers on it."""

    def __init__(
        self, port: int, listen: HostPort, forwarder: Forwarder,
        view: Callable[[], View | None], *, tls: ssl.SSLContext | None, offset: int,
    ) -> None:  # fmt: skip
        super().__init__(listen, forwarder, lambda: None, name=f"gateway_{port}", ssl=tls,
                         what=f"port {port} + --port-offset {offset} =")  # fmt: skip
        self.port = port
        self._view = view

    async def _handle(self, client: Stream, head: RequestHead, source_ip: str | None) -> bool:
        forwarder = self._forwarder
        exchange = forwarder.begin(self.name, client, head, source_ip=source_ip)
        view = self._view()
        listener = view.listener(self.port) if view is not None else None
        if view is None or listener is None:
            return await forwarder.respond(
                exchange, 404, f"no Gateway serves port {self.port} now\n", flags="NR",
                details="route_not_found",
            )  # fmt: skip
        authority = exchange.authority or ""
        host, _ = split_host(authority.lower())
        server = listener.server_for(authority.lower())
        if server is None:
            return await forwarder.respond(exchange, listener.not_found.status,
                                           listener.not_found.reason + "\n", flags="NR",
                                           details="route_not_found")  # fmt: skip
        if server.https_redirect is not None and self._ssl is None:
            location = f"https://{authority}{head.target}"
            return await forwarder.respond(exchange, 301, f"moved to {location}\n",
                                           details="https_redirect",
                                           extra=(("location", location),))  # fmt: skip
        virtual_host = server.virtual_host_for(host)
        if virtual_host is None:
            return await forwarder.respond(exchange, server.not_found.status,
                                           server.not_found.reason + "\n", flags="NR",
                                           details="route_not_found")  # fmt: skip
        request = HttpRequest(head.method, head.target, dict(head.headers), self.port)
        jwt = next(iter(view.jwt_rules), None)
        if jwt is not None:
            return await forwarder.respond(
                exchange, 401, f"{jwt.source} applies to this gateway, and the built-in "
                "gateway does not validate JWTs: run tessera gateway run --proxy envoy\n",
                details="jwt_authn_unsupported",
            )  # fmt: skip
        decision = view.authorization.decide(None, request)
        if not decision.allowed:
            return await forwarder.respond(
                exchange, 403, f"refused by policy rule {str(decision.rule)!r}: "
                f"{decision.reason}\n",
                details=f"rbac_access_denied_matched_policy[{decision.rule}]",
            )  # fmt: skip
        route = virtual_host.route_for(request)
        if route is None:
            return await forwarder.respond(exchange, 404, f"no route of {virtual_host.source} "
                                           f"takes {head.method} {head.target}\n", flags="NR",
                                           details="route_not_found")  # fmt: skip
        return await forwarder.forward(exchange, route, request)


class BuiltinGateway:
    def __init__(
        self,
        settings: GatewaySettings,
        source: WorkloadApiX509Source,
        *,
        socket: str,
        health_bind: HostPort | None,
        progress: Callable[[str], None],
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self.metrics = SvidMetrics()
        self._source = source
        self._progress = progress
        self._grace = grace
        spiffe_id = settings.spiffe_id or str(source.x509_svid().spiffe_id)
        self._identity = GatewayProxy(spiffe_id, settings.labels)
        self.telemetry = RequestTelemetry.from_environment(self.metrics.registry,
                                                           service_name="gateway")  # fmt: skip
        self._balancers = Balancers()
        self._upstreams = Upstreams(source)
        self._forwarder = Forwarder(self._upstreams, self._balancers, self.telemetry,
                                    source=spiffe_id)  # fmt: skip
        self.metrics.registry.register(BalancingCollector(self._balancers.stats, dict))
        self._watch = MeshWatch(socket=socket, on_snapshot=self._apply)
        self._view: View | None = None
        self._ports: dict[int, tuple[_PortShape, _GatewayPort]] = {}
        self._port_problems: dict[int, str] = {}
        self._changes: asyncio.Queue[None] = asyncio.Queue()
        self._health = (
            HealthServer(health_bind, self.metrics, ready=self.ready_problem)
            if health_bind is not None else None
        )  # fmt: skip
        self._announced = False
        self._stopping = False

    @property
    def health_url(self) -> str | None:
        return self._health.url if self._health is not None else None

    @property
    def listeners(self) -> Mapping[str, HostPort]:
        """The ports listened on, by name (``gateway_80``), with their addresses."""
        return {port.name: port.bound for _, port in self._ports.values()}

    def ready_problem(self) -> str | None:
        if self._stopping:
            return "the gateway is stopping"
        problem = self._source.problem() or self._source.no_identity()
        if problem is None and self._view is None:
            problem = ("no mesh configuration from the agent yet: "
                       f"{self._watch.problem or 'waiting for its first snapshot'}")  # fmt: skip
        if problem is None and self._port_problems:
            port, reason = min(self._port_problems.items())
            problem = f"cannot serve port {port}: {reason}"
        if problem is None and not self._ports:
            problem = self._no_gateway()
        return problem

    def _no_gateway(self) -> str:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.labels.items()))
        return (f"no Gateway selects this gateway's labels ({labels}): apply one whose "
                "spec.selector matches them (tessera mesh get gateway)")  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then stop the listeners and let their open
        connections finish."""
        unsubscribe = follow_svid_expiry(self._source, self.metrics)
        watching = asyncio.create_task(self._watch.run())
        try:
            if self._health is not None:
                await self._health.start()
            self._progress("  proxy:   the built-in proxy, configured by the agent's view of "
                           "the mesh")  # fmt: skip
            if self._health is not None:
                self._progress(f"  health:  {self._health.url}/ready, {self._health.url}/metrics")
            await self._serve(stop)
        finally:
            unsubscribe()
            self._stopping = True
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            self._progress(f"Stopping: open connections get up to {self._grace:g} s")
            await asyncio.gather(*(port.stop(self._grace) for _, port in self._ports.values()))
            self._ports.clear()
            await self._upstreams.close()
            await self.telemetry.close()
            if self._health is not None:
                await self._health.stop()

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SOURCE_CHECK_SECONDS):
                    stopping = asyncio.ensure_future(stop.wait())
                    changed = asyncio.ensure_future(self._changes.get())
                    try:
                        await asyncio.wait({stopping, changed},
                                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    finally:
                        stopping.cancel()
                        changed.cancel()
            if stop.is_set():
                return
            await self._reconcile()
            problem = self._source.problem()
            if problem:
                raise SourceError(problem)

    def _apply(self, snapshot: MeshSnapshot) -> None:
        view = compile_view(snapshot.config, snapshot.catalog, self._identity)
        self._balancers.update(view)
        self._upstreams.prune({endpoint.address for cluster in view.endpoints
                               for endpoint in cluster.endpoints})  # fmt: skip
        self._view = view
        self._changes.put_nowait(None)

    async def _reconcile(self) -> None:
        """Open, close and reopen listeners so that they are the view's ports."""
        view = self._view
        if view is None:
            return
        wanted = {listener.port: listener for listener in view.gateway_listeners}
        offset = self.settings.port_offset
        changed = False
        for port, (shape, listening) in list(self._ports.items()):
            if port not in wanted or _shape(wanted[port]) != shape:
                del self._ports[port]
                await listening.stop(self._grace)
                changed = True
        for port, listener in sorted(wanted.items()):
            if port in self._ports:
                continue
            shifted = port + offset
            if not 0 < shifted < 65536:
                self._port_problems[port] = f"port {port} + --port-offset {offset} is {shifted}"
                continue
            try:
                tls = _tls_context(listener) if listener.protocol == "HTTPS" else None
            except (OSError, ssl.SSLError) as err:
                self._port_problems[port] = f"its certificate does not load: {err}"
                _log.warning("port %d: %s", port, self._port_problems[port])
                continue
            listening = _GatewayPort(port, HostPort(self.settings.host, shifted), self._forwarder,
                                     lambda: self._view, tls=tls, offset=offset)  # fmt: skip
            try:
                await listening.start()
            except SidecarConfigError as err:
                self._port_problems[port] = err.message
                _log.warning("%s", err.message)
                continue
            self._port_problems.pop(port, None)
            self._ports[port] = (_shape(listener), listening)
            changed = True
        for port in list(self._port_problems):
            if port not in wanted:
                del self._port_problems[port]
        if changed or not self._announced:
            self._say()

    def _say(self) -> None:
        if self._view is None:
            return
        if not self._ports:
            self._progress(f"  {self._no_gateway()}")
            return
        offset = self.settings.port_offset
        for port, (_, listening) in sorted(self._ports.items()):
            shifted = f" (port {port} + {offset})" if offset else ""
            self._progress(f"  listening on {listening.bound}{shifted}: Gateway servers of "
                           f"port {port}")  # fmt: skip
        if not self._announced and self.ready_problem() is None:
            self._announced = True
            self._progress("Gateway is ready. Ctrl-C stops it.")
