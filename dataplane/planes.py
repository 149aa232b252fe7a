"""The data planes ``tessera sidecar run --proxy NAME`` chooses between.

A data plane carries the traffic of one sidecar: callers through the inbound mTLS
listener to the app, each request judged by the mesh, and the app's calls out through
``--outbound``, routed by the mesh. The sidecar around it gets the SVID, registers the app, serves
``/ready`` and stops it; everything that differs between planes is behind
:class:`DataPlane`::

    kind = PLANES["builtin"]
    kind.refusal(settings)                 # what of the settings this plane cannot do, or None
    plane = kind.build(settings, source, metrics, socket="unix:///run/tessera/agent.sock")
    await plane.start()                    # bind: SidecarConfigError if the port is taken
    plane.inbound_address                  # where it listens (the port filled in)
    await plane.configured.wait()          # the mesh configuration is in effect
    plane.ready_problem()                  # why it would not serve now, or None
    plane.failure()                        # why it cannot go on (the sidecar exits), or None
    await plane.more_metrics()             # its own Prometheus text for /metrics
    plane.stop_accepting(); await plane.stop(grace=5.0)

``builtin`` is the Python proxy of :mod:`dataplane.builtin`. ``envoy`` is an Envoy the sidecar
supervises, configured by the agent over xDS (:mod:`dataplane.envoy_sidecar`); without
the ``envoy`` extra installed, :meth:`DataPlaneKind.unavailable` says how to get it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from dataplane.metrics import SidecarMetrics
from sdk.address import HostPort
from sdk.sources import WorkloadApiX509Source
from sdk.spiffeid import SpiffeId

__all__ = ["PLANES", "DataPlane", "DataPlaneKind", "SidecarSettings"]


@dataclass(frozen=True)
class SidecarSettings:
    """What ``tessera sidecar run`` was asked to do, checked."""

    service: str
    spiffe_id: SpiffeId
    app: HostPort
    """Where the app listens, in plain HTTP (and where the agent checks its health)."""
    inbound: HostPort
    outbound: HostPort | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class DataPlane(Protocol):
    """One sidecar's traffic, as a plane carries it."""

    name: str
    configured: asyncio.Event
    """Set once the mesh configuration is in effect (nothing is let through before)."""

    @property
    def inbound_address(self) -> HostPort:
        """Where the inbound listener listens (after :meth:`start`: its port as bound)."""
        ...

    async def start(self) -> None:
        """Listen, and start following the mesh; SidecarConfigError if it cannot listen."""
        ...

    def ready_problem(self) -> str | None:
        """Why it would not carry a request now, or None."""
        ...

    def failure(self) -> str | None:
        """Why it gave up carrying traffic for good (the sidecar then exits), or None."""
        ...

    async def more_metrics(self) -> bytes:
        """More Prometheus text for the sidecar's ``/metrics`` (b"" for none)."""
        ...

    def describe(self) -> list[str]:
        """What it does, a line each, for the sidecar's progress lines."""
        ...

    def stop_accepting(self) -> None: ...

    async def stop(self, grace: float) -> None:
        """Stop accepting, and give open connections ``grace`` seconds to finish."""
        ...


class DataPlaneKind(Protocol):
    def refusal(self, settings: SidecarSettings) -> str | None:
        """What of ``settings`` this plane does not do (one sentence), or None."""
        ...

    def unavailable(self) -> str | None:
        """Why this plane cannot run on this machine (what to install), or None."""
        ...

    def build(
        self,
        settings: SidecarSettings,
        source: WorkloadApiX509Source,
        metrics: SidecarMetrics,
        *,
        socket: str,
        log_level: str = "info",
    ) -> DataPlane:
        """The plane for ``settings``, presenting ``source``'s SVID, following the mesh
        through the agent on ``socket``. Imports what it needs (the mesh) only now."""
        ...


class _Builtin:
    def refusal(self, settings: SidecarSettings) -> str | None:
        return None

    def unavailable(self) -> str | None:
        return None

    def build(
        self,
        settings: SidecarSettings,
        source: WorkloadApiX509Source,
        metrics: SidecarMetrics,
        *,
        socket: str,
        log_level: str = "info",
    ) -> DataPlane:
        from dataplane.builtin import BuiltinProxy

        return BuiltinProxy(settings, source, metrics, socket=socket)


class _Envoy:
    def refusal(self, settings: SidecarSettings) -> str | None:
        for flag, address in (("--inbound", settings.inbound), ("--outbound", settings.outbound)):
            if address is not None and not address.is_ip:
                return (f"{flag} {address} must be an IP address with --proxy envoy "
                        "(Envoy listens on addresses, not names), "
                        f"e.g. 127.0.0.1:{address.port}")  # fmt: skip
        return None

    def unavailable(self) -> str | None:
        from dataplane.envoy import EnvoyMissing, find_envoy

        try:
            find_envoy()
        except EnvoyMissing as err:
            return f"--proxy envoy needs Envoy: {err.message}"
        return None

    def build(
        self,
        settings: SidecarSettings,
        source: WorkloadApiX509Source,
        metrics: SidecarMetrics,
        *,
        socket: str,
        log_level: str = "info",
    ) -> DataPlane:
        from dataplane.envoy_sidecar import EnvoySidecar

        return EnvoySidecar(settings, source, metrics, socket=socket, log_level=log_level)


PLANES: Final[Mapping[str, DataPlaneKind]] = {"builtin": _Builtin(), "envoy": _Envoy()}
"""By ``--proxy`` name; the first is the default."""
