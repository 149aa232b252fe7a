"""The view of one proxy: what the compiler makes, and what the renderers and proxies read.

A :class:`View` is immutable, sorted, and every element in it names the resource it came
from — a :class:`Source`, read ``VirtualService reviews spec.http[0]``, ``default
retries`` for one of Tessera's defaults (:mod:`mesh.defaults`) or ``catalog
users-service 10.0.0.5:8443`` for an instance::

    view = compile_view(config, catalog, SidecarProxy("orders", "spiffe://example.org/orders"))
    view.version                              # a digest of the whole view
    for service in view.outbound:             # per destination Service
        route = service.route_for(HttpRequest.of("GET", "/api/v1/users"))
        print(route.source)                   # VirtualService users spec.http[0]
    view.to_json()                            # what `tessera mesh describe --output json` shows

The parts, as a proxy uses them:

- :attr:`View.inbound` (a sidecar): its Service's ports, and the RateLimits its sidecars
  keep for callers;
- :attr:`View.authorization`, :attr:`View.jwt_rules`: who may call the proxy's workload,
  and which JWTs it validates (a sidecar's or a gateway's own);
- :attr:`View.outbound` (a sidecar): per Service it may call, the routes in order (the
  first that matches is taken, as in Istio);
- :attr:`View.gateway_listeners` (a gateway): per port, its servers, their hosts and
  routes;
- :attr:`View.clusters`: per Service, port and subset, how to balance and limit calls and
  which SPIFFE IDs the upstream must present; :attr:`View.endpoints`: the instances of
  each.

Matching is here too (:meth:`Route.match`, :meth:`Authorization.decide`,
:meth:`RateLimitRule.applies_to`), so that ``explain``, the built-in proxy and the tests
read a view the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

import re2

from mesh.principals import PrincipalPattern, parse_principal
from mesh.proxy import GatewayProxy, SidecarProxy
from mesh.request import HttpRequest, split_host
from sdk.address import HostPort

__all__ = [
    "Abort",
    "Authorization",
    "AuthorizationRule",
    "ClaimCondition",
    "Cluster",
    "ClusterEndpoints",
    "ConnectionPool",
    "Decision",
    "DefaultDecision",
    "Delay",
    "DirectResponse",
    "Endpoint",
    "ExcludedInstance",
    "Fault",
    "Forward",
    "GatewayListener",
    "GatewayServer",
    "GatewayVirtualHost",
    "HeaderOperations",
    "HeaderRewrite",
    "HttpsRedirect",
    "Inbound",
    "JwtLocations",
    "JwtRule",
    "LoadBalancer",
    "Mirror",
    "NamedMatch",
    "OperationMatch",
    "OutboundService",
    "OutlierDetection",
    "PeerIdentities",
    "PeerMatch",
    "Port",
    "Problem",
    "RateLimitRule",
    "Redirect",
    "RequestMatch",
    "RetryPolicy",
    "Rewrite",
    "Route",
    "ServerTls",
    "Source",
    "StringMatch",
    "Timeout",
    "View",
    "WeightedDestination",
    "cluster_name",
    "host_matches",
    "host_specificity",
    "to_json",
]


# -- where things come from -------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Source:
    """The resource (kind, name) and field path an element of a view came from.

    ``kind`` is a resource kind, ``default`` (one of :mod:`mesh.defaults`, named by
    ``name``) or ``catalog`` (an instance of Service ``name`` at address ``path``).
    """

    kind: str
    name: str
    path: str = ""

    def at(self, path: str) -> Source:
        """The same resource, another field."""
        return Source(self.kind, self.name, path)

    def __str__(self) -> str:
        return " ".join(part for part in (self.kind, self.name, self.path) if part)


@dataclass(frozen=True)
class Problem:
    """Something the compiler left out of a view, and why (shown by ``describe``)."""

    message: str
    source: Source


# -- matching requests ------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


@dataclass(frozen=True)
class StringMatch:
    """Istio's ``StringMatch``: ``exact``, ``prefix``, ``regex`` (RE2, the whole value)
    or ``present`` (the value exists)."""

    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "regex":
            return _regex(self.value).fullmatch(text) is not None
        return True

    def __str__(self) -> str:
        return self.kind if self.kind == "present" else f"{self.kind} {self.value}"


@dataclass(frozen=True)
class NamedMatch:
    """A header's or query parameter's name and how its value must match."""

    name: str
    match: StringMatch

    def __str__(self) -> str:
        return f"{self.name} {self.match}"


@dataclass(frozen=True)
class RequestMatch:
    """One ``match`` entry: every condition given must hold.

    ``sourceLabels`` are gone: the compiler kept the entry only if the proxy's own labels
    match them. ``port`` is Tessera's own condition, for a Service's default routes.
    """

    uri: StringMatch | None
    method: StringMatch | None
    headers: tuple[NamedMatch, ...]
    query_params: tuple[NamedMatch, ...]
    port: int | None
    source: Source

    def matches(self, request: HttpRequest) -> bool:
        if self.port is not None and request.port != self.port:
            return False
        if self.uri is not None and not self.uri.matches(request.uri_path):
            return False
        if self.method is not None and not self.method.matches(request.method):
            return False
        if not all(item.match.matches(request.header(item.name)) for item in self.headers):
            return False
        params = request.query_params
        return all(item.match.matches(params.get(item.name)) for item in self.query_params)

    def __str__(self) -> str:
        parts = []
        if self.uri is not None:
            parts.append(f"uri {self.uri}")
        if self.method is not None:
            parts.append(f"method {self.method}")
        parts.extend(f"header {item}" for item in self.headers)
        parts.extend(f"query {item}" for item in self.query_params)
        if self.port is not None:
            parts.append(f"port {self.port}")
        return " and ".join(parts) or "any request"


# -- what a route does ------------------------------------------------------------------


def cluster_name(service: str, port: int, subset: str | None) -> str:
    """Istio's cluster name: ``outbound|80|v1|users-service`` (``||`` without subset)."""
    return f"outbound|{port}|{subset or ''}|{service}"


