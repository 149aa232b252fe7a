"""What each proxy of a Service will do, line by line: ``tessera mesh describe SERVICE``.

The proxies of a Service are its sidecars: one view per distinct SPIFFE ID and labels
among its instances in the catalog (a Service without instances: the view a sidecar
without labels would get). Each line names the resource it comes from::

    description = describe(config, catalog, "users-service")
    for line in description.lines():
        print(line)
    # sidecar of users-service (spiffe://example.org/users) {version=v1}: 10.0.0.5:8443
    #   inbound
    #     port 80 HTTP  [Service users-service spec.ports[0]]
    #     ALLOW from spiffe://example.org/orders  [AuthorizationPolicy users-readers spec.rules[0]]
    #   ...
    description.to_json()      # --output json: the lines as items, and each whole view

:func:`describe_view` writes the lines of any view (a gateway's too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mesh import defaults
from mesh.catalog import Catalog
from mesh.compile import compile_view
from mesh.config import Config
from mesh.errors import UnknownServiceError
from mesh.proxy import SidecarProxy
from mesh.resources import Service
from mesh.view import (
    Authorization,
    AuthorizationRule,
    Cluster,
    ClusterEndpoints,
    DirectResponse,
    Forward,
    GatewayListener,
    HeaderOperations,
    JwtRule,
    Redirect,
    Route,
    Source,
    View,
    format_duration,
    to_json,
)

__all__ = [
    "Description",
    "Line",
    "ProxyDescription",
    "describe",
    "describe_view",
]


@dataclass(frozen=True)
class Line:
    """One thing a proxy does, in a ``section``, indented by ``depth``, with its source."""

    section: str
    depth: int
    text: str
    source: Source

    def __str__(self) -> str:
        return f"{'  ' * self.depth}{self.text}  [{self.source}]"


@dataclass(frozen=True)
class ProxyDescription:
    """The sidecars of one SPIFFE ID and label set, the instances they front, their view."""

    proxy: SidecarProxy
    instances: tuple[str, ...]
    view: View
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Description:
    service: str
    proxies: tuple[ProxyDescription, ...]

    def lines(self) -> list[str]:
        return [str(line) for proxy in self.proxies for line in proxy.lines]

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "proxies": [
                {
                    "proxy": proxy.proxy.to_json(),
                    "instances": list(proxy.instances),
                    "version": proxy.view.version,
                    "items": [to_json(line) for line in proxy.lines],
                    "view": proxy.view.to_json(),
                }
                for proxy in self.proxies
            ],
        }


def describe(config: Config, catalog: Catalog, service: str) -> Description:
    """What every proxy of ``service`` does; raise UnknownServiceError if it is not
    configured."""
    resource = config.get(Service, service)
    if resource is None:
        raise UnknownServiceError(service, (item.name for item in config.of_kind(Service)))
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}
    for instance in catalog.instances(service):
        key = (instance.spiffe_id, tuple(sorted(instance.labels.items())))
        groups.setdefault(key, []).append(str(instance.address))
    if not groups:
        groups[(resource.spec.spiffe_ids[0], ())] = []
    proxies = []
    for (spiffe_id, labels), addresses in sorted(groups.items()):
        proxy = SidecarProxy(service, spiffe_id, dict(labels))
        view = compile_view(config, catalog, proxy)
        header = Line(
            "proxy",
            0,
            f"{proxy}{' ' + _labels(dict(labels)) if labels else ''}: "
            + (", ".join(addresses) if addresses else "no instance yet"),
            Source(Service.KIND, service),
        )
        proxies.append(
            ProxyDescription(proxy, tuple(addresses), view, (header, *describe_view(view, 1)))
        )
    return Description(service, tuple(proxies))


def describe_view(view: View, depth: int = 0) -> list[Line]:
    """Every line of a view: inbound, authorization, JWTs, outbound or gateway listeners,
    clusters with their endpoints, and what was left out."""
    lines = _Lines(depth)
    if view.inbound is not None:
        lines.add("inbound", 0, f"inbound of {view.inbound.service}", view.inbound.source)
        for port in view.inbound.ports:
            name = f" ({port.name})" if port.name else ""
            lines.add("inbound", 1, f"port {port.number} {port.protocol}{name}", port.source)
        for limit in view.inbound.rate_limits:
            who = (
                f"shared by {', '.join(limit.callers)}"
                if limit.callers is not None
                else "one bucket per caller SPIFFE ID"
            )
            lines.add(
                "inbound",
                1,
                f"rate limit {limit.requests_per_second}/s, burst {limit.burst}, {who}",
                limit.source,
            )
    _authorization(lines, view.authorization)
    for rule in view.jwt_rules:
        _jwt_rule(lines, rule)
    for service in view.outbound:
        lines.add("outbound", 0, f"outbound to {service.service}", service.source)
        _routes(lines, "outbound", 1, service.routes)
    for listener in view.gateway_listeners:
        _listener(lines, listener)
    for cluster, endpoints in zip(view.clusters, view.endpoints, strict=True):
        _cluster(lines, cluster, endpoints)
    for problem in view.problems:
        lines.add("problems", 0, f"left out: {problem.message}", problem.source)
    return lines.items


class _Lines:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.items: list[Line] = []

    def add(self, section: str, depth: int, text: str, source: Source) -> None:
        self.items.append(Line(section, self.depth + depth, text, source))


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{key}={value}" for key, value in sorted(labels.items())) + "}"


# -- authorization ------------------------------------------------------------------------


def _rule_text(rule: AuthorizationRule) -> str:
    parts = []
    peers = []
    for peer in rule.peers:
        said = []
        if peer.principals is not None:
            said.append(", ".join(peer.principals))
        if peer.not_principals is not None:
            said.append("not " + ", ".join(peer.not_principals))
        peers.append(" and ".join(said))
    if peers:
        parts.append("from " + " or ".join(peers))
    operations = []
    for operation in rule.operations:
        said = []
        for label, values in (
            ("methods", operation.methods),
            ("not methods", operation.not_methods),
            ("paths", operation.paths),
            ("not paths", operation.not_paths),
        ):
            if values is not None:
                said.append(f"{label} {', '.join(values)}")
        operations.append(" and ".join(said))
    if operations:
        parts.append("to " + " or ".join(operations))
    for condition in rule.conditions:
        said = []
        if condition.values is not None:
            said.append(f"in {', '.join(condition.values)}")
        if condition.not_values is not None:
            said.append(f"not in {', '.join(condition.not_values)}")
        parts.append(f"when {condition.key} {' and '.join(said)}")
    return f"{rule.action} " + (" ".join(parts) if parts else "every request")


def _authorization(lines: _Lines, authorization: Authorization) -> None:
    for rule in authorization.rules:
        lines.add("authorization", 0, f"authorization: {_rule_text(rule)}", rule.source)
    if authorization.default.action == "DENY":
        text = "authorization: otherwise DENY (an ALLOW policy selects this workload)"
    else:
        text = "authorization: otherwise ALLOW (no ALLOW policy selects this workload)"
    lines.add("authorization", 0, text, authorization.default.source)


def _jwt_rule(lines: _Lines, rule: JwtRule) -> None:
    keys = (
        f"JWT-SVIDs of {rule.trust_domain}"
        if rule.trust_domain is not None
        else f"keys from {rule.jwks_uri}"
        if rule.jwks_uri is not None
        else "inline keys"
    )
    audiences = f", audiences {', '.join(rule.audiences)}" if rule.audiences else ""
    lines.add("jwt", 0, f"JWT issuer {rule.issuer}: {keys}{audiences}", rule.source)
    places = [f"header {name} {prefix!r}" for name, prefix in rule.locations.headers]
    places += [f"query parameter {name}" for name in rule.locations.params]
    lines.add("jwt", 1, "token read from " + ", then ".join(places), rule.locations.source)


# -- routes -------------------------------------------------------------------------------


def _action_text(route: Route) -> str:
    action = route.action
    if isinstance(action, Forward):
        return ", ".join(f"{item} {item.weight}%" for item in action.destinations)
    if isinstance(action, Redirect):
        target = ", ".join(
            f"{name} {value}"
            for name, value in (
                ("scheme", action.scheme),
                ("authority", action.authority),
                ("port", action.port),
                ("uri", action.uri),
            )
            if value is not None
        )
        return f"redirect {action.code} ({target})"
    assert isinstance(action, DirectResponse)
    return f"answer {action.status}: {action.reason}"


def _headers_text(operations: HeaderOperations) -> str:
    said: list[str] = []
    for direction, rewrite in (("request", operations.request), ("response", operations.response)):
        for verb, items in (("set", rewrite.set), ("add", rewrite.add)):
            said.extend(f"{direction} {verb} {name}" for name in items)
        said.extend(f"{direction} remove {name}" for name in rewrite.remove)
    return "headers: " + ", ".join(said)


def _routes(lines: _Lines, section: str, depth: int, routes: Iterable[Route]) -> None:
    for position, route in enumerate(routes):
        taken = " or ".join(str(entry) for entry in route.matches) or "any request"
        name = f" {route.name!r}" if route.name else ""
        lines.add(
            section,
            depth,
            f"route {position}{name}: {taken} → {_action_text(route)}",
            route.source,
        )
        for entry in route.matches:
            lines.add(section, depth + 1, f"match {entry}", entry.source)
        if isinstance(route.action, Forward) and (
            len(route.action.destinations) > 1 or route.action.destinations[0].headers
        ):
            for destination in route.action.destinations:
                lines.add(
                    section, depth + 1, f"{destination.weight}% to {destination}",
                    destination.source,
                )  # fmt: skip
                if destination.headers is not None:
                    lines.add(
                        section, depth + 2, _headers_text(destination.headers),
                        destination.headers.source,
                    )  # fmt: skip
        if route.rewrite is not None:
            rewrite = route.rewrite
            said = [f"uri {rewrite.uri}"] if rewrite.uri else []
            said += [f"authority {rewrite.authority}"] if rewrite.authority else []
            lines.add(section, depth + 1, "rewrite " + ", ".join(said), rewrite.source)
        if route.timeout is not None:
            timeout = route.timeout.duration
            lines.add(
                section,
                depth + 1,
                f"timeout {format_duration(timeout) if timeout else 'none'}",
                route.timeout.source,
            )
        if route.retries is not None:
            retries = route.retries
            if retries.attempts:
                per_try = (
                    f", {format_duration(retries.per_try_timeout)} per try"
                    if retries.per_try_timeout
                    else ""
                )
                codes = (
                    f" (status {', '.join(str(code) for code in retries.retriable_status_codes)})"
                    if retries.retriable_status_codes
                    else ""
                )
                text = f"retries {retries.attempts} on {','.join(retries.retry_on)}{codes}{per_try}"
            else:
                text = "no retries"
            if retries.defaulted and retries.source.kind != "default":
                text += f" ({', '.join(retries.defaulted)}: default)"
            lines.add(section, depth + 1, text, retries.source)
        if route.fault is not None:
            if route.fault.delay is not None:
                delay = route.fault.delay
                lines.add(
                    section,
                    depth + 1,
                    f"fault: delay {format_duration(delay.fixed_delay)} on {delay.percentage:g}%",
                    delay.source,
                )
            if route.fault.abort is not None:
                abort = route.fault.abort
                lines.add(
                    section,
                    depth + 1,
                    f"fault: abort {abort.http_status} on {abort.percentage:g}%",
                    abort.source,
                )
        if route.mirror is not None:
            mirror = route.mirror
            lines.add(
                section,
                depth + 1,
                f"mirror {mirror.percentage:g}% to {mirror.cluster}",
                mirror.source,
            )
        if route.headers is not None:
            lines.add(section, depth + 1, _headers_text(route.headers), route.headers.source)


def _listener(lines: _Lines, listener: GatewayListener) -> None:
    lines.add("gateway", 0, f"listener port {listener.port} {listener.protocol}", listener.source)
    for server in listener.servers:
        lines.add("gateway", 1, f"server for hosts {', '.join(server.hosts)}", server.source)
        if server.tls is not None:
            tls = server.tls
            lines.add(
                "gateway",
                2,
                f"TLS {tls.mode}: certificate {tls.server_certificate}, key {tls.private_key}",
                tls.source,
            )
        if server.https_redirect is not None:
            lines.add(
                "gateway",
                2,
                "every request redirected to https (301)",
                server.https_redirect.source,
            )
        for virtual_host in server.virtual_hosts:
            lines.add("gateway", 2, f"hosts {', '.join(virtual_host.domains)}", virtual_host.source)
            _routes(lines, "gateway", 3, virtual_host.routes)
        lines.add(
            "gateway",
            2,
            f"any other host: answer {server.not_found.status}",
            server.not_found.source,
        )
    lines.add(
        "gateway",
        1,
        f"a host no server has: answer {listener.not_found.status}",
        listener.not_found.source,
    )


# -- clusters -----------------------------------------------------------------------------


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _retries(limit: int | None) -> str:
    if limit is not None:
        return f"{limit} retries"
    return (f"retries within a budget of {defaults.RETRY_BUDGET_PERCENT:g}% of requests "
            f"(at least {defaults.RETRY_BUDGET_MIN_RETRIES})")


def _cluster(lines: _Lines, cluster: Cluster, endpoints: ClusterEndpoints) -> None:
    lines.add("clusters", 0, f"cluster {cluster.name} ({cluster.protocol})", cluster.source)
    balancer = cluster.load_balancer
    if balancer.policy == "CONSISTENT_HASH":
        key = f"header {balancer.hash_header}" if balancer.hash_header else "source IP"
        text = f"load balancing: consistent hash on {key}"
    else:
        text = f"load balancing: {balancer.policy}"
    lines.add("clusters", 1, text, balancer.source)
    pool = cluster.connection_pool
    lines.add(
        "clusters",
        1,
        f"connection pool: {_limit(pool.max_connections)} connections, "
        f"{_limit(pool.http1_max_pending_requests)} pending, "
        f"{_limit(pool.http2_max_requests)} requests, "
        f"{_retries(pool.max_retries)}, "
        f"{_limit(pool.max_requests_per_connection)} requests per connection, "
        f"connect timeout {format_duration(pool.connect_timeout)}, "
        f"idle timeout {format_duration(pool.idle_timeout)}",
        pool.source,
    )
    outlier = cluster.outlier_detection
    if outlier is not None:
        checks = []
        if outlier.consecutive_5xx_errors:
            checks.append(f"{outlier.consecutive_5xx_errors} consecutive 5xx")
        if outlier.consecutive_gateway_errors:
            checks.append(f"{outlier.consecutive_gateway_errors} consecutive gateway errors")
        lines.add(
            "clusters",
            1,
            f"outlier detection: eject after {' or '.join(checks) or 'nothing'}, checked "
            f"every {format_duration(outlier.interval)}, for "
            f"{format_duration(outlier.base_ejection_time)} and longer, at most "
            f"{outlier.max_ejection_percent}% of endpoints",
            outlier.source,
        )
    lines.add(
        "clusters",
        1,
        f"upstream must present {' or '.join(cluster.peer_identities.spiffe_ids)}",
        cluster.peer_identities.source,
    )
    if endpoints.labels:
        lines.add(
            "clusters",
            1,
            f"instances with labels {_labels(dict(endpoints.labels))}",
            endpoints.source,
        )
    for endpoint in endpoints.endpoints:
        lines.add(
            "clusters",
            1,
            f"endpoint {endpoint.address} ({endpoint.health}, {endpoint.spiffe_id})",
            endpoint.source,
        )
    for instance in endpoints.excluded:
        lines.add(
            "clusters", 1, f"no requests to {instance.address}: {instance.reason}", instance.source
        )
    if not endpoints.endpoints:
        lines.add(
            "clusters", 1, "no endpoint: calls get 503 (no healthy upstream)", endpoints.source
        )
