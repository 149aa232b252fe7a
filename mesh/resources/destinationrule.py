"""``DestinationRule`` (networking.istio.io): a Service's subsets and traffic policy.

Tessera's subset of Istio's fields (everything else is refused by name):

- spec: ``host``, ``trafficPolicy``, ``subsets`` (``name``, ``labels``,
  ``trafficPolicy``)
- trafficPolicy: ``loadBalancer``, ``connectionPool``, ``outlierDetection``
- loadBalancer: ``simple`` (ROUND_ROBIN, LEAST_REQUEST, RANDOM) or ``consistentHash``
  (``httpHeaderName`` or ``useSourceIp``)
- connectionPool: ``tcp`` (``maxConnections``, ``connectTimeout``), ``http``
  (``http1MaxPendingRequests``, ``http2MaxRequests``, ``maxRequestsPerConnection``,
  ``maxRetries``, ``idleTimeout``): the circuit breaker
- outlierDetection: ``consecutive5xxErrors``, ``consecutiveGatewayErrors``,
  ``interval``, ``baseEjectionTime``, ``maxEjectionPercent``

Example::

    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews}
    spec:
      host: reviews
      trafficPolicy:
        loadBalancer: {simple: LEAST_REQUEST}
        outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}

``trafficPolicy.tls`` is refused: Tessera always speaks mTLS between sidecars, with the
SPIFFE IDs the Service names.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, Strict, model_validator

from mesh.fields import (
    Count,
    DestinationHost,
    DnsLabel,
    Duration,
    HeaderName,
    Labels,
    Model,
    NonNegativeCount,
    Weight,
    nonempty,
)
from mesh.resources.base import Resource

__all__ = [
    "ConnectionPoolSettings",
    "ConsistentHashLB",
    "DestinationRule",
    "DestinationRuleSpec",
    "HTTPSettings",
    "LoadBalancerSettings",
    "OutlierDetection",
    "Subset",
    "TCPSettings",
    "TrafficPolicy",
]


class ConsistentHashLB(Model):
    """The same caller (by a header's value, or its IP) reaches the same instance."""

    http_header_name: HeaderName | None = None
    use_source_ip: Annotated[bool, Strict()] | None = None

    @model_validator(mode="after")
    def _check_one(self) -> Self:
        if self.http_header_name is not None and self.use_source_ip:
            raise ValueError("must set httpHeaderName or useSourceIp: true, not both")
        if self.http_header_name is None and not self.use_source_ip:
            raise ValueError("must set httpHeaderName or useSourceIp: true")
        return self


class LoadBalancerSettings(Model):
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] | None = None
    consistent_hash: ConsistentHashLB | None = None

    @model_validator(mode="after")
    def _check_one(self) -> Self:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("must set simple or consistentHash, not both")
        if self.simple is None and self.consistent_hash is None:
            raise ValueError("must set simple or consistentHash")
        return self


class TCPSettings(Model):
    max_connections: Count | None = None
    connect_timeout: Duration | None = None


class HTTPSettings(Model):
    http1_max_pending_requests: Count | None = None
    http2_max_requests: Count | None = None
    max_requests_per_connection: NonNegativeCount | None = None
    max_retries: NonNegativeCount | None = None
    idle_timeout: Duration | None = None


class ConnectionPoolSettings(Model):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(Model):
    """Eject an instance that keeps failing, for a while: routing around a crash."""

    # Spelt out: the generated camelCase would read consecutive5XxErrors.
    consecutive_5xx_errors: NonNegativeCount | None = Field(
        default=None, alias="consecutive5xxErrors"
    )
    consecutive_gateway_errors: NonNegativeCount | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Weight | None = None


class TrafficPolicy(Model):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None


class Subset(Model):
    """The instances of the Service whose labels include ``labels``."""

    name: DnsLabel
    labels: Annotated[Labels, nonempty]
    traffic_policy: TrafficPolicy | None = None


def _check_subsets(subsets: tuple[Subset, ...]) -> tuple[Subset, ...]:
    names: set[str] = set()
    for subset in subsets:
        if subset.name in names:
            raise ValueError(f"has two subsets named {subset.name}")
        names.add(subset.name)
    return subsets


class DestinationRuleSpec(Model):
    host: DestinationHost
    traffic_policy: TrafficPolicy | None = None
    subsets: Annotated[tuple[Subset, ...], AfterValidator(_check_subsets)] | None = None


class DestinationRule(Resource):
    """How calls to one Service (``spec.host``) are balanced and limited, and its subsets."""

    GROUP: ClassVar[str] = "networking.istio.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1", "v1alpha3")
    KIND: ClassVar[str] = "DestinationRule"

    kind: Literal["DestinationRule"]
    spec: DestinationRuleSpec
