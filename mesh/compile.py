"""The compiler: configuration, catalog and a proxy's identity in, the proxy's view out.

Pure and deterministic — no file, socket, clock or randomness; the same inputs give an
equal :class:`~mesh.view.View` with the same :attr:`~mesh.view.View.version`::

    view = compile_view(config, catalog, SidecarProxy("orders", "spiffe://example.org/orders",
                                                      {"app": "orders"}))
    view = compile_view(config, catalog, GatewayProxy("spiffe://example.org/gateway",
                                                      {"istio": "ingressgateway"}))

What goes where (every default is :mod:`mesh.defaults`'):

- **inbound** (a sidecar): its Service's ports, and the RateLimits whose ``service`` it is;
- **authorization** and **JWT rules**: the AuthorizationPolicies and
  RequestAuthentications whose ``selector.matchLabels`` the proxy's labels match (no
  selector: every workload), by name;
- **outbound** (a sidecar): per Service, by name, the routes of the VirtualService bound
  to ``mesh`` (the default when ``gateways`` is left out) whose host names it most
  specifically (its name, then the longest wildcard, then ``*``), then a 404 for what
  none of them matches; a Service no VirtualService routes gets its default route;
- **gateway listeners** (a gateway): per port of each Gateway whose selector its labels
  match, the servers, with the routes of the VirtualServices bound to that Gateway by
  name whose hosts overlap the server's, then a 404;
- **clusters**, per Service the proxy may send to (a sidecar: every Service; a gateway:
  those its routes name), port and subset: load balancing, connection pool and outlier
  detection from the DestinationRule, and the Service's SPIFFE IDs the upstream must
  present; **endpoints**: the catalog's routable instances with the subset's labels.

A route's ``match`` entry with ``sourceLabels`` is kept only in the views of proxies whose
labels match them; a route left without entries is left out. A configuration an apply
made holds together (:mod:`mesh.references`); anything else that refers to something
missing is left out of the view and reported in :attr:`~mesh.view.View.problems`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from mesh import defaults
from mesh.catalog import Catalog, is_routable
from mesh.config import Config
from mesh.durations import parse_duration
from mesh.hosts import MESH_GATEWAY, hosts_overlap, service_name, strip_namespace
from mesh.proxy import GatewayProxy, Proxy, SidecarProxy, labels_match
from mesh.resources import (
    AuthorizationPolicy,
    DestinationRule,
    Gateway,
    RateLimit,
    RequestAuthentication,
    Service,
    VirtualService,
)
from mesh.resources.authorization import Rule
from mesh.resources.destinationrule import (
    ConnectionPoolSettings,
    HTTPSettings,
    LoadBalancerSettings,
    Subset,
    TCPSettings,
    TrafficPolicy,
)
from mesh.resources.destinationrule import OutlierDetection as OutlierDetectionSettings
from mesh.resources.virtualservice import (
    Destination,
    Headers,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    Percent,
)
from mesh.resources.virtualservice import (
    HeaderOperations as HeaderOperationsSettings,
)
from mesh.resources.virtualservice import StringMatch as StringMatchSettings
from mesh.view import (
    Abort,
    Authorization,
    AuthorizationRule,
    ClaimCondition,
    Cluster,
    ClusterEndpoints,
    ConnectionPool,
    DefaultDecision,
    Delay,
    DirectResponse,
    Endpoint,
    ExcludedInstance,
    Fault,
    Forward,
    GatewayListener,
    GatewayServer,
    GatewayVirtualHost,
    HeaderOperations,
    HeaderRewrite,
    HttpsRedirect,
    Inbound,
    JwtLocations,
    JwtRule,
    LoadBalancer,
    Mirror,
    NamedMatch,
    OperationMatch,
    OutboundService,
    OutlierDetection,
    PeerIdentities,
    PeerMatch,
    Port,
    Problem,
    RateLimitRule,
    Redirect,
    RequestMatch,
    RetryPolicy,
    Rewrite,
    Route,
    ServerTls,
    Source,
    StringMatch,
    Timeout,
    View,
    WeightedDestination,
    cluster_name,
    host_specificity,
)

__all__ = [
    "compile_authorization",
    "compile_jwt_rules",
    "compile_rate_limits",
    "compile_view",
    "mesh_virtual_service",
]

_HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})
_CLAIM_STEP = re.compile(r"\[([^\[\]]+)\]")
_ACTION_ORDER = {"DENY": 0, "ALLOW": 1, "AUDIT": 2}


def compile_view(config: Config, catalog: Catalog, proxy: Proxy) -> View:
    """The view of ``proxy``: what it does with every request, each part with its source."""
    index = _Index(config)
    problems: list[Problem] = []
    inbound: Inbound | None = None
    outbound: tuple[OutboundService, ...] = ()
    listeners: tuple[GatewayListener, ...] = ()
    if isinstance(proxy, SidecarProxy):
        inbound = _inbound(index, proxy, problems)
        outbound = tuple(
            _outbound_service(index, service, proxy.labels, problems)
            for service in index.services.values()
        )
        reached = set(index.services)
    else:
        listeners = _gateway_listeners(index, proxy, problems)
        reached = _services_routed_to(
            route
            for listener in listeners
            for server in listener.servers
            for virtual_host in server.virtual_hosts
            for route in virtual_host.routes
        )
    clusters, endpoints = _clusters(index, catalog, reached)
    return View(
        proxy=proxy,
        inbound=inbound,
        authorization=compile_authorization(config, proxy.labels),
        jwt_rules=compile_jwt_rules(config, proxy.labels),
        outbound=outbound,
        gateway_listeners=listeners,
        clusters=clusters,
        endpoints=endpoints,
        problems=tuple(
            sorted(set(problems), key=lambda problem: (problem.source, problem.message))
        ),
    )


class _Index:
    """The configuration by what the compiler looks up."""

    def __init__(self, config: Config) -> None:
        self.services: dict[str, Service] = {
            service.name: service for service in config.of_kind(Service)
        }
        self.destination_rules: dict[str, DestinationRule] = {}
        for rule in config.of_kind(DestinationRule):  # by name: the first one counts
            name = service_name(rule.spec.host)
            if name is not None:
                self.destination_rules.setdefault(name, rule)
        self.virtual_services = config.of_kind(VirtualService)
        self.gateways = config.of_kind(Gateway)
        self.rate_limits = config.of_kind(RateLimit)

    def service(self, host: str) -> Service | None:
        name = service_name(host)
        return self.services.get(name) if name is not None else None

    def subset(self, service: str, name: str) -> tuple[int, Subset] | None:
        rule = self.destination_rules.get(service)
        for position, subset in enumerate(rule.spec.subsets or () if rule else ()):
            if subset.name == name:
                return position, subset
        return None


def _resource(resource: Any, path: str = "") -> Source:
    return Source(resource.KIND, resource.name, path)


# -- inbound --------------------------------------------------------------------------------


def _ports(service: Service) -> tuple[Port, ...]:
    return tuple(
        Port(port.number, port.protocol, port.name, _resource(service, f"spec.ports[{position}]"))
        for position, port in enumerate(service.spec.ports)
    )


def _inbound(index: _Index, proxy: SidecarProxy, problems: list[Problem]) -> Inbound:
    service = index.services.get(proxy.service)
    source = Source(Service.KIND, proxy.service)
    if service is None:
        problems.append(
            Problem(f"Service {proxy.service} does not exist: the sidecar serves no port", source)
        )
    return Inbound(
        service=proxy.service,
        ports=_ports(service) if service is not None else (),
        rate_limits=_rate_limits(index.rate_limits, proxy.service),
        source=source,
    )


def _rate_limits(limits: Iterable[RateLimit], service: str) -> tuple[RateLimitRule, ...]:
    return tuple(
        RateLimitRule(
            name=limit.name,
            callers=limit.spec.from_.principals if limit.spec.from_ is not None else None,
            requests_per_second=limit.spec.requests_per_second,
            burst=limit.spec.bucket_size,
            source=_resource(limit, "spec"),
        )
        for limit in limits
        if limit.spec.service == service
    )


def compile_rate_limits(config: Config, service: str) -> tuple[RateLimitRule, ...]:
    """The RateLimits the sidecars of ``service`` keep, by name."""
    return _rate_limits(config.of_kind(RateLimit), service)


# -- authorization and JWTs -----------------------------------------------------------------


def _selects(selector: Any, labels: Mapping[str, str]) -> bool:
    return selector is None or labels_match(selector.match_labels, labels)


def compile_authorization(config: Config, labels: Mapping[str, str]) -> Authorization:
    """The AuthorizationPolicies that select a workload with ``labels``, as one decision
    list: DENY rules, then ALLOW, then AUDIT, each by policy name and rule."""
    rules: list[AuthorizationRule] = []
    allow_policies: list[Source] = []
    for policy in config.of_kind(AuthorizationPolicy):
        if not _selects(policy.spec.selector, labels):
            continue
        action = policy.spec.effective_action
        if action == "ALLOW":
            allow_policies.append(_resource(policy))
        for position, rule in enumerate(policy.spec.rules or ()):
            rules.append(_authorization_rule(policy, action, rule, position))
    rules.sort(key=lambda rule: (_ACTION_ORDER[rule.action], rule.policy, rule.source.path))
    default = (
        DefaultDecision("DENY", allow_policies[0])
        if allow_policies
        else DefaultDecision("ALLOW", defaults.AUTHORIZATION_ALLOW)
    )
    return Authorization(tuple(rules), tuple(allow_policies), default)


def _authorization_rule(
    policy: AuthorizationPolicy, action: Any, rule: Rule, position: int
) -> AuthorizationRule:
    peers = tuple(
        PeerMatch(item.source.principals, item.source.not_principals) for item in rule.from_ or ()
    )
    operations = tuple(
        OperationMatch(
            item.operation.methods,
            item.operation.not_methods,
            item.operation.paths,
            item.operation.not_paths,
        )
        for item in rule.to or ()
    )
    conditions = tuple(
        ClaimCondition(tuple(_CLAIM_STEP.findall(item.key)), item.values, item.not_values)
        for item in rule.when or ()
    )
    return AuthorizationRule(
        action=action,
        policy=policy.name,
        peers=peers,
        operations=operations,
        conditions=conditions,
        source=_resource(policy, f"spec.rules[{position}]"),
    )


def compile_jwt_rules(config: Config, labels: Mapping[str, str]) -> tuple[JwtRule, ...]:
    """The ``jwtRules`` of the RequestAuthentications that select ``labels``."""
    rules: list[JwtRule] = []
    for policy in config.of_kind(RequestAuthentication):
        if not _selects(policy.spec.selector, labels):
            continue
        for position, rule in enumerate(policy.spec.jwt_rules):
            source = _resource(policy, f"spec.jwtRules[{position}]")
            if rule.from_headers is None and rule.from_params is None:
                locations = JwtLocations(
                    (defaults.JWT_HEADER,), (defaults.JWT_PARAM,), defaults.JWT_LOCATIONS
                )
            else:
                locations = JwtLocations(
                    tuple((header.name, header.prefix or "") for header in rule.from_headers or ()),
                    tuple(rule.from_params or ()),
                    source,
                )
            rules.append(
                JwtRule(
                    issuer=rule.issuer,
                    trust_domain=rule.trust_domain,
                    audiences=tuple(rule.audiences or ()),
                    jwks_uri=rule.jwks_uri,
                    jwks=rule.jwks,
                    locations=locations,
                    forward_original_token=bool(rule.forward_original_token),
                    source=source,
                )
            )
    return tuple(rules)


# -- routes ---------------------------------------------------------------------------------


def _string_match(match: StringMatchSettings) -> StringMatch:
    if match.exact is not None:
        return StringMatch("exact", match.exact)
    if match.prefix is not None:
        return StringMatch("prefix", match.prefix)
    if match.regex is not None:
        return StringMatch("regex", match.regex)
    return StringMatch("present")


def _request_match(match: HTTPMatchRequest, source: Source) -> RequestMatch:
    return RequestMatch(
        uri=_string_match(match.uri) if match.uri is not None else None,
        method=_string_match(match.method) if match.method is not None else None,
        headers=tuple(
            NamedMatch(name, _string_match(value))
            for name, value in sorted((match.headers or {}).items())
        ),
        query_params=tuple(
            NamedMatch(name, _string_match(value))
            for name, value in sorted((match.query_params or {}).items())
        ),
        port=None,
        source=source,
    )


def _header_operations(headers: Headers | None, source: Source) -> HeaderOperations | None:
    if headers is None:
        return None

    def rewrite(operations: HeaderOperationsSettings | None) -> HeaderRewrite:
        if operations is None:
            return HeaderRewrite()
        return HeaderRewrite(
            dict(operations.set or {}), dict(operations.add or {}), tuple(operations.remove or ())
        )

    return HeaderOperations(rewrite(headers.request), rewrite(headers.response), source)


def _port_of(service: Service, destination: Destination) -> int | None:
    if destination.port is not None:
        return destination.port.number if service.port(destination.port.number) else None
    if len(service.spec.ports) == 1:
        return service.spec.ports[0].number
    return None


def _resolve(
    index: _Index, destination: Destination, source: Source, problems: list[Problem]
) -> tuple[str, int, str | None] | None:
    """A destination's Service, port and subset; None (and a problem) if one is missing."""
    service = index.service(destination.host)
    if service is None:
        problems.append(Problem(f"host {destination.host} names no Service", source))
        return None
    port = _port_of(service, destination)
    if port is None:
        problems.append(Problem(f"no port of Service {service.name} is chosen", source))
        return None
    if destination.subset is not None and index.subset(service.name, destination.subset) is None:
        problems.append(
            Problem(f"subset {destination.subset} of {service.name} is not defined", source)
        )
        return None
    return service.name, port, destination.subset