@dataclass(frozen=True)
class HeaderRewrite:
    """Headers to set, add and remove on one direction (request or response)."""

    set: Mapping[str, str] = field(default_factory=dict, hash=False)
    add: Mapping[str, str] = field(default_factory=dict, hash=False)
    remove: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "set", _frozen(self.set))
        object.__setattr__(self, "add", _frozen(self.add))


@dataclass(frozen=True)
class HeaderOperations:
    request: HeaderRewrite
    response: HeaderRewrite
    source: Source


@dataclass(frozen=True)
class WeightedDestination:
    """A share of a route's requests for one Service, port and subset."""

    service: str
    port: int
    subset: str | None
    weight: int
    headers: HeaderOperations | None
    source: Source

    @property
    def cluster(self) -> str:
        return cluster_name(self.service, self.port, self.subset)

    def __str__(self) -> str:
        subset = f" subset {self.subset}" if self.subset else ""
        return f"{self.service} port {self.port}{subset}"


@dataclass(frozen=True)
class Forward:
    """Send the request upstream, split by weight (the weights add up to 100)."""

    destinations: tuple[WeightedDestination, ...]
    source: Source


@dataclass(frozen=True)
class Redirect:
    """Answer with a redirect; a field left None keeps the request's own."""

    uri: str | None
    authority: str | None
    port: int | None
    scheme: str | None
    code: int
    source: Source


@dataclass(frozen=True)
class DirectResponse:
    """Answer the request with ``status`` without sending it anywhere (the 404s)."""

    status: int
    reason: str
    source: Source


@dataclass(frozen=True)
class Rewrite:
    uri: str | None
    authority: str | None
    source: Source


@dataclass(frozen=True)
class Timeout:
    """The whole request's timeout; None: no timeout."""

    duration: timedelta | None
    source: Source


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy's retry policy; ``attempts`` 0 is no retry. ``defaulted`` names the fields
    that took :mod:`mesh.defaults`' values."""

    attempts: int
    per_try_timeout: timedelta | None
    retry_on: tuple[str, ...]
    retriable_status_codes: tuple[int, ...]
    defaulted: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class Delay:
    fixed_delay: timedelta
    percentage: float
    source: Source


@dataclass(frozen=True)
class Abort:
    http_status: int
    percentage: float
    source: Source


@dataclass(frozen=True)
class Fault:
    delay: Delay | None
    abort: Abort | None
    source: Source


@dataclass(frozen=True)
class Mirror:
    service: str
    port: int
    subset: str | None
    percentage: float
    source: Source

    @property
    def cluster(self) -> str:
        return cluster_name(self.service, self.port, self.subset)


