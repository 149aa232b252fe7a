"""Every default the compiler applies, in one place: what a proxy does that no resource said.

Istio's defaults, as Istio documents and applies them, unless a line says otherwise.
Each compiled element that took a default names this module's :class:`~mesh.view.Source`
for it (``default retries``), so ``tessera mesh describe`` shows where it came from.

Routing (the sidecars' outbound, and the gateways):

- a Service that no VirtualService bound to ``mesh`` routes gets **one default route**
  to all its instances (a Service with several ports: one route per port, the request's
  port choosing it, the first port for a request that names none);
- when a VirtualService routes a host and none of its routes matches a request, the
  answer is **404**, as Envoy answers a request no route matches; a gateway answers 404
  too for a host none of its VirtualServices routes. The view holds these 404s as routes
  of its own, so the built-in proxy answers as Envoy does;
- **timeout: none** (Istio disables Envoy's 15 s route timeout: a request waits as long
  as the upstream takes, unless a VirtualService sets ``timeout``);
- **retries: 2 attempts**, on ``connect-failure,refused-stream,unavailable,cancelled,
  retriable-status-codes`` with status 503 retriable, no per-try timeout: Istio's default
  retry policy. ``retries.attempts: 0`` turns retries off; a ``retries`` without
  ``retryOn`` keeps these conditions; a ``retryOn`` replaces them (its status codes
  replace 503);
- a **fault** ``delay`` or ``abort`` without ``percentage`` affects **no** request
  (Istio's documented rule: give ``percentage: {value: 100}`` for every request);
- a **mirror** without ``mirrorPercentage`` copies **every** request (100%);
- a **redirect** without ``redirectCode`` answers **301**.

Clusters (per Service, port and subset):

- load balancing: **LEAST_REQUEST** (Istio's default since 1.14);
- a subset's ``trafficPolicy`` replaces the DestinationRule's section by section
  (``loadBalancer``, ``connectionPool``, ``outlierDetection``), as Istio merges them;
- connection pool: no limit on connections, pending requests or requests (Istio's
  2^32-1), ``connectTimeout`` **10s**, ``idleTimeout`` **1h**,
  ``maxRequestsPerConnection`` unlimited; retries within a **budget**: at most **20%**
  of the requests in flight to the cluster are retries (and at least **3** at once),
  unless ``maxRetries`` sets a fixed limit — so retries cannot multiply an outage's
  load, as a fixed count may;
- outlier detection: **on** for crashes: without a DestinationRule's
  ``outlierDetection``, an endpoint answering **5** gateway errors in a row (502, 503,
  504: a refused or reset connection among them, what a crashed instance gives) is
  ejected for **30s** (longer each time again), at most **50%** of a cluster's endpoints
  at once — so a crash is routed around before any health check notices, while an app's
  own 500s eject nothing. A DestinationRule's ``outlierDetection`` replaces it; each field
  it leaves out takes Istio's default: ``consecutive5xxErrors`` **5**,
  ``consecutiveGatewayErrors`` off, ``interval`` **10s**, ``baseEjectionTime`` **30s**,
  ``maxEjectionPercent`` **10**. A count of 0 turns that check off; ``outlierDetection:
  {consecutive5xxErrors: 0}`` turns ejection off.

Endpoints: the catalog's instances of the Service whose labels include the subset's,
that are ``healthy`` — or of unknown health when the Service has no health check
(:func:`mesh.catalog.is_routable` says why).

Security:

- a workload that no ALLOW AuthorizationPolicy selects **allows** every authenticated
  caller DENY policies do not refuse; one that any ALLOW policy selects **refuses**
  what no ALLOW rule matches (Istio's rule);
- a RequestAuthentication rule without ``fromHeaders`` or ``fromParams`` reads the token
  from ``Authorization: Bearer <token>``, then the ``access_token`` query parameter
  (Istio's locations); ``forwardOriginalToken`` is false;
- a RateLimit without ``burst`` holds one second's worth of requests.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from mesh.view import Source

__all__ = [
    "AUTHORIZATION_ALLOW",
    "CONNECTION_POOL",
    "CONNECT_TIMEOUT",
    "CRASH_GATEWAY_ERRORS",
    "CRASH_MAX_EJECTION_PERCENT",
    "DEFAULT_ROUTE",
    "GATEWAY_NOT_FOUND",
    "IDLE_TIMEOUT",
    "JWT_HEADER",
    "JWT_LOCATIONS",
    "JWT_PARAM",
    "LOAD_BALANCER",
    "LOAD_BALANCING",
    "MIRROR_PERCENTAGE",
    "NOT_FOUND_STATUS",
    "OUTLIER_BASE_EJECTION_TIME",
    "OUTLIER_CONSECUTIVE_5XX_ERRORS",
    "OUTLIER_DETECTION",
    "OUTLIER_INTERVAL",
    "OUTLIER_MAX_EJECTION_PERCENT",
    "RATE_LIMIT_BURST",
    "REDIRECT_CODE",
    "RETRIES",
    "RETRY_ATTEMPTS",
    "RETRY_ON",
    "RETRY_STATUS_CODES",
    "ROUTE_NOT_FOUND",
    "TIMEOUT",
]


def _default(name: str) -> Source:
    return Source("default", name)


# -- routes -------------------------------------------------------------------------------

DEFAULT_ROUTE: Final = _default("route")
"""A Service no VirtualService routes: every request to all its instances."""

ROUTE_NOT_FOUND: Final = _default("not-found")
"""After a VirtualService's routes: a request none of them matches."""