def _percentage(percent: Percent | None, default: float) -> float:
    return percent.value if percent is not None else default


def _retries(retries: HTTPRetry | None, source: Source) -> RetryPolicy:
    if retries is None:
        return RetryPolicy(
            attempts=defaults.RETRY_ATTEMPTS,
            per_try_timeout=None,
            retry_on=defaults.RETRY_ON,
            retriable_status_codes=defaults.RETRY_STATUS_CODES,
            defaulted=("attempts", "retryOn"),
            source=defaults.RETRIES,
        )
    per_try = parse_duration(retries.per_try_timeout) if retries.per_try_timeout else None
    if retries.attempts == 0:
        return RetryPolicy(0, None, (), (), (), source)
    if retries.retry_on is None:
        return RetryPolicy(
            retries.attempts,
            per_try,
            defaults.RETRY_ON,
            defaults.RETRY_STATUS_CODES,
            ("retryOn",),
            source,
        )
    conditions: list[str] = []
    codes: list[int] = []
    for written in retries.retry_on.split(","):
        condition = written.strip()
        if condition.isdigit():
            codes.append(int(condition))
        elif condition not in conditions:
            conditions.append(condition)
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return RetryPolicy(
        retries.attempts, per_try, tuple(conditions), tuple(sorted(set(codes))), (), source
    )


