"""``tessera gateway run``: the mesh's ingress, an Envoy configured by the agent.

::

    gateway = build_gateway("envoy", settings, source, socket=..., health_bind=...,
                            progress=print)   # or "builtin": dataplane.builtin_gateway

    gateway = Gateway(GatewaySettings(labels={"istio": "ingressgateway"}, port_offset=18000),
                      source, socket="unix:///run/tessera/agent.sock",
                      health_bind=HostPort("127.0.0.1", 15021), progress=print)
    await gateway.run(stop)       # until ``stop`` is set; GatewayFailed when Envoy gives up

The gateway serves the ``Gateway`` resources whose ``selector`` matches its labels: a
listener on each server's port plus ``port_offset`` (on every address of the host),
routed by the ``VirtualService``s bound to that Gateway, into the mesh with the
gateway's own SVID (mTLS, the upstream's SPIFFE ID checked against its ``Service``),
JWTs checked per ``RequestAuthentication``. All of it reaches Envoy from the agent over
xDS (:class:`~dataplane.agent_envoy.AgentEnvoy`); a change applied with ``tessera mesh
apply`` takes effect without a restart, and the listeners it opens or closes are said
on stderr as they change.

``/live``, ``/ready`` and ``/metrics`` (the gateway's own metrics, then Envoy's stats)
are served on ``health_bind`` (Istio's gateway uses port 15021). Ready means: the SVID
is held, Envoy has ACKed its configuration, and at least one Gateway selects the
labels. On stop (SIGTERM, SIGINT) Envoy is drained: callers are asked to close their
connections, and get ``grace`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from dataplane.agent_envoy import AgentEnvoy, envoy_log_level, host_name
from dataplane.metrics import follow_svid_expiry
from sdk.address import HostPort
from sdk.errors import SourceError, TesseraError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.metrics import SvidMetrics
from sdk.sources import WorkloadApiX509Source

__all__ = [
    "DEFAULT_HOST", "Gateway", "GatewayFailed", "GatewayRunner", "GatewaySettings",
    "ListenerAnnouncer", "build_gateway", "no_gateway_sentence",
]  # fmt: skip

DEFAULT_HOST: Final = "0.0.0.0"  # noqa: S104  (an ingress listens for the outside)
SOURCE_CHECK_SECONDS: Final = 1.0
GRACE_SECONDS: Final = 5.0


class GatewayFailed(TesseraError):
    """Envoy kept exiting as soon as it started, or the SVID could not be kept."""


@dataclass(frozen=True)
class GatewaySettings:
    labels: Mapping[str, str]
    port_offset: int = 0
    host: str = DEFAULT_HOST
    spiffe_id: str | None = None
    """The SVID to serve with (the source's default one when None)."""


class GatewayRunner(Protocol):
    """What ``tessera gateway run`` runs, whichever the data plane."""

    settings: GatewaySettings

    @property
    def health_url(self) -> str | None: ...

    def ready_problem(self) -> str | None: ...

    async def run(self, stop: asyncio.Event) -> None: ...


def build_gateway(
    plane: str,
    settings: GatewaySettings,
    source: WorkloadApiX509Source,
    *,
    socket: str,
    health_bind: HostPort | None,
    progress: Callable[[str], None],
    log_level: str = "info",
    grace: float = GRACE_SECONDS,
) -> GatewayRunner:
    """The gateway on ``plane`` (``envoy`` or ``builtin``, as ``--proxy`` says)."""
    if plane == "builtin":
        from dataplane.builtin_gateway import BuiltinGateway

        return BuiltinGateway(settings, source, socket=socket, health_bind=health_bind,
                              progress=progress, grace=grace)  # fmt: skip
    return Gateway(settings, source, socket=socket, health_bind=health_bind,
                   progress=progress, log_level=log_level, grace=grace)  # fmt: skip


def no_gateway_sentence(labels: Mapping[str, str]) -> str:
    """Why a gateway listens nowhere: no Gateway selects its labels."""
    shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return (f"no Gateway selects this gateway's labels ({shown}): apply one whose "
            "spec.selector matches them (tessera mesh get gateway)")  # fmt: skip


class ListenerAnnouncer:
    """Says on the progress output the ports a gateway listens on, each time they change,
    in the same words whichever the data plane."""

    def __init__(self, settings: GatewaySettings, progress: Callable[[str], None]) -> None:
        self._settings = settings
        self._progress = progress
        self._said: Mapping[int, str] | None = None
        self._announced = False

    def listening(self, listeners: Mapping[int, str]) -> None:
        """``listeners``: the address listened on for each Gateway port (before the offset)."""
        listeners = dict(listeners)
        if listeners == self._said:
            return
        self._said = listeners
        offset = self._settings.port_offset
        if not listeners:
            self._progress(f"  {no_gateway_sentence(self._settings.labels)}")
            return
        for port, address in sorted(listeners.items()):
            shifted = f" (port {port} + {offset})" if offset else ""
            self._progress(f"  listening on {address}{shifted}: Gateway servers of port {port}")
        if not self._announced:
            self._announced = True
            self._progress("Gateway is ready. Ctrl-C stops it.")


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        source: WorkloadApiX509Source,
        *,
        socket: str,
        health_bind: HostPort | None,
        progress: Callable[[str], None],
        log_level: str = "info",
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self.metrics = SvidMetrics()
        self._source = source
        self._progress = progress
        self._grace = grace
        spiffe_id = settings.spiffe_id or str(source.x509_svid().spiffe_id)
        labels = ",".join(f"{k}={v}" for k, v in sorted(settings.labels.items()))
        self.envoy = AgentEnvoy(
            node_id=f"gateway~{host_name()}~{labels}~{settings.port_offset}",
            node_cluster="gateway",
            socket=socket,
            metadata={
                "tessera.proxy": "gateway",
                "tessera.spiffe_id": spiffe_id,
                "tessera.labels": json.dumps(dict(settings.labels), sort_keys=True),
                "tessera.host": settings.host,
                "tessera.port_offset": str(settings.port_offset),
            },
            registry=self.metrics.registry,
            log_level=envoy_log_level(log_level),
            on_change=self._changed,
        )
        self._health = (
            HealthServer(health_bind, self.metrics, ready=self.ready_problem,
                         more_metrics=self.envoy.prometheus_stats)
            if health_bind is not None else None
        )  # fmt: skip
        self._announcer = ListenerAnnouncer(settings, progress)
        self._stopping = False

    @property
    def health_url(self) -> str | None:
        return self._health.url if self._health is not None else None

    def ready_problem(self) -> str | None:
        if self._stopping:
            return "the gateway is stopping"
        problem = self._source.problem() or self._source.no_identity() or self.envoy.ready_problem()
        if problem is None and not self.envoy.listeners:
            problem = self._no_gateway()
        return problem

    def _no_gateway(self) -> str:
        return no_gateway_sentence(self.settings.labels)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain Envoy and stop."""
        unsubscribe = follow_svid_expiry(self._source, self.metrics)
        try:
            await self.envoy.start()
            if self._health is not None:
                await self._health.start()
            self._progress(
                f"  envoy:   pid {self.envoy.pid}, configured by the agent over xDS "
                f"(node {self.envoy.node_id}; admin {self.envoy.admin_socket})"
            )
            if self._health is not None:
                self._progress(f"  health:  {self._health.url}/ready, {self._health.url}/metrics")
            await self._until(stop)
        finally:
            unsubscribe()
            self._stopping = True
            self._progress(f"Stopping: draining Envoy (open connections get up to "
                           f"{self._grace:g} s)")  # fmt: skip
            await self.envoy.stop(self._grace)
            if self._health is not None:
                await self._health.stop()

    async def _until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SOURCE_CHECK_SECONDS):
                    await stop.wait()
            failure = self.envoy.failure()
            if failure:
                raise GatewayFailed(failure)
            problem = self._source.problem()
            if problem:
                raise SourceError(problem)

    def _changed(self) -> None:
        if self.envoy.ready_problem() is not None:
            return
        self._announcer.listening({
            int(name.removeprefix("gateway_")): address
            for name, address in self.envoy.listeners.items()
        })  # fmt: skip
