"""Configurations and catalogs the compiler tests start from."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from mesh import Catalog, Config, Instance, parse_documents
from mesh.catalog import Health
from mesh.view import (
    ClaimCondition,
    Decision,
    DefaultDecision,
    HeaderRewrite,
    NamedMatch,
    OperationMatch,
    PeerMatch,
    Source,
    StringMatch,
)
from sdk.address import HostPort
from tests.unit.mesh.documents import MISSION, USERS_SERVICE

TD = "spiffe://example.org"
ORDERS = f"{TD}/orders"
BILLING = f"{TD}/billing"
LEGACY = f"{TD}/legacy/batch"
USERS = f"{TD}/users"
REVIEWS = f"{TD}/reviews"
GATEWAY = f"{TD}/gateway"
NODE = f"{TD}/spire/agent/node-1"
SINCE = datetime(2025, 1, 1, tzinfo=UTC)

INGRESS = {"istio": "ingressgateway"}

SPLIT = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  spiffeIds: [spiffe://example.org/reviews]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  healthCheck: {http: {path: /healthz}, interval: 2s}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 100}
      http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 0}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      outlierDetection: {consecutiveGatewayErrors: 2, baseEjectionTime: 1m, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"""

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users-readers}
spec:
  selector: {matchLabels: {app: users}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["spiffe://example.org/orders"]}
    to:
    - operation: {methods: [GET], paths: ["/api/v1/users", "/api/v1/users/*"]}
  - from:
    - source: {principals: ["spiffe://example.org/gateway"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-legacy}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["spiffe://example.org/legacy/*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-writes}
spec:
  action: AUDIT
  rules:
  - to:
    - operation: {notMethods: [GET, HEAD]}
"""

RATE_LIMITS = """\
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {name: orders-to-users}
spec:
  service: users-service
  from: {principals: [spiffe://example.org/orders]}
  requestsPerSecond: 50
  burst: 100
---
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {name: everyone-to-users}
spec:
  service: users-service
  requestsPerSecond: 5
"""


def configured(*texts: str) -> Config:
    config, _ = Config().apply([resource for text in texts for resource in parse_documents(text)])
    return config


def instance(
    service: str,
    address: str,
    labels: Mapping[str, str] | None = None,
    health: Health = "healthy",
    spiffe_id: str = USERS,
) -> Instance:
    return Instance(
        service=service,
        address=HostPort.parse(address),
        node=NODE,
        labels=dict(labels or {}),
        health=health,
        since=SINCE,
        spiffe_id=spiffe_id,
    )


USERS_INSTANCES = [
    instance("users-service", "10.0.0.5:8443", {"app": "users"}),
    instance("users-service", "10.0.0.6:8443", {"app": "users"}),
]
REVIEWS_INSTANCES = [
    instance("reviews", "10.0.1.1:8443", {"version": "v1"}, spiffe_id=REVIEWS),
    instance("reviews", "10.0.1.2:8443", {"version": "v1"}, spiffe_id=REVIEWS),
    instance("reviews", "10.0.1.3:8443", {"version": "v1"}, "unhealthy", spiffe_id=REVIEWS),
    instance("reviews", "10.0.2.1:8443", {"version": "v2"}, spiffe_id=REVIEWS),
    instance("reviews", "10.0.2.2:8443", {"version": "v2"}, "unknown", spiffe_id=REVIEWS),
]
ORDERS_INSTANCES = [
    instance("orders", "10.0.3.1:8443", {"app": "orders", "version": "v2"}, spiffe_id=ORDERS),
]
ORDERS_SERVICE = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: orders}
spec:
  spiffeIds: [spiffe://example.org/orders]
  ports: [{number: 8080, protocol: HTTP}]
"""

EVERYTHING = (MISSION, USERS_SERVICE, SPLIT, POLICIES, RATE_LIMITS, ORDERS_SERVICE)


def everything() -> tuple[Config, Catalog]:
    return configured(*EVERYTHING), Catalog(
        [*USERS_INSTANCES, *REVIEWS_INSTANCES, *ORDERS_INSTANCES]
    )


VALUE_TYPES = (
    StringMatch,
    NamedMatch,
    HeaderRewrite,
    PeerMatch,
    OperationMatch,
    ClaimCondition,
    Source,
    Decision,
    DefaultDecision,
)
"""Parts of a view that are values inside an element that names its source."""


def elements(value: Any, path: str = "view") -> Iterator[tuple[str, Any]]:
    """Every dataclass in ``value``, with where it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield path, value
        for item in dataclasses.fields(value):
            yield from elements(getattr(value, item.name), f"{path}.{item.name}")
    elif isinstance(value, tuple):
        for position, item in enumerate(value):
            yield from elements(item, f"{path}[{position}]")


def unsourced(value: Any) -> list[str]:
    """The elements that do not name a resource (or default, or catalog entry)."""
    missing = []
    for path, element in elements(value):
        if isinstance(element, VALUE_TYPES) or type(element).__name__ in (
            "View",
            "SidecarProxy",
            "GatewayProxy",
            "HostPort",
            "Authorization",
        ):
            continue
        source = getattr(element, "source", None)
        if not isinstance(source, Source) or not source.kind or not source.name:
            missing.append(f"{path} ({type(element).__name__})")
    return missing