def _http_route(
    index: _Index,
    virtual_service: VirtualService,
    position: int,
    route: HTTPRoute,
    labels: Mapping[str, str],
    problems: list[Problem],
) -> Route | None:
    path = f"spec.http[{position}]"
    source = _resource(virtual_service, path)
    entries: list[RequestMatch] = []
    for number, match in enumerate(route.match or ()):
        if match.source_labels is None or labels_match(match.source_labels, labels):
            entries.append(_request_match(match, source.at(f"{path}.match[{number}]")))
    if route.match is not None and not entries:
        return None  # every entry is for proxies with other labels

    timeout: Timeout | None = None
    retries: RetryPolicy | None = None
    action: Forward | Redirect
    if route.redirect is not None:
        redirect = route.redirect
        action = Redirect(
            uri=redirect.uri,
            authority=redirect.authority,
            port=redirect.port,
            scheme=redirect.scheme,
            code=redirect.redirect_code or defaults.REDIRECT_CODE,
            source=source.at(f"{path}.redirect"),
        )
    else:
        destinations: list[WeightedDestination] = []
        for number, item in enumerate(route.route or ()):
            item_source = source.at(f"{path}.route[{number}]")
            resolved = _resolve(index, item.destination, item_source, problems)
            if resolved is None:
                return None
            weight = (
                item.weight
                if item.weight is not None
                else (100 if len(route.route or ()) == 1 else 0)
            )
            destinations.append(
                WeightedDestination(
                    *resolved,
                    weight=weight,
                    headers=_header_operations(
                        item.headers, item_source.at(f"{path}.route[{number}].headers")
                    ),
                    source=item_source,
                )
            )
        action = Forward(tuple(destinations), source.at(f"{path}.route"))
        timeout = (
            Timeout(parse_duration(route.timeout), source.at(f"{path}.timeout"))
            if route.timeout is not None
            else Timeout(None, defaults.TIMEOUT)
        )
        retries = _retries(route.retries, source.at(f"{path}.retries"))

    fault: Fault | None = None
    if route.fault is not None:
        delay = route.fault.delay
        abort = route.fault.abort
        fault = Fault(
            delay=Delay(
                parse_duration(delay.fixed_delay),
                _percentage(delay.percentage, 0.0),
                source.at(f"{path}.fault.delay"),
            )
            if delay is not None
            else None,
            abort=Abort(
                abort.http_status,
                _percentage(abort.percentage, 0.0),
                source.at(f"{path}.fault.abort"),
            )
            if abort is not None
            else None,
            source=source.at(f"{path}.fault"),
        )

    mirror: Mirror | None = None
    if route.mirror is not None:
        mirror_source = source.at(f"{path}.mirror")
        resolved = _resolve(index, route.mirror, mirror_source, problems)
        if resolved is not None:
            mirror = Mirror(
                *resolved,
                percentage=_percentage(route.mirror_percentage, defaults.MIRROR_PERCENTAGE),
                source=mirror_source,
            )

    rewrite = (
        Rewrite(route.rewrite.uri, route.rewrite.authority, source.at(f"{path}.rewrite"))
        if route.rewrite is not None
        else None
    )
    return Route(
        name=route.name,
        matches=tuple(entries),
        action=action,
        rewrite=rewrite,
        timeout=timeout,
        retries=retries,
        fault=fault,
        mirror=mirror,
        headers=_header_operations(route.headers, source.at(f"{path}.headers")),
        source=source,
    )


