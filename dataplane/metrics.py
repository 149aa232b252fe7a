"""``tessera sidecar run``'s Prometheus metrics, on its ``/metrics``.

The built-in proxy's (:mod:`sdk.sidecar.metrics`, its listener named ``inbound``), and:

=============================================  =============================================
``tessera_sidecar_registered``                 1 while the agent holds the app registered
                                               as an instance of its Service, else 0
``tessera_sidecar_instance_health{health}``    1 for the instance's health as the agent
                                               reports it (``healthy``, ``unhealthy``,
                                               ``unknown``), 0 for the others
``tessera_sidecar_mesh_revision``              the mesh revision the proxy runs with (0: none
                                               received yet)
=============================================  =============================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

from prometheus_client import Gauge

from sdk.errors import SourceError
from sdk.sidecar.metrics import ProxyMetrics, SvidMetrics
from sdk.sources import WorkloadApiX509Source

__all__ = ["HEALTHS", "SidecarMetrics", "follow_svid_expiry"]

HEALTHS: Final = ("healthy", "unhealthy", "unknown")


class SidecarMetrics(ProxyMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.registered = Gauge(
            "tessera_sidecar_registered",
            "1 while the app is registered as an instance of its Service through the agent",
            registry=self.registry,
        )
        self.instance_health = Gauge(
            "tessera_sidecar_instance_health",
            "1 for the instance's health as the agent reports it",
            ["health"],
            registry=self.registry,
        )
        self.mesh_revision = Gauge(
            "tessera_sidecar_mesh_revision",
            "The mesh revision the proxy runs with (0: none received yet)",
            registry=self.registry,
        )
        self.set_instance(registered=False, health="unknown")

    def set_instance(self, *, registered: bool, health: str) -> None:
        self.registered.set(1 if registered else 0)
        for name in HEALTHS:
            self.instance_health.labels(name).set(1 if name == health else 0)


def follow_svid_expiry(source: WorkloadApiX509Source, metrics: SvidMetrics) -> Callable[[], None]:
    """Keep ``svid_expiry`` at the expiry of the SVID ``source`` holds, from now on each
    rotation; returns the function that stops it."""

    def update() -> None:
        with contextlib.suppress(SourceError):
            expiry = source.x509_svid().leaf.not_valid_after_utc.timestamp()
            metrics.svid_expiry.set(expiry)

    update()
    return source.subscribe(update)
