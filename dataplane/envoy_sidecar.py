"""Envoy as a sidecar's data plane (``tessera sidecar run --proxy envoy``).

The agent renders the sidecar's view of the mesh into Envoy's listeners, routes,
clusters and endpoints and serves them over ADS, with the SVID over SDS
(:mod:`workload_api.mesh_resources`); this plane writes the bootstrap that says which
view (:class:`~dataplane.agent_envoy.AgentEnvoy`), runs Envoy and follows it::

    inbound   mTLS on --inbound -> RBAC (AuthorizationPolicy) -> rate limits -> --app
    outbound  HTTP on --outbound (keep it on loopback), routed by Host -> mTLS upstreams

The plane is configured once Envoy has ACKed its first listeners (and their
certificates: a listener waits for its SVID before it is active); it is ready while the
inbound listener is active. An ``--inbound`` port 0 is chosen here, before the bootstrap
is written, so that a restarted Envoy listens where the catalog says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from typing import Final

from dataplane.agent_envoy import AgentEnvoy, envoy_log_level, host_name
from dataplane.mesh_watch import MeshSnapshot, MeshWatch
from dataplane.metrics import SidecarMetrics
from dataplane.planes import SidecarSettings
from mesh.envoy.listeners import INBOUND
from sdk.address import HostPort
from sdk.sidecar.errors import SidecarConfigError
from sdk.sources import WorkloadApiX509Source

__all__ = ["EnvoySidecar"]

NO_INBOUND: Final = (
    "Envoy has no inbound listener from the agent: is there a Service {service} with an "
    "HTTP port? (tessera mesh get service {service})"
)


class EnvoySidecar:
    name = "envoy"

    def __init__(
        self,
        settings: SidecarSettings,
        source: WorkloadApiX509Source,
        metrics: SidecarMetrics,
        *,
        socket: str,
        log_level: str = "info",
    ) -> None:
        self._settings = settings
        self._inbound = _with_port(settings.inbound)
        self.configured = asyncio.Event()
        metadata = {
            "tessera.proxy": "sidecar",
            "tessera.service": settings.service,
            "tessera.spiffe_id": str(settings.spiffe_id),
            "tessera.labels": json.dumps(dict(settings.labels), sort_keys=True),
            "tessera.inbound": str(self._inbound),
            "tessera.app": str(settings.app),
        }
        if settings.outbound is not None:
            metadata["tessera.outbound"] = str(settings.outbound)
        self.envoy = AgentEnvoy(
            node_id=f"sidecar~{host_name()}~{settings.service}~{self._inbound.port}",
            node_cluster=settings.service,
            socket=socket,
            metadata=metadata,
            registry=metrics.registry,
            log_level=envoy_log_level(log_level),
            on_change=self._changed,
            before_start=self._check_ports,
        )
        # Only for the revision on /metrics: Envoy's configuration comes over xDS.
        self._watch = MeshWatch(socket=socket, on_snapshot=self._revision)
        self._watching: asyncio.Task[None] | None = None
        self._metrics = metrics

    @property
    def inbound_address(self) -> HostPort:
        return self._inbound

    async def start(self) -> None:
        await self.envoy.start()
        self._watching = asyncio.create_task(self._watch.run())

    def ready_problem(self) -> str | None:
        problem = self.envoy.ready_problem()
        if problem is None and INBOUND not in self.envoy.listeners:
            problem = NO_INBOUND.format(service=self._settings.service)
        return problem

    def failure(self) -> str | None:
        return self.envoy.failure()

    def describe(self) -> list[str]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(self._settings.labels.items()))
        selecting = f"selecting {labels}" if labels else "without a selector (no --label)"
        lines = [
            f"inbound: mTLS {self._inbound} -> {self._settings.app} (HTTP; callers judged by "
            f"the AuthorizationPolicies {selecting})",
        ]
        if self._settings.outbound is not None:
            lines.append(f"outbound: HTTP {self._settings.outbound} -> the mesh's Services by "
                         "Host, over mTLS")  # fmt: skip
        lines.append(f"envoy: configured by the agent over xDS (node {self.envoy.node_id}; "
                     f"admin {self.envoy.admin_socket})")  # fmt: skip
        return lines

    def stop_accepting(self) -> None:
        """Envoy stops accepting when it is drained, in :meth:`stop`."""

    async def stop(self, grace: float) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        await self.envoy.stop(grace)

    async def more_metrics(self) -> bytes:
        return await self.envoy.prometheus_stats()

    def _check_ports(self) -> None:
        _check_free(self._inbound, "--inbound")
        if self._settings.outbound is not None:
            _check_free(self._settings.outbound, "--outbound")

    def _revision(self, snapshot: MeshSnapshot) -> None:
        self._metrics.mesh_revision.set(snapshot.revision)

    def _changed(self) -> None:
        # Configured once Envoy has ACKed its first listeners and their certificates came:
        # the inbound one, or none when the agent has none to give (no such Service, which
        # registering then says).
        if self.envoy.ready_problem() is None:
            self.configured.set()


def _check_free(address: HostPort, flag: str) -> None:
    """SidecarConfigError when another process listens on ``address`` (Envoy would
    otherwise fail to listen there without saying so to the sidecar)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Envoy does
        try:
            probe.bind((address.host, address.port))
        except OSError as err:
            raise SidecarConfigError(
                f"cannot listen on {flag} {address}: {os.strerror(err.errno or 0)}; "
                f"choose another {flag}"
            ) from err


def _with_port(address: HostPort) -> HostPort:
    """``address``, a free port of its host chosen when its port is 0."""
    if address.port:
        return address
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address.host, 0))
        except OSError as err:
            raise SidecarConfigError(
                f"cannot listen on --inbound {address}: {os.strerror(err.errno or 0)}; "
                "choose another --inbound"
            ) from err
        return HostPort(address.host, int(probe.getsockname()[1]))
