"""``tessera gateway run --proxy builtin``: the mesh's ingress on the built-in proxy.

The same gateway as :class:`dataplane.gateway.Gateway` (the Gateways that select its
labels, the VirtualServices bound to them, mTLS into the mesh with the gateway's SVID),
carried by Tessera's own proxy instead of Envoy::

    gateway = BuiltinGateway(GatewaySettings(labels={"istio": "ingressgateway"}),
                             source, socket="unix:///run/tessera/agent.sock",
                             health_bind=HostPort("127.0.0.1", 15021), progress=print)
    await gateway.run(stop)

Every snapshot of the mesh from the agent (:mod:`dataplane.mesh_watch`) compiles the
gateway's view (:func:`mesh.compile.compile_view` for a
:class:`~mesh.proxy.GatewayProxy`), the view Envoy's gateway gets over xDS. Its
``gateway_listeners`` say which ports to listen on: one listener per port (plus
``--port-offset``) opens or closes as Gateways are applied or deleted, said on the
progress output in the Envoy gateway's words; routes, policies and instances take
effect at the next request, on open connections too.

Each request, as Envoy's gateway treats it (:func:`gateway_decision`):

1. the server is the one whose most specific host fits the ``Host`` (else the port's
   404); a server with ``tls.httpsRedirect`` answers a plain-HTTP request with a 301 to
   the same URL in https;
2. identity fields the caller sent (``X-Forwarded-Client-Spiffe-Id``,
   ``X-Forwarded-Client-Cert``, in any spelling) are dropped: callers come from outside
   the mesh and have no SPIFFE ID;
3. the AuthorizationPolicies selecting the gateway judge the request, the caller
   having no SPIFFE ID (``principals`` never match it, as for Envoy's RBAC on a
   plaintext or server-TLS caller); a refusal is Envoy's 403 ``RBAC: access denied``;
4. the route of the VirtualService bound to the server carries the request into the
   mesh (:class:`~dataplane.forwarding.Forwarder`), else the server's 404.

**HTTPS** ports serve their servers' certificate files (``tls.mode: SIMPLE``); with
several servers on a port, the client's SNI picks the certificate (the most specific of
their hosts, else the ``*`` server's, else the first's), and the ``Host`` picks the
routes, as with Envoy. The files are read when the port opens (or its servers change).

**JWTs are not checked** by the built-in proxy yet. So that a gateway told to check
them (a ``RequestAuthentication`` selecting it) never lets a token through unchecked, a
request carrying a token where one of its rules looks is refused with 401 saying so; a
request without one is judged as Envoy judges it (no request principal).

``/live``, ``/ready``, ``/metrics`` (the SVID's expiry, the mesh revision, and the
requests by listener, route and code of :mod:`dataplane.telemetry`) are served on
``health_bind``; ready means the SVID is held, the mesh's configuration arrived, every
port opened and at least one Gateway selects the labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import Gauge

from dataplane.balancing import Balancers
from dataplane.forwarding import Forwarder
from dataplane.gateway import GRACE_SECONDS, GatewaySettings, ListenerAnnouncer, no_gateway_sentence
from dataplane.mesh_watch import MeshSnapshot, MeshWatch
from dataplane.metrics import follow_svid_expiry
from dataplane.outbound import HttpListener
from dataplane.telemetry import RequestTelemetry
from dataplane.upstream import Upstreams
from mesh.compile import compile_view
from mesh.proxy import GatewayProxy
from mesh.request import HttpRequest, split_host
from mesh.view import (
    GatewayListener,
    JwtRule,
    Route,
    ServerTls,
    View,
    host_matches,
    host_specificity,
)
from sdk.address import HostPort
from sdk.errors import SourceError
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.http import RequestHead
from sdk.sidecar.http_exchange import reserved_identity_header
from sdk.sidecar.metrics import SvidMetrics
from sdk.sidecar.streams import Stream
from sdk.sources import WorkloadApiX509Source

__all__ = [
    "BuiltinGateway", "GatewayMetrics", "LocalAnswer", "gateway_decision", "gateway_head",
    "https_context", "token_sent",
]  # fmt: skip

_log = logging.getLogger("tessera.gateway")

SOURCE_CHECK_SECONDS: Final = 1.0
RBAC_DENIED: Final = "RBAC: access denied"
"""Envoy's body for a request its RBAC filter refuses."""
_ALPN: Final = ["http/1.1"]


# -- decisions (no sockets) ---------------------------------------------------------------