def _not_found(reason: str, source: Source) -> Route:
    return Route(
        name=None,
        matches=(),
        action=DirectResponse(defaults.NOT_FOUND_STATUS, reason, source),
        rewrite=None,
        timeout=None,
        retries=None,
        fault=None,
        mirror=None,
        headers=None,
        source=source,
    )


def _virtual_service_routes(
    index: _Index,
    virtual_service: VirtualService,
    labels: Mapping[str, str],
    problems: list[Problem],
) -> tuple[Route, ...]:
    """The VirtualService's routes for a proxy with ``labels``, then the 404 for a
    request none of them takes (left out after a route that takes every request)."""
    routes = [
        compiled
        for position, route in enumerate(virtual_service.spec.http)
        if (compiled := _http_route(index, virtual_service, position, route, labels, problems))
        is not None
    ]
    if not routes or routes[-1].matches:
        routes.append(
            _not_found(
                f"no route of VirtualService {virtual_service.name} matches the request",
                defaults.ROUTE_NOT_FOUND,
            )
        )
    return tuple(routes)


# -- outbound -------------------------------------------------------------------------------

_ANY_SERVICE_SUFFIX = re.compile(r"(?:[a-z0-9-]+\.)?svc(?:\.cluster\.local)?|(?:cluster\.)?local")