@dataclass(frozen=True)
class Route:
    """One rule: the requests it takes (any entry of ``matches``; none: every request)
    and what is done with them. Routes are tried in order; the first that matches wins."""

    name: str | None
    matches: tuple[RequestMatch, ...]
    action: Forward | Redirect | DirectResponse
    rewrite: Rewrite | None
    timeout: Timeout | None
    retries: RetryPolicy | None
    fault: Fault | None
    mirror: Mirror | None
    headers: HeaderOperations | None
    source: Source

    def match(self, request: HttpRequest) -> RequestMatch | Literal[True] | None:
        """The entry of ``matches`` the request satisfies, True for a route without
        matches, None when the route does not take the request."""
        if not self.matches:
            return True
        return next((entry for entry in self.matches if entry.matches(request)), None)

    def rewrite_request(
        self, request: HttpRequest, entry: RequestMatch | Literal[True] | None
    ) -> HttpRequest:
        """The request as the upstream receives it: ``rewrite.uri`` replaces the prefix a
        ``uri.prefix`` entry matched, else the whole path (the query is kept);
        ``rewrite.authority`` replaces the ``Host``."""
        if self.rewrite is None:
            return request
        path = request.path
        headers = dict(request.headers)
        if self.rewrite.uri is not None:
            _, question, query = request.path.partition("?")
            uri_path = request.uri_path
            matched = entry.uri if isinstance(entry, RequestMatch) else None
            if matched is not None and matched.kind == "prefix":
                uri_path = self.rewrite.uri + uri_path[len(matched.value) :]
            else:
                uri_path = self.rewrite.uri
            path = uri_path + question + query
        if self.rewrite.authority is not None:
            headers["host"] = self.rewrite.authority
        return HttpRequest(request.method, path, headers, request.port)


def first_route(routes: tuple[Route, ...], request: HttpRequest) -> Route | None:
    return next((route for route in routes if route.match(request) is not None), None)


# -- outbound (a sidecar's calls) ---------------------------------------------------------


@dataclass(frozen=True)
class Port:
    number: int
    protocol: str
    name: str | None
    source: Source


@dataclass(frozen=True)
class OutboundService:
    """The routes of the calls to one Service (a request's ``Host`` names the Service:
    ``users-service``, ``users-service.<namespace>.svc[.cluster.local]``, with a port or
    not). ``source`` is the VirtualService whose routes these are, or the Service itself
    for its default route."""

    service: str
    ports: tuple[Port, ...]
    routes: tuple[Route, ...]
    source: Source

    def route_for(self, request: HttpRequest) -> Route | None:
        return first_route(self.routes, request)


# -- gateways -----------------------------------------------------------------------------


def host_matches(pattern: str, host: str) -> bool:
    """Whether a request's host (lower case, no port) fits ``*``, ``*.suffix`` or a name."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def host_specificity(pattern: str) -> tuple[int, int]:
    """How Envoy orders domains: an exact name first, then the longest ``*.suffix``,
    then ``*``. Larger is more specific."""
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("*."):
        return (1, len(pattern))
    return (2, len(pattern))


@dataclass(frozen=True)
class ServerTls:
    """TLS SIMPLE: the gateway presents this certificate (files on its host)."""

    mode: str
    server_certificate: str
    private_key: str
    source: Source


@dataclass(frozen=True)
class HttpsRedirect:
    """Every request is answered with a 301 to the same URL in https."""

    source: Source


@dataclass(frozen=True)
class GatewayVirtualHost:
    """The routes of one VirtualService, for the hosts (``domains``) it shares with the
    server; the last route is the 404 for a request none of the others matches."""

    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    source: Source

    def route_for(self, request: HttpRequest) -> Route | None:
        return first_route(self.routes, request)


@dataclass(frozen=True)
class GatewayServer:
    """One ``servers[]`` entry: its hosts, TLS, and the virtual hosts bound to it, most
    specific domain first; ``not_found`` answers a host none of them has."""

    hosts: tuple[str, ...]
    tls: ServerTls | None
    https_redirect: HttpsRedirect | None
    virtual_hosts: tuple[GatewayVirtualHost, ...]
    not_found: DirectResponse
    source: Source

    def virtual_host_for(self, host: str) -> GatewayVirtualHost | None:
        """The virtual host whose most specific domain fits ``host``."""
        best: tuple[tuple[int, int], GatewayVirtualHost] | None = None
        for virtual_host in self.virtual_hosts:
            for domain in virtual_host.domains:
                if host_matches(domain, host) and (
                    best is None or host_specificity(domain) > best[0]
                ):
                    best = (host_specificity(domain), virtual_host)
        return best[1] if best is not None else None


@dataclass(frozen=True)
class GatewayListener:
    """A port the gateway listens on (before ``--port-offset``) and the servers on it;
    ``not_found`` answers a request whose host no server has."""

    port: int
    protocol: Literal["HTTP", "HTTPS"]
    servers: tuple[GatewayServer, ...]
    not_found: DirectResponse
    source: Source

    def server_for(self, authority: str) -> GatewayServer | None:
        """The server whose most specific host fits the request's ``Host`` (or SNI)."""
        host, _ = split_host(authority)
        best: tuple[tuple[int, int], GatewayServer] | None = None
        for server in self.servers:
            for pattern in server.hosts:
                if host_matches(pattern, host) and (
                    best is None or host_specificity(pattern) > best[0]
                ):
                    best = (host_specificity(pattern), server)
        return best[1] if best is not None else None