@dataclass(frozen=True)
class LocalAnswer:
    """The gateway's own answer to a request (not sent into the mesh)."""

    status: int
    text: str
    flags: str = "-"
    details: str = ""
    location: str | None = None


def gateway_head(head: RequestHead, *, tls: bool, source_ip: str | None) -> RequestHead:
    """The head as the gateway passes it on: the identity fields a caller sent dropped
    (it has no SPIFFE ID, and the mesh must not take one it wrote for its own), the
    client's address appended to ``X-Forwarded-For`` and ``X-Forwarded-Proto`` set, as
    Envoy's edge does (``use_remote_address``)."""
    fields = [(name, value) for name, value in head.headers
              if not reserved_identity_header(name)
              and name.lower() not in ("x-forwarded-proto", "x-forwarded-for")]  # fmt: skip
    forwarded = [value for name, value in head.headers if name.lower() == "x-forwarded-for"]
    if source_ip is not None:
        forwarded.append(source_ip)
    if forwarded:
        fields.append(("x-forwarded-for", ", ".join(forwarded)))
    fields.append(("x-forwarded-proto", "https" if tls else "http"))
    return dataclasses.replace(head, headers=tuple(fields))


def token_sent(rules: tuple[JwtRule, ...], request: HttpRequest) -> JwtRule | None:
    """The first rule in whose places (headers with their prefix, query parameters) the
    request carries a token, or None."""
    for rule in rules:
        for name, prefix in rule.locations.headers:
            value = request.header(name)
            if value is not None and value.startswith(prefix):
                return rule
        if any(param in request.query_params for param in rule.locations.params):
            return rule
    return None


def gateway_decision(
    view: View, port: int, authority: str, request: HttpRequest, *, tls: bool
) -> Route | LocalAnswer:
    """What the gateway does with a request on Gateway port ``port`` (before the offset):
    the route to carry out, or its own answer."""
    listener = view.listener(port)
    if listener is None:
        return LocalAnswer(404, f"no Gateway serves port {port} any more\n", "NR",
                           "route_not_found")  # fmt: skip
    server = listener.server_for(authority)
    if server is None:
        return LocalAnswer(listener.not_found.status, listener.not_found.reason + "\n", "NR",
                           "route_not_found")  # fmt: skip
    host, _ = split_host(authority)
    if server.https_redirect is not None and not tls:
        return LocalAnswer(301, "", details="redirect", location=f"https://{host}{request.path}")
    token = token_sent(view.jwt_rules, request)
    if token is not None:
        return LocalAnswer(
            401, f"this gateway runs the built-in proxy, which does not check JWTs yet, and "
            f"{token.source} asks for them to be checked: the request is refused rather than "
            "let through unchecked; run the gateway with --proxy envoy\n",
            details="jwt_authn_access_denied{not checked by the built-in proxy}",
        )  # fmt: skip
    decided = view.authorization.decide(None, request)
    for audited in decided.audited:
        _log.info("AUDIT: %s %s matches %s", request.method, request.path, audited)
    if not decided.allowed:
        _log.info("refused %s %s by %s: %s", request.method, request.path, decided.rule,
                  decided.reason)  # fmt: skip
        return LocalAnswer(403, RBAC_DENIED, "RBAC",
                           f"rbac_access_denied_matched_policy[{decided.rule}]")  # fmt: skip
    virtual_host = server.virtual_host_for(host)
    route = virtual_host.route_for(request) if virtual_host is not None else None
    if route is None:
        return LocalAnswer(server.not_found.status, server.not_found.reason + "\n", "NR",
                           "route_not_found")  # fmt: skip
    return route


# -- TLS ------------------------------------------------------------------------------------


class TlsProblem(Exception):
    """A server's certificate or key does not load."""