def _host_rank(host: str, service: str) -> tuple[int, int] | None:
    """How specifically a mesh VirtualService's host names ``service``; None: it does not.

    Its name (in any of its spellings) ranks first, then a wildcard that covers every
    Service (``*.svc.cluster.local``, ``*.<namespace>.svc``: namespaces are not used),
    longest first, then ``*``.
    """
    if host == "*":
        return (0, 0)
    if host.startswith("*."):
        if _ANY_SERVICE_SUFFIX.fullmatch(host[2:]):
            return (1, len(host))
        return None
    return (2, 0) if service_name(host) == service else None


def mesh_virtual_service(
    virtual_services: Iterable[VirtualService], service: str
) -> VirtualService | None:
    """The VirtualService bound to ``mesh`` that routes calls to ``service``: the one
    whose host names it most specifically, the first by name on a tie."""
    best: tuple[tuple[int, int], VirtualService] | None = None
    for virtual_service in virtual_services:  # by name
        if MESH_GATEWAY not in virtual_service.gateway_names:
            continue
        ranks = [
            rank
            for host in virtual_service.spec.hosts
            if (rank := _host_rank(host, service)) is not None
        ]
        if ranks and (best is None or max(ranks) > best[0]):
            best = (max(ranks), virtual_service)
    return best[1] if best is not None else None


def _default_routes(service: Service) -> tuple[Route, ...]:
    """Every request to the Service's instances; with several HTTP ports, the request's
    port chooses, the first port for a request that names none."""
    ports = [
        (position, port)
        for position, port in enumerate(service.spec.ports)
        if port.protocol in _HTTP_PROTOCOLS
    ]
    routes: list[Route] = []
    for order, (position, port) in enumerate([*ports[1:], *ports[:1]]):
        port_source = _resource(service, f"spec.ports[{position}]")
        last = order == len(ports) - 1
        routes.append(
            Route(
                name="default",
                matches=()
                if last
                else (RequestMatch(None, None, (), (), port.number, port_source),),
                action=Forward(
                    (WeightedDestination(service.name, port.number, None, 100, None, port_source),),
                    defaults.DEFAULT_ROUTE,
                ),
                rewrite=None,
                timeout=Timeout(None, defaults.TIMEOUT),
                retries=_retries(None, defaults.RETRIES),
                fault=None,
                mirror=None,
                headers=None,
                source=defaults.DEFAULT_ROUTE,
            )
        )
    return tuple(routes)