# -- who may call: authorization, JWTs, rate limits -----------------------------------------


def _path_pattern_matches(pattern: str, path: str) -> bool:
    if pattern == "*":
        return bool(path)
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


@functools.lru_cache(maxsize=1024)
def _principal(text: str) -> PrincipalPattern:
    return parse_principal(text)


def _principal_in(patterns: tuple[str, ...], caller: str | None) -> bool:
    return caller is not None and any(_principal(text).matches(caller) for text in patterns)


@dataclass(frozen=True)
class PeerMatch:
    """``from[].source``: the caller's SPIFFE ID is one of ``principals`` (when given)
    and none of ``not_principals``."""

    principals: tuple[str, ...] | None
    not_principals: tuple[str, ...] | None

    def matches(self, caller: str | None) -> bool:
        if self.principals is not None and not _principal_in(self.principals, caller):
            return False
        return self.not_principals is None or not _principal_in(self.not_principals, caller)


@dataclass(frozen=True)
class OperationMatch:
    """``to[].operation``: methods and paths (exact, ``/prefix/*``, ``*.suffix``, ``*``)."""

    methods: tuple[str, ...] | None
    not_methods: tuple[str, ...] | None
    paths: tuple[str, ...] | None
    not_paths: tuple[str, ...] | None

    def matches(self, request: HttpRequest) -> bool:
        method, path = request.method, request.uri_path
        if self.methods is not None and method not in self.methods:
            return False
        if self.not_methods is not None and method in self.not_methods:
            return False
        if self.paths is not None and not any(
            _path_pattern_matches(pattern, path) for pattern in self.paths
        ):
            return False
        return self.not_paths is None or not any(
            _path_pattern_matches(pattern, path) for pattern in self.not_paths
        )


def _claim_values(claims: Mapping[str, Any] | None, path: tuple[str, ...]) -> list[str] | None:
    node: Any = claims
    for step in path:
        if not isinstance(node, Mapping) or step not in node:
            return None
        node = node[step]
    if isinstance(node, (list, tuple)):
        return [_claim_text(item) for item in node]
    return [_claim_text(node)]


def _claim_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class ClaimCondition:
    """``when``: a claim of the validated JWT (``claim`` is its path, ``groups`` or
    ``("a", "b")`` for ``[a][b]``); a list claim matches when one of its items does."""

    claim: tuple[str, ...]
    values: tuple[str, ...] | None
    not_values: tuple[str, ...] | None

    def matches(self, claims: Mapping[str, Any] | None) -> bool:
        found = _claim_values(claims, self.claim)
        if self.values is not None and (
            found is None
            or not any(
                _path_pattern_matches(pattern, item) for pattern in self.values for item in found
            )
        ):
            return False
        return (
            self.not_values is None
            or found is None
            or not any(
                _path_pattern_matches(pattern, item)
                for pattern in self.not_values
                for item in found
            )
        )

    @property
    def key(self) -> str:
        return "request.auth.claims" + "".join(f"[{step}]" for step in self.claim)


@dataclass(frozen=True)
class AuthorizationRule:
    """One rule of an AuthorizationPolicy: it matches a request when one of ``peers``
    (none given: any caller), one of ``operations`` (none: any request) and every one of
    ``conditions`` match."""

    action: Literal["ALLOW", "DENY", "AUDIT"]
    policy: str
    peers: tuple[PeerMatch, ...]
    operations: tuple[OperationMatch, ...]
    conditions: tuple[ClaimCondition, ...]
    source: Source

    def matches(
        self, caller: str | None, request: HttpRequest, claims: Mapping[str, Any] | None
    ) -> bool:
        if self.peers and not any(peer.matches(caller) for peer in self.peers):
            return False
        if self.operations and not any(op.matches(request) for op in self.operations):
            return False
        return all(condition.matches(claims) for condition in self.conditions)


