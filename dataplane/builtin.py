"""The built-in proxy as a sidecar's data plane (``tessera sidecar run --proxy builtin``).

Inbound, the mTLS listener of :mod:`sdk.sidecar.proxy` in HTTP mode, in front of the app,
judged by the mesh: every snapshot from the agent's ``WatchMesh``
(:mod:`dataplane.mesh_watch`) compiles the AuthorizationPolicies that select the
sidecar's labels into a new :class:`~dataplane.authorization.MeshJudge`, which judges
new connections and the next request of every open one (then the RateLimits of its
Service take their tokens: :mod:`dataplane.ratelimit`). Nothing is restarted and no
connection dropped; until the first snapshot every caller is refused with 403
(:data:`~dataplane.authorization.NOT_READY`).

Outbound (with ``--outbound``), the app's plain HTTP calls are routed by their ``Host``
through the sidecar's compiled view (:func:`mesh.compile.compile_view`, the view Envoy
gets over xDS), by :mod:`dataplane.outbound` and :mod:`dataplane.forwarding`, to the
Services' instances over mTLS (:mod:`dataplane.upstream`), balanced and limited by
:mod:`dataplane.balancing`. Every snapshot compiles a new view; each request reads the
one in effect, so a change reaches open connections at their next request::

    plane = BuiltinProxy(settings, source, metrics, socket="unix:///run/tessera/agent.sock")
    await plane.start()
    await plane.configured.wait()
    ...
    await plane.stop(grace=5.0)

Every request through the inbound is counted, logged and traced
(:mod:`dataplane.telemetry`): the access log where ``TESSERA_ACCESS_LOG`` says (stdout,
``off`` or an absolute path), spans to ``OTEL_EXPORTER_OTLP_ENDPOINT`` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from dataplane.authorization import NOT_READY, MeshJudge
from dataplane.balancing import Balancers
from dataplane.builtin_metrics import BalancingCollector
from dataplane.forwarding import Forwarder
from dataplane.mesh_watch import MeshSnapshot, MeshWatch
from dataplane.metrics import SidecarMetrics
from dataplane.outbound import OUTBOUND, OutboundListener, OutboundRoutes
from dataplane.planes import SidecarSettings
from dataplane.ratelimit import RateLimiter
from dataplane.telemetry import RequestTelemetry
from dataplane.upstream import Upstreams
from mesh.compile import (
    compile_authorization,
    compile_jwt_rules,
    compile_rate_limits,
    compile_view,
)
from mesh.proxy import SidecarProxy
from sdk.address import HostPort
from sdk.policy import Policy
from sdk.sidecar.config import InboundConfig, ListenerProtocol, ProxyConfig
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.proxy import InboundListener, Proxy
from sdk.sources import WorkloadApiX509Source

__all__ = ["INBOUND", "OUTBOUND", "BuiltinProxy"]

_log = logging.getLogger("tessera.sidecar")

INBOUND = "inbound"
"""The inbound listener's name, in logs and in the metrics' ``listener`` label."""


class BuiltinProxy:
    name = "builtin"

    def __init__(
        self,
        settings: SidecarSettings,
        source: WorkloadApiX509Source,
        metrics: SidecarMetrics,
        *,
        socket: str,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        inbound = InboundConfig(
            name=INBOUND, listen=settings.inbound, forward=settings.app,
            policy=Policy(source="unused: the mesh's AuthorizationPolicies judge"),
            protocol=ListenerProtocol.HTTP,
        )  # fmt: skip
        config = ProxyConfig(source="tessera sidecar run", inbound=(inbound,))
        self.telemetry = RequestTelemetry.from_environment(metrics.registry,
                                                           service_name=settings.service)
        observer = self.telemetry.inbound(
            INBOUND, destination_service=settings.service,
            upstream_cluster=f"inbound|{settings.app.port}||{settings.service}",
        )  # fmt: skip
        self._proxy = Proxy(config, source, metrics=metrics, judges={INBOUND: NOT_READY},
                            observers={INBOUND: observer})  # fmt: skip
        listener = self._proxy.listeners[0]
        assert isinstance(listener, InboundListener)
        self._inbound = listener
        self._watch = MeshWatch(socket=socket, on_snapshot=self._apply)
        self._watching: asyncio.Task[None] | None = None
        self._judge: MeshJudge | None = None
        self._rate_limits = RateLimiter()  # its buckets live across mesh revisions
        self._identity = SidecarProxy(settings.service, str(settings.spiffe_id), settings.labels)
        self._routes: OutboundRoutes | None = None
        self._balancers = Balancers()
        metrics.registry.register(
            BalancingCollector(self._balancers.stats, self._rate_limits.limited_totals)
        )
        self._upstreams = Upstreams(source)
        self._outbound: OutboundListener | None = None
        if settings.outbound is not None:
            forwarder = Forwarder(self._upstreams, self._balancers, self.telemetry,
                                  source=str(settings.spiffe_id))
            self._outbound = OutboundListener(settings.outbound, forwarder, lambda: self._routes)
        self.configured = asyncio.Event()

    @property
    def inbound_address(self) -> HostPort:
        return self._proxy.bound(INBOUND)

    @property
    def outbound_address(self) -> HostPort | None:
        """Where the outbound listener listens (its port as bound), or None without one."""
        return self._outbound.bound if self._outbound is not None else None

    async def start(self) -> None:
        try:
            await self._proxy.start()
        except SidecarConfigError as err:
            cause = err.__cause__
            if not (isinstance(cause, OSError) and cause.errno):
                raise
            raise SidecarConfigError(
                f"cannot listen on --inbound {self._settings.inbound}: "
                f"{os.strerror(cause.errno)}; choose another --inbound"
            ) from err
        if self._outbound is not None:
            try:
                await self._outbound.start()
            except SidecarConfigError:
                await self._proxy.stop(0)
                raise
        self._watching = asyncio.create_task(self._watch.run())

    def ready_problem(self) -> str | None:
        problem = self._proxy.ready_problem()
        if problem is None and self._judge is None:
            problem = ("no mesh configuration from the agent yet, so every caller is refused: "
                       f"{self._watch.problem or 'waiting for its first snapshot'}")  # fmt: skip
        return problem

    def failure(self) -> str | None:
        return None

    async def more_metrics(self) -> bytes:
        return b""

    def describe(self) -> list[str]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(self._settings.labels.items()))
        selecting = f"selecting {labels}" if labels else "without a selector (no --label)"
        lines = [
            f"inbound: mTLS {self.inbound_address} -> {self._settings.app} (HTTP; callers "
            f"judged by the AuthorizationPolicies {selecting})",
        ]
        if self._outbound is not None:
            lines.append(f"outbound: HTTP {self._outbound.bound} -> the mesh's Services by "
                         "Host, over mTLS (routes, retries, timeouts and balancing of the "
                         "mesh's view)")  # fmt: skip
        return lines

    def stop_accepting(self) -> None:
        for listener in self._proxy.listeners:
            listener.stop_accepting()
        if self._outbound is not None:
            self._outbound.stop_accepting()

    async def stop(self, grace: float) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        if self._outbound is not None:
            await asyncio.gather(self._proxy.stop(grace), self._outbound.stop(grace))
        else:
            await self._proxy.stop(grace)
        await self._upstreams.close()
        await self.telemetry.close()

    def _apply(self, snapshot: MeshSnapshot) -> None:
        authorization = compile_authorization(snapshot.config, self._settings.labels)
        if self._outbound is not None:
            view = compile_view(snapshot.config, snapshot.catalog, self._identity)
            self._balancers.update(view)  # before the routes that name its clusters
            self._routes = OutboundRoutes(view)
            self._upstreams.prune({endpoint.address for cluster in view.endpoints
                                   for endpoint in cluster.endpoints})  # fmt: skip
        changed = self._judge is None or self._judge.authorization != authorization
        self._rate_limits.update(compile_rate_limits(snapshot.config, self._settings.service))
        jwt_rules = compile_jwt_rules(snapshot.config, self._settings.labels)
        if jwt_rules and (self._judge is None or not self._judge.jwt_rules):
            _log.warning("%s selects this sidecar, and the built-in proxy does not validate "
                         "JWTs: every request is refused (401) until it is deleted or the "
                         "sidecar runs --proxy envoy", jwt_rules[0].source)  # fmt: skip
        self._judge = MeshJudge(authorization, revision=snapshot.revision,
                                rate_limits=self._rate_limits, jwt_rules=jwt_rules)  # fmt: skip
        self._inbound.set_policy(self._judge)
        self._metrics.mesh_revision.set(snapshot.revision)
        if changed:
            policies = sorted(
                {rule.policy for rule in authorization.rules}
                | {source.name for source in authorization.allow_policies}
            )
            _log.info("mesh revision %d: callers judged by %s", snapshot.revision,
                      ", ".join(f"AuthorizationPolicy {name}" for name in policies)
                      or "no AuthorizationPolicy: every caller with a trusted SVID is "
                      "allowed")  # fmt: skip
        self.configured.set()