def _outbound_service(
    index: _Index, service: Service, labels: Mapping[str, str], problems: list[Problem]
) -> OutboundService:
    virtual_service = mesh_virtual_service(index.virtual_services, service.name)
    if virtual_service is None:
        return OutboundService(
            service.name, _ports(service), _default_routes(service), _resource(service)
        )
    return OutboundService(
        service.name,
        _ports(service),
        _virtual_service_routes(index, virtual_service, labels, problems),
        _resource(virtual_service),
    )


# -- gateways -------------------------------------------------------------------------------


def _narrower(first: str, second: str) -> str:
    """Of two overlapping host patterns, the one that says more."""
    return first if host_specificity(first) >= host_specificity(second) else second


def _by_specificity(hosts: Iterable[str]) -> tuple[str, ...]:
    unique = set(hosts)
    return tuple(sorted(unique, key=lambda host: (tuple(-n for n in host_specificity(host)), host)))


def _gateway_listeners(
    index: _Index, proxy: GatewayProxy, problems: list[Problem]
) -> tuple[GatewayListener, ...]:
    listeners: dict[int, tuple[str, Source, list[GatewayServer]]] = {}
    for gateway in index.gateways:
        if not labels_match(gateway.spec.selector, proxy.labels):
            continue
        bound = [
            virtual_service
            for virtual_service in index.virtual_services
            if gateway.name in virtual_service.gateway_names
        ]
        for position, server in enumerate(gateway.spec.servers):
            path = f"spec.servers[{position}]"
            source = _resource(gateway, path)
            number, protocol = server.port.number, server.port.protocol
            existing = listeners.get(number)
            if existing is not None and existing[0] != protocol:
                problems.append(
                    Problem(
                        f"port {number} is already {existing[0]} ({existing[1]}): this "
                        f"{protocol} server is left out",
                        source,
                    )
                )
                continue
            if existing is None:
                existing = (protocol, source.at(f"{path}.port"), [])
                listeners[number] = existing
            existing[2].append(_gateway_server(index, gateway, position, bound, proxy, problems))
    return tuple(
        GatewayListener(
            port=number,
            protocol="HTTPS" if protocol == "HTTPS" else "HTTP",
            servers=tuple(servers),
            not_found=DirectResponse(
                defaults.NOT_FOUND_STATUS,
                f"no server on port {number} has the request's host",
                defaults.GATEWAY_NOT_FOUND,
            ),
            source=source,
        )
        for number, (protocol, source, servers) in sorted(listeners.items())
    )


def _gateway_server(
    index: _Index,
    gateway: Gateway,
    position: int,
    bound: list[VirtualService],
    proxy: GatewayProxy,
    problems: list[Problem],
) -> GatewayServer:
    server = gateway.spec.servers[position]
    path = f"spec.servers[{position}]"
    source = _resource(gateway, path)
    hosts = _by_specificity(strip_namespace(host) for host in server.hosts)
    tls = server.tls
    server_tls = None
    if server.port.protocol == "HTTPS" and tls is not None:
        assert tls.mode and tls.server_certificate and tls.private_key  # the model's check
        server_tls = ServerTls(
            tls.mode, tls.server_certificate, tls.private_key, source.at(f"{path}.tls")
        )
    https_redirect = (
        HttpsRedirect(source.at(f"{path}.tls.httpsRedirect"))
        if tls is not None and tls.https_redirect
        else None
    )
    virtual_hosts = []
    for virtual_service in bound:
        domains = _by_specificity(
            _narrower(route_host, server_host)
            for route_host in virtual_service.spec.hosts
            for server_host in hosts
            if hosts_overlap(route_host, server_host)
        )
        if domains:
            virtual_hosts.append(
                GatewayVirtualHost(
                    domains,
                    _virtual_service_routes(index, virtual_service, proxy.labels, problems),
                    _resource(virtual_service),
                )
            )
    virtual_hosts.sort(
        key=lambda item: (tuple(-n for n in host_specificity(item.domains[0])), item.source.name)
    )
    return GatewayServer(
        hosts=hosts,
        tls=server_tls,
        https_redirect=https_redirect,
        virtual_hosts=tuple(virtual_hosts),
        not_found=DirectResponse(
            defaults.NOT_FOUND_STATUS,
            f"no VirtualService bound to Gateway {gateway.name} routes the request's host",
            defaults.GATEWAY_NOT_FOUND,
        ),
        source=source,
    )