def _server_context(tls: ServerTls, source: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    try:
        context.load_cert_chain(tls.server_certificate, tls.private_key)
    except (OSError, ssl.SSLError) as err:
        raise TlsProblem(
            f"{source}: cannot load its serverCertificate {tls.server_certificate} and "
            f"privateKey {tls.private_key}: {getattr(err, 'strerror', None) or err}"
        ) from err
    return context


def https_context(listener: GatewayListener) -> ssl.SSLContext:
    """The TLS context of an HTTPS port: its servers' certificates, the client's SNI
    picking among them; TlsProblem when a file does not load or no server has TLS."""
    servers = [(server, _server_context(server.tls, str(server.source)))
               for server in listener.servers if server.tls is not None]  # fmt: skip
    if not servers:
        raise TlsProblem(f"{listener.source}: an HTTPS port without a server with tls")
    default = next((context for server, context in servers if "*" in server.hosts),
                   servers[0][1])  # fmt: skip
    if len(servers) > 1:

        def pick(connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            if not name:
                return
            host = name.lower()
            best: tuple[tuple[int, int], ssl.SSLContext] | None = None
            for server, context in servers:
                for pattern in server.hosts:
                    if host_matches(pattern, host) and (
                        best is None or host_specificity(pattern) > best[0]
                    ):
                        best = (host_specificity(pattern), context)
            if best is not None and best[1] is not default:
                connection.context = best[1]

        default.sni_callback = pick
    return default


def _port_key(listener: GatewayListener) -> tuple[object, ...]:
    """What opening a port reads: a change of it reopens the port."""
    return (listener.protocol, tuple(
        (server.hosts, server.tls.server_certificate, server.tls.private_key)
        for server in listener.servers if server.tls is not None
    ))  # fmt: skip


# -- the gateway ------------------------------------------------------------------------


class GatewayMetrics(SvidMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.mesh_revision = Gauge(
            "tessera_sidecar_mesh_revision",
            "The mesh revision the proxy runs with (0: none received yet)",
            registry=self.registry,
        )


class _PortListener(HttpListener):
    """One Gateway port: each request decided by the view in effect."""

    def __init__(self, gateway: BuiltinGateway, port: int, listen: HostPort,
                 key: tuple[object, ...], context: ssl.SSLContext | None) -> None:  # fmt: skip
        super().__init__(listen, gateway.forwarder, name=f"gateway_{port}", ssl=context)
        self.port = port
        self.key = key
        self._gateway = gateway

    def _bind_error(self, reason: str) -> str:
        return f"cannot listen on {self.listen} for port {self.port}: {reason}"

    async def _handle(self, client: Stream, head: RequestHead, source_ip: str | None) -> bool:
        tls = self._ssl is not None
        head = gateway_head(head, tls=tls, source_ip=source_ip)
        forwarder = self._forwarder
        exchange = forwarder.begin(self.name, client, head, source_ip=source_ip)
        view = self._gateway.view
        if view is None:
            return await forwarder.respond(
                exchange, 503, "this gateway has not received the mesh configuration from "
                "its agent yet; try again shortly\n", details="not_ready",
            )  # fmt: skip
        request = HttpRequest(head.method, head.target, dict(head.headers), self.port)
        decision = gateway_decision(view, self.port, exchange.authority, request, tls=tls)
        if isinstance(decision, LocalAnswer):
            extra = (("location", decision.location),) if decision.location else ()
            return await forwarder.respond(exchange, decision.status, decision.text,
                                           flags=decision.flags, details=decision.details,
                                           extra=extra)  # fmt: skip
        return await forwarder.forward(exchange, decision, request)


class BuiltinGateway:
    """The gateway on the built-in proxy; the surface of :class:`dataplane.gateway.Gateway`."""

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
        self.metrics = GatewayMetrics()
        self._source = source
        self._progress = progress
        self._grace = grace
        spiffe_id = settings.spiffe_id or str(source.x509_svid().spiffe_id)
        self._proxy = GatewayProxy(spiffe_id, settings.labels)
        self.telemetry = RequestTelemetry.from_environment(self.metrics.registry,
                                                           service_name=spiffe_id)  # fmt: skip
        self._balancers = Balancers()
        self._upstreams = Upstreams(source)
        self.forwarder = Forwarder(self._upstreams, self._balancers, self.telemetry,
                                   source=spiffe_id)  # fmt: skip
        self._watch = MeshWatch(socket=socket, on_snapshot=self._apply)
        self.view: View | None = None
        self._listeners: dict[int, _PortListener] = {}
        self._failures: dict[int, str] = {}
        self._said_problems: set[str] = set()
        self._draining: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._announcer = ListenerAnnouncer(settings, progress)
        self._health = (
            HealthServer(health_bind, self.metrics, ready=self.ready_problem)
            if health_bind is not None else None
        )  # fmt: skip
        self._stopping = False

    @property
    def health_url(self) -> str | None:
        return self._health.url if self._health is not None else None

    @property
    def listening(self) -> Mapping[int, HostPort]:
        """Each Gateway port listened on, and the address (its port as bound)."""
        return {port: listener.bound for port, listener in self._listeners.items()}

    def ready_problem(self) -> str | None:
        if self._stopping:
            return "the gateway is stopping"
        problem = self._source.problem() or self._source.no_identity()
        if problem is not None:
            return problem
        view = self.view
        if view is None:
            return ("no mesh configuration from the agent yet: "
                    f"{self._watch.problem or 'waiting for its first snapshot'}")  # fmt: skip
        if self._failures:
            return "; ".join(reason for _, reason in sorted(self._failures.items()))
        if not view.gateway_listeners:
            return no_gateway_sentence(self.settings.labels)
        if not self._listeners:
            return "the gateway's ports are opening"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then let open connections finish and stop."""
        unsubscribe = follow_svid_expiry(self._source, self.metrics)
        watching = asyncio.create_task(self._watch.run())
        reconciling = asyncio.create_task(self._reconcile_forever())
        try:
            if self._health is not None:
                await self._health.start()
            self._progress(f"  proxy:   built-in, configured by the agent's mesh snapshots "
                           f"(for {self._proxy})")  # fmt: skip
            if self._health is not None:
                self._progress(f"  health:  {self._health.url}/ready, {self._health.url}/metrics")
            await self._until(stop, reconciling)
        finally:
            unsubscribe()
            self._stopping = True
            self._progress(f"Stopping: letting open connections finish (up to "
                           f"{self._grace:g} s)")  # fmt: skip
            for task in (watching, reconciling):
                task.cancel()
            await asyncio.gather(watching, reconciling, return_exceptions=True)
            listeners = list(self._listeners.values())
            self._listeners.clear()
            for listener in listeners:
                listener.stop_accepting()
            await asyncio.gather(*(listener.stop(self._grace) for listener in listeners),
                                 *self._draining, return_exceptions=True)  # fmt: skip
            await self._upstreams.close()
            await self.telemetry.close()
            if self._health is not None:
                await self._health.stop()

    async def _until(self, stop: asyncio.Event, reconciling: asyncio.Task[None]) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SOURCE_CHECK_SECONDS):
                    await stop.wait()
            if reconciling.done():
                reconciling.result()  # its failure, raised here
            problem = self._source.problem()
            if problem:
                raise SourceError(problem)

    def _apply(self, snapshot: MeshSnapshot) -> None:
        view = compile_view(snapshot.config, snapshot.catalog, self._proxy)
        self._balancers.update(view)  # before the view whose routes name its clusters
        self._upstreams.prune({endpoint.address for cluster in view.endpoints
                               for endpoint in cluster.endpoints})  # fmt: skip
        self.view = view
        self.metrics.mesh_revision.set(snapshot.revision)
        self._changed.set()

    async def _reconcile_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Open and close ports as the view in effect says."""
        view = self.view
        if view is None:
            return
        offset, host = self.settings.port_offset, self.settings.host
        wanted: dict[int, GatewayListener] = {}
        for listener in view.gateway_listeners:
            if 0 < listener.port + offset <= 65535:
                wanted[listener.port] = listener
            else:
                self._say_once(
                    f"{listener.source}: port {listener.port} plus the gateway's port offset "
                    f"{offset} is {listener.port + offset}, outside 1-65535: the gateway does "
                    "not listen for it (run it with another --port-offset)"
                )  # fmt: skip
        for port, running in list(self._listeners.items()):
            if port not in wanted or running.key != _port_key(wanted[port]):
                del self._listeners[port]
                running.stop_accepting()  # its socket closes now: the port may reopen
                task = asyncio.create_task(running.stop(self._grace))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
        self._failures = {port: reason for port, reason in self._failures.items()
                          if port in wanted}  # fmt: skip
        for port, listener in sorted(wanted.items()):
            if port in self._listeners:
                continue
            key = _port_key(listener)
            try:
                context = https_context(listener) if listener.protocol == "HTTPS" else None
                opened = _PortListener(self, port, HostPort(host, port + offset), key, context)
                await opened.start()
            except (TlsProblem, SidecarConfigError) as err:
                reason = f"cannot serve port {port}: {err}"
                if self._failures.get(port) != reason:
                    self._failures[port] = reason
                    self._progress(f"  {reason}")
                continue
            self._failures.pop(port, None)
            self._listeners[port] = opened
        if self._listeners or not view.gateway_listeners:  # not "no Gateway" when ports failed
            self._announcer.listening({port: str(listener.listen)
                                       for port, listener in self._listeners.items()})  # fmt: skip

    def _say_once(self, problem: str) -> None:
        if problem not in self._said_problems:
            self._said_problems.add(problem)
            self._progress(f"  {problem}")
