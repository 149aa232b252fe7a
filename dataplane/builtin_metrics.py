"""The built-in proxy's balancing and rate limiting on ``/metrics``, read when scraped.

What Envoy's cluster stats say (``envoy_cluster_outlier_detection_ejections_*``,
``envoy_cluster_upstream_rq_pending_overflow``, ``envoy_http_local_rate_limit_*``),
under Tessera's names, per cluster (``outbound|80||users-service``) or RateLimit::

    tessera_sidecar_upstream_requests_in_flight{cluster}
    tessera_sidecar_upstream_endpoints{cluster}
    tessera_sidecar_outlier_ejections_active{cluster}
    tessera_sidecar_outlier_ejections_total{cluster, reason="consecutive_5xx|consecutive_gateway"}
    tessera_sidecar_outlier_ejections_overflow_total{cluster}   (refused: max ejection percent)
    tessera_sidecar_circuit_breaker_overflows_total{cluster}    (answered 503)
    tessera_sidecar_retry_overflows_total{cluster}              (a retry the budget refused)
    tessera_sidecar_rate_limited_total{rate_limit}              (answered 429)

The numbers are kept by :class:`~dataplane.balancing.Balancers` and
:class:`~dataplane.ratelimit.RateLimiter`; this collector only reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dataplane.balancing import ClusterStats

__all__ = ["BalancingCollector"]

_PREFIX = "tessera_sidecar_"


class BalancingCollector(Collector):
    def __init__(
        self,
        clusters: Callable[[], Mapping[str, ClusterStats]],
        rate_limited: Callable[[], Mapping[str, int]],
    ) -> None:
        self._clusters = clusters
        self._rate_limited = rate_limited

    def collect(self) -> Iterator[Metric]:
        stats = self._clusters()
        gauges = {
            "upstream_requests_in_flight": ("Requests in flight to the cluster's endpoints.",
                                            "requests_in_flight"),
            "upstream_endpoints": ("Endpoints of the cluster in the view in effect.",
                                   "endpoints"),
            "outlier_ejections_active": ("Endpoints ejected by outlier detection now.",
                                         "ejected"),
        }  # fmt: skip
        for name, (documentation, field) in gauges.items():
            gauge = GaugeMetricFamily(_PREFIX + name, documentation, labels=["cluster"])
            for cluster, cluster_stats in stats.items():
                gauge.add_metric([cluster], getattr(cluster_stats, field))
            yield gauge
        ejections = CounterMetricFamily(
            _PREFIX + "outlier_ejections", "Endpoints ejected by outlier detection, by the "
            "consecutive errors that ejected them.", labels=["cluster", "reason"],
        )  # fmt: skip
        for cluster, cluster_stats in stats.items():
            ejections.add_metric([cluster, "consecutive_5xx"], cluster_stats.ejections_5xx_total)
            ejections.add_metric([cluster, "consecutive_gateway"],
                                 cluster_stats.ejections_gateway_total)  # fmt: skip
        yield ejections
        counters = {
            "outlier_ejections_overflow": ("Ejections not made: the cluster's maximum "
                                           "ejection percent was ejected already.",
                                           "ejections_overflow_total"),
            "circuit_breaker_overflows": ("Requests answered 503 by the circuit breaker "
                                          "(the connection pool's limits).",
                                          "overflows_total"),
            "retry_overflows": ("Retries the retry budget (or maxRetries) refused.",
                                "retry_overflows_total"),
        }  # fmt: skip
        for name, (documentation, field) in counters.items():
            counter = CounterMetricFamily(_PREFIX + name, documentation, labels=["cluster"])
            for cluster, cluster_stats in stats.items():
                counter.add_metric([cluster], getattr(cluster_stats, field))
            yield counter
        limited = CounterMetricFamily(
            _PREFIX + "rate_limited", "Requests answered 429 by a RateLimit.",
            labels=["rate_limit"],
        )  # fmt: skip
        for rule, count in self._rate_limited().items():
            limited.add_metric([rule], count)
        yield limited