def _services_routed_to(routes: Iterable[Route]) -> set[str]:
    services: set[str] = set()
    for route in routes:
        if isinstance(route.action, Forward):
            services.update(item.service for item in route.action.destinations)
        if route.mirror is not None:
            services.add(route.mirror.service)
    return services


# -- clusters and endpoints -----------------------------------------------------------------

_SECTIONS = {
    "load_balancer": "loadBalancer",
    "connection_pool": "connectionPool",
    "outlier_detection": "outlierDetection",
}


def _section(
    rule: DestinationRule | None, subset: tuple[int, Subset] | None, name: str
) -> tuple[Any, Source] | None:
    """A trafficPolicy section: the subset's if it sets it, else the rule's (Istio merges
    a subset's policy over the rule's section by section)."""
    if rule is None:
        return None
    alias = _SECTIONS[name]
    if subset is not None:
        position, settings = subset
        policy: TrafficPolicy | None = settings.traffic_policy
        if policy is not None and getattr(policy, name) is not None:
            return getattr(policy, name), _resource(
                rule, f"spec.subsets[{position}].trafficPolicy.{alias}"
            )
    policy = rule.spec.traffic_policy
    if policy is not None and getattr(policy, name) is not None:
        return getattr(policy, name), _resource(rule, f"spec.trafficPolicy.{alias}")
    return None


def _load_balancer(found: tuple[Any, Source] | None) -> LoadBalancer:
    if found is None:
        return LoadBalancer(defaults.LOAD_BALANCING, None, False, defaults.LOAD_BALANCER)
    settings, source = found
    assert isinstance(settings, LoadBalancerSettings)
    if settings.consistent_hash is not None:
        return LoadBalancer(
            "CONSISTENT_HASH",
            settings.consistent_hash.http_header_name,
            bool(settings.consistent_hash.use_source_ip),
            source,
        )
    assert settings.simple is not None
    return LoadBalancer(settings.simple, None, False, source)


def _duration_or(text: str | None, default: timedelta) -> timedelta:
    return parse_duration(text) if text is not None else default


_POOL_FIELDS = (
    "maxConnections",
    "connectTimeout",
    "http1MaxPendingRequests",
    "http2MaxRequests",
    "maxRequestsPerConnection",
    "maxRetries",
    "idleTimeout",
)


def _connection_pool(found: tuple[Any, Source] | None) -> ConnectionPool:
    if found is None:
        return ConnectionPool(
            None, defaults.CONNECT_TIMEOUT, None, None, None, None, defaults.IDLE_TIMEOUT,
            _POOL_FIELDS, defaults.CONNECTION_POOL,
        )  # fmt: skip
    settings, source = found
    assert isinstance(settings, ConnectionPoolSettings)
    tcp = settings.tcp or TCPSettings()
    http = settings.http or HTTPSettings()
    written = (
        tcp.max_connections,
        tcp.connect_timeout,
        http.http1_max_pending_requests,
        http.http2_max_requests,
        http.max_requests_per_connection,
        http.max_retries,
        http.idle_timeout,
    )
    return ConnectionPool(
        max_connections=tcp.max_connections,
        connect_timeout=_duration_or(tcp.connect_timeout, defaults.CONNECT_TIMEOUT),
        http1_max_pending_requests=http.http1_max_pending_requests,
        http2_max_requests=http.http2_max_requests,
        # 0 is unlimited, as in Istio
        max_requests_per_connection=http.max_requests_per_connection or None,
        max_retries=http.max_retries,
        idle_timeout=_duration_or(http.idle_timeout, defaults.IDLE_TIMEOUT),
        defaulted=tuple(
            name for name, value in zip(_POOL_FIELDS, written, strict=True) if value is None
        ),
        source=source,
    )