@dataclass(frozen=True)
class DefaultDecision:
    """What happens to a request no rule decided: ``ALLOW`` when no ALLOW policy selects
    the workload, else ``DENY`` (``source`` names the first ALLOW policy)."""

    action: Literal["ALLOW", "DENY"]
    source: Source


@dataclass(frozen=True)
class Decision:
    """The outcome for one request: allowed or not, the rule (or default) that decided,
    and the AUDIT rules that matched (they log, they do not decide)."""

    allowed: bool
    rule: Source
    reason: str
    audited: tuple[Source, ...] = ()


@dataclass(frozen=True)
class Authorization:
    """The AuthorizationPolicies that select a workload, as Istio judges them: DENY rules
    first; then, if any ALLOW policy selects the workload (``allow_policies``), a request
    no ALLOW rule matches is refused; else it is allowed."""

    rules: tuple[AuthorizationRule, ...]
    allow_policies: tuple[Source, ...]
    default: DefaultDecision

    def decide(
        self,
        caller: str | None,
        request: HttpRequest,
        claims: Mapping[str, Any] | None = None,
    ) -> Decision:
        audited = tuple(
            rule.source
            for rule in self.rules
            if rule.action == "AUDIT" and rule.matches(caller, request, claims)
        )
        who = caller or "a caller without a SPIFFE ID"
        for rule in self.rules:
            if rule.action == "DENY" and rule.matches(caller, request, claims):
                return Decision(False, rule.source, f"{who} is refused by a DENY rule", audited)
        for rule in self.rules:
            if rule.action == "ALLOW" and rule.matches(caller, request, claims):
                return Decision(True, rule.source, f"{who} is allowed by an ALLOW rule", audited)
        if self.default.action == "DENY":
            reason = (
                f"no ALLOW rule matches {who}, and {self.default.source} (ALLOW) selects "
                "this workload: refused by default"
            )
            return Decision(False, self.default.source, reason, audited)
        reason = f"no ALLOW policy selects this workload and no DENY rule matches {who}"
        return Decision(True, self.default.source, reason, audited)


@dataclass(frozen=True)
class JwtLocations:
    """Where a token is read: headers (name, prefix) then query parameters."""

    headers: tuple[tuple[str, str], ...]
    params: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class JwtRule:
    """A RequestAuthentication ``jwtRules[]`` entry. ``trust_domain`` is set for a trust
    domain's JWT-SVIDs (checked against its JWT bundle), else the keys are ``jwks_uri``'s
    or ``jwks``."""

    issuer: str
    trust_domain: str | None
    audiences: tuple[str, ...]
    jwks_uri: str | None
    jwks: str | None
    locations: JwtLocations
    forward_original_token: bool
    source: Source


@dataclass(frozen=True)
class RateLimitRule:
    """A token bucket for requests to this Service: shared by ``callers`` (SPIFFE ID
    patterns) when given, else one bucket per caller, keyed on its SPIFFE ID."""

    name: str
    callers: tuple[str, ...] | None
    requests_per_second: int
    burst: int
    source: Source

    def applies_to(self, caller: str | None) -> bool:
        if self.callers is None:
            return True
        return _principal_in(self.callers, caller)

    def bucket(self, caller: str | None) -> str:
        """The bucket a request of ``caller`` takes a token from."""
        if self.callers is None:
            return f"{self.name}|{caller or ''}"
        return self.name

    @property
    def keyed_on(self) -> Literal["shared", "caller"]:
        return "shared" if self.callers is not None else "caller"


@dataclass(frozen=True)
class Inbound:
    """A sidecar's side facing its callers: the Service's ports and its RateLimits."""

    service: str
    ports: tuple[Port, ...]
    rate_limits: tuple[RateLimitRule, ...]
    source: Source

    def rate_limits_for(self, caller: str | None) -> tuple[RateLimitRule, ...]:
        """Every RateLimit a request of ``caller`` counts against (a token from each)."""
        return tuple(rule for rule in self.rate_limits if rule.applies_to(caller))


# -- clusters and endpoints ---------------------------------------------------------------


@dataclass(frozen=True)
class LoadBalancer:
    """``policy`` ROUND_ROBIN, LEAST_REQUEST, RANDOM or CONSISTENT_HASH (on
    ``hash_header``, or the source IP when ``hash_source_ip``)."""

    policy: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "CONSISTENT_HASH"]
    hash_header: str | None
    hash_source_ip: bool
    source: Source


