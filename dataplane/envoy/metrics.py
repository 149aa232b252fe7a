"""The supervisor's own Prometheus metrics, beside the Envoy stats it passes on.

=================================  ===========================================================
``tessera_envoy_up``               1 while Envoy runs and its admin interface answers, else 0
``tessera_envoy_restarts_total``   times the supervisor started Envoy again after it exited
                                   on its own (or was killed)
=================================  ===========================================================

Put them in the registry of the process's ``/metrics`` (one supervisor per registry)::

    metrics = EnvoyMetrics(registry)
    body = generate_latest(registry) + await supervisor.prometheus_stats()
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["EnvoyMetrics"]


class EnvoyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.up = Gauge(
            "tessera_envoy_up",
            "1 while Envoy runs and its admin interface answers, else 0",
            registry=self.registry,
        )
        self.restarts = Counter(
            "tessera_envoy_restarts",
            "Times Envoy was started again after it exited on its own or was killed",
            registry=self.registry,
        )