def _outlier_detection(found: tuple[Any, Source] | None) -> OutlierDetection | None:
    if found is None:  # crashes are routed around all the same (mesh.defaults)
        return OutlierDetection(
            consecutive_5xx_errors=None,
            consecutive_gateway_errors=defaults.CRASH_GATEWAY_ERRORS,
            interval=defaults.OUTLIER_INTERVAL,
            base_ejection_time=defaults.OUTLIER_BASE_EJECTION_TIME,
            max_ejection_percent=defaults.CRASH_MAX_EJECTION_PERCENT,
            defaulted=("consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                       "baseEjectionTime", "maxEjectionPercent"),
            source=defaults.OUTLIER_DETECTION,
        )  # fmt: skip
    settings, source = found
    assert isinstance(settings, OutlierDetectionSettings)
    written = {
        "consecutive5xxErrors": settings.consecutive_5xx_errors,
        "consecutiveGatewayErrors": settings.consecutive_gateway_errors,
        "interval": settings.interval,
        "baseEjectionTime": settings.base_ejection_time,
        "maxEjectionPercent": settings.max_ejection_percent,
    }
    errors_5xx = settings.consecutive_5xx_errors
    if errors_5xx is None:
        errors_5xx = defaults.OUTLIER_CONSECUTIVE_5XX_ERRORS
    max_percent = settings.max_ejection_percent
    return OutlierDetection(
        consecutive_5xx_errors=errors_5xx or None,  # 0 turns the check off
        consecutive_gateway_errors=settings.consecutive_gateway_errors or None,
        interval=_duration_or(settings.interval, defaults.OUTLIER_INTERVAL),
        base_ejection_time=_duration_or(
            settings.base_ejection_time, defaults.OUTLIER_BASE_EJECTION_TIME
        ),
        max_ejection_percent=max_percent
        if max_percent is not None
        else defaults.OUTLIER_MAX_EJECTION_PERCENT,
        defaulted=tuple(name for name, value in written.items() if value is None),
        source=source,
    )


def _endpoints(
    catalog: Catalog,
    service: Service,
    cluster: str,
    labels: Mapping[str, str],
    source: Source,
) -> ClusterEndpoints:
    has_check = service.spec.health_check is not None
    endpoints: list[Endpoint] = []
    excluded: list[ExcludedInstance] = []
    for instance in catalog.instances(service.name):
        if not labels_match(labels, instance.labels):
            continue
        where = Source("catalog", service.name, str(instance.address))
        if is_routable(instance, has_health_check=has_check):
            endpoints.append(
                Endpoint(
                    instance.address,
                    instance.node,
                    instance.spiffe_id,
                    instance.labels,
                    instance.health,
                    where,
                )
            )
        else:
            if instance.health == "unhealthy":
                reason = f"unhealthy ({instance.detail})" if instance.detail else "unhealthy"
            else:
                reason = "not checked yet (the Service has a health check)"
            excluded.append(
                ExcludedInstance(instance.address, instance.health, instance.since, reason, where)
            )
    return ClusterEndpoints(cluster, labels, tuple(endpoints), tuple(excluded), source)


def _clusters(
    index: _Index, catalog: Catalog, reached: set[str]
) -> tuple[tuple[Cluster, ...], tuple[ClusterEndpoints, ...]]:
    clusters: list[Cluster] = []
    endpoints: list[ClusterEndpoints] = []
    for name in sorted(reached):
        service = index.services.get(name)
        if service is None:
            continue
        rule = index.destination_rules.get(name)
        subsets: list[tuple[int, Subset] | None] = [
            None,
            *enumerate(rule.spec.subsets or () if rule else ()),
        ]
        peers = PeerIdentities(service.spec.spiffe_ids, _resource(service, "spec.spiffeIds"))
        for port in service.spec.ports:
            for subset in subsets:
                subset_name = subset[1].name if subset is not None else None
                cluster = cluster_name(name, port.number, subset_name)
                chosen_by = (
                    _resource(rule, f"spec.subsets[{subset[0]}]")
                    if subset is not None and rule is not None
                    else _resource(service)
                )
                clusters.append(
                    Cluster(
                        name=cluster,
                        service=name,
                        port=port.number,
                        protocol=port.protocol,
                        subset=subset_name,
                        load_balancer=_load_balancer(_section(rule, subset, "load_balancer")),
                        connection_pool=_connection_pool(_section(rule, subset, "connection_pool")),
                        outlier_detection=_outlier_detection(
                            _section(rule, subset, "outlier_detection")
                        ),
                        peer_identities=peers,
                        source=chosen_by,
                    )
                )
                endpoints.append(
                    _endpoints(
                        catalog,
                        service,
                        cluster,
                        subset[1].labels if subset is not None else {},
                        chosen_by,
                    )
                )
    return tuple(clusters), tuple(endpoints)