@dataclass(frozen=True)
class ConnectionPool:
    """The circuit breaker; None: no limit."""

    max_connections: int | None
    connect_timeout: timedelta
    http1_max_pending_requests: int | None
    http2_max_requests: int | None
    max_requests_per_connection: int | None
    max_retries: int | None
    idle_timeout: timedelta
    defaulted: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class OutlierDetection:
    """Eject an endpoint after consecutive errors; a count of None is that check off."""

    consecutive_5xx_errors: int | None
    consecutive_gateway_errors: int | None
    interval: timedelta
    base_ejection_time: timedelta
    max_ejection_percent: int
    defaulted: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class PeerIdentities:
    """The SPIFFE IDs an upstream's certificate must carry one of (the Service's)."""

    spiffe_ids: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class Cluster:
    """Calls to one Service port and subset (None: all instances)."""

    name: str
    service: str
    port: int
    protocol: str
    subset: str | None
    load_balancer: LoadBalancer
    connection_pool: ConnectionPool
    outlier_detection: OutlierDetection | None
    peer_identities: PeerIdentities
    source: Source


@dataclass(frozen=True)
class Endpoint:
    """An instance requests may be sent to (its address: its sidecar's inbound listener)."""

    address: HostPort
    node: str
    spiffe_id: str
    labels: Mapping[str, str] = field(hash=False)
    health: str
    source: Source

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


@dataclass(frozen=True)
class ExcludedInstance:
    """An instance of the subset that gets no requests, and why."""

    address: HostPort
    health: str
    since: datetime
    reason: str
    source: Source


@dataclass(frozen=True)
class ClusterEndpoints:
    """The endpoints of one cluster; ``source`` is what chose them (a subset's labels,
    or the Service for all its instances)."""

    cluster: str
    labels: Mapping[str, str] = field(hash=False)
    endpoints: tuple[Endpoint, ...]
    excluded: tuple[ExcludedInstance, ...]
    source: Source

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


# -- the view -----------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """Everything one proxy does, compiled from configuration, catalog and its identity."""

    proxy: SidecarProxy | GatewayProxy
    inbound: Inbound | None
    authorization: Authorization
    jwt_rules: tuple[JwtRule, ...]
    outbound: tuple[OutboundService, ...]
    gateway_listeners: tuple[GatewayListener, ...]
    clusters: tuple[Cluster, ...]
    endpoints: tuple[ClusterEndpoints, ...]
    problems: tuple[Problem, ...]

    def to_json(self) -> dict[str, Any]:
        """The view as JSON-ready data (camelCase keys), with its version."""
        document = to_json(self)
        assert isinstance(document, dict)
        return {"version": self.version, **document}

    @functools.cached_property
    def version(self) -> str:
        """A digest of the whole view: equal views, equal versions (sha256, hex)."""
        return _digest(to_json(self))

    def part_version(self, part: str) -> str:
        """A digest of one field (``clusters``, ``endpoints``, ...): what an xDS server
        versions each resource type by."""
        return _digest(to_json(getattr(self, part)))

    def outbound_service(self, service: str) -> OutboundService | None:
        return next((item for item in self.outbound if item.service == service), None)

    def cluster(self, name: str) -> Cluster | None:
        return next((item for item in self.clusters if item.name == name), None)

    def cluster_endpoints(self, name: str) -> ClusterEndpoints | None:
        return next((item for item in self.endpoints if item.cluster == name), None)

    def listener(self, port: int) -> GatewayListener | None:
        return next((item for item in self.gateway_listeners if item.port == port), None)


# -- JSON and digests ---------------------------------------------------------------------


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(mapping.items())))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def format_duration(duration: timedelta) -> str:
    """Istio's spelling of a duration: ``10s``, ``1.5s``, ``0.1s``."""
    milliseconds = duration // timedelta(milliseconds=1)
    seconds, remainder = divmod(milliseconds, 1000)
    if not remainder:
        return f"{seconds}s"
    return f"{seconds}.{remainder:03d}".rstrip("0") + "s"


def to_json(value: Any) -> Any:
    """Any part of a view as JSON-ready data: dataclasses as objects with camelCase keys,
    durations as ``1.5s``, addresses as ``host:port``, times in ISO 8601."""
    if isinstance(value, (SidecarProxy, GatewayProxy)):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, HostPort):
            return str(value)
        return {
            _camel(item.name): to_json(getattr(value, item.name))
            for item in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [to_json(item) for item in value]
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot put a {type(value).__name__} in a view's JSON")


def _digest(document: Any) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