GATEWAY_NOT_FOUND: Final = _default("gateway-not-found")
"""A gateway's request for a host no VirtualService bound to it routes."""

NOT_FOUND_STATUS: Final = 404

TIMEOUT: Final = _default("timeout")
"""No timeout (the value is None)."""

RETRIES: Final = _default("retries")
RETRY_ATTEMPTS: Final = 2
RETRY_ON: Final = ("connect-failure", "refused-stream", "unavailable", "cancelled",
                   "retriable-status-codes")  # fmt: skip
RETRY_STATUS_CODES: Final = (503,)

MIRROR_PERCENTAGE: Final = 100.0
REDIRECT_CODE: Final = 301

# -- clusters -----------------------------------------------------------------------------

LOAD_BALANCER: Final = _default("load-balancer")
LOAD_BALANCING: Final = "LEAST_REQUEST"

CONNECTION_POOL: Final = _default("connection-pool")
CONNECT_TIMEOUT: Final = timedelta(seconds=10)
RETRY_BUDGET_PERCENT: Final = 20.0
"""Retries in flight, as a share of the requests in flight to a cluster (no maxRetries)."""
RETRY_BUDGET_MIN_RETRIES: Final = 3
"""Retries a cluster may have in flight whatever its traffic (no maxRetries)."""
IDLE_TIMEOUT: Final = timedelta(hours=1)

OUTLIER_DETECTION: Final = _default("outlier-detection")
OUTLIER_CONSECUTIVE_5XX_ERRORS: Final = 5
OUTLIER_INTERVAL: Final = timedelta(seconds=10)
OUTLIER_BASE_EJECTION_TIME: Final = timedelta(seconds=30)
OUTLIER_MAX_EJECTION_PERCENT: Final = 10
CRASH_GATEWAY_ERRORS: Final = 5
"""Without a DestinationRule's outlierDetection: gateway errors in a row that eject."""
CRASH_MAX_EJECTION_PERCENT: Final = 50

# -- security -----------------------------------------------------------------------------

AUTHORIZATION_ALLOW: Final = _default("authorization")
"""No ALLOW policy selects the workload: what DENY policies do not refuse is allowed."""

JWT_LOCATIONS: Final = _default("jwt-locations")
JWT_HEADER: Final = ("authorization", "Bearer ")
JWT_PARAM: Final = "access_token"

RATE_LIMIT_BURST: Final = _default("rate-limit-burst")
