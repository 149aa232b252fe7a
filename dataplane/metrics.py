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

from typing import Final

from prometheus_client import Gauge

from sdk.sidecar.metrics import ProxyMetrics

__all__ = ["HEALTHS", "SidecarMetrics"]

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
