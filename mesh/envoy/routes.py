"""A view's routes as Envoy's: virtual hosts, routes and what each does with a request.

A view's :class:`~mesh.view.Route` takes a request when any of its ``match`` entries
does; an Envoy route has one match. So each entry becomes one Envoy route, in order,
all doing the same — the first that matches wins in both, and the order is kept::

    envoy_routes(route, clusters)
    # [{"name": "VirtualService reviews spec.http[0].match[0]",
    #   "match": {"prefix": "/reviews"},
    #   "route": {"weighted_clusters": {...}, "timeout": "0s", "retry_policy": {...}},
    #   "metadata": {"filter_metadata": {"tessera": {
    #       "source": "VirtualService reviews spec.http[0]", ...}}}}]

What Envoy would otherwise do on its own is written out: a route without ``timeout``
gets ``0s`` (none, as Istio; Envoy's default is 15 s), and the path is matched without
its query string, as the view matches it. Each route's ``name`` is the ``match`` entry it
came from (``%ROUTE_NAME%`` in the access log), its metadata the route's source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mesh.envoy.values import (
    duration,
    fraction,
    header_value,
    header_value_options,
    metadata,
    runtime_fraction,
    string_matcher,
    typed,
)
from mesh.view import (
    Cluster,
    DirectResponse,
    Fault,
    Forward,
    GatewayListener,
    GatewayServer,
    HeaderOperations,
    Inbound,
    NamedMatch,
    OutboundService,
    Redirect,
    RequestMatch,
    Route,
    Source,
    StringMatch,
    WeightedDestination,
    host_specificity,
)

__all__ = [
    "FAULT_FILTER",
    "FAULT_FILTER_CONFIG",
    "envoy_routes",
    "gateway_virtual_hosts",
    "has_fault",
    "inbound_virtual_host",
    "outbound_virtual_hosts",
    "route_configuration",
]

FAULT_FILTER = "envoy.filters.http.fault"
FAULT_FILTER_CONFIG = "envoy.extensions.filters.http.fault.v3.HTTPFault"

_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}
_HOST_SELECTION_RETRY_ATTEMPTS = 5
"""How often a retry looks for a host it has not tried yet (Istio's value)."""


def envoy_routes(route: Route, clusters: Mapping[str, Cluster]) -> list[dict[str, Any]]:
    """The Envoy routes of one view route: one per ``match`` entry, or one taking every
    request. ``clusters`` are the view's, by name (their load balancer decides the
    route's hash policy)."""
    entries: Iterable[RequestMatch | None] = route.matches or (None,)
    return [_envoy_route(route, entry, clusters) for entry in entries]


def has_fault(routes: Iterable[Route]) -> bool:
    """Whether any route injects faults (its listener then needs the fault filter)."""
    return any(route.fault is not None for route in routes)


def _envoy_route(
    route: Route, entry: RequestMatch | None, clusters: Mapping[str, Cluster]
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": str(entry.source if entry is not None else route.source),
        "match": _route_match(entry),
    }
    action = route.action
    if isinstance(action, Forward):
        result["route"] = _forward(route, action, entry, clusters)
    elif isinstance(action, Redirect):
        result["redirect"] = _redirect(action)
    else:
        assert isinstance(action, DirectResponse)
        result["direct_response"] = {"status": action.status}
    if route.headers is not None:
        result.update(_header_operations(route.headers))
    if route.fault is not None:
        result["typed_per_filter_config"] = {FAULT_FILTER: _fault(route.fault)}
    result["metadata"] = metadata(
        route.source,
        match=str(entry.source) if entry is not None else None,
        name=route.name,
        action=str(action.source),
        timeout=str(route.timeout.source) if route.timeout is not None else None,
        retries=str(route.retries.source) if route.retries is not None else None,
        fault=str(route.fault.source) if route.fault is not None else None,
        mirror=str(route.mirror.source) if route.mirror is not None else None,
        rewrite=str(route.rewrite.source) if route.rewrite is not None else None,
        headers=str(route.headers.source) if route.headers is not None else None,
    )
    return result


# -- matching -------------------------------------------------------------------------------


def _route_match(entry: RequestMatch | None) -> dict[str, Any]:
    match: dict[str, Any] = {}
    uri = entry.uri if entry is not None else None
    if uri is None or uri.kind == "present":
        match["prefix"] = "/"
    elif uri.kind == "exact":
        match["path"] = uri.value
    elif uri.kind == "prefix":
        match["prefix"] = uri.value
    else:
        match["safe_regex"] = {"regex": uri.value}
    if entry is None:
        return match
    headers = []
    if entry.method is not None:
        headers.append(_named_matcher(":method", entry.method))
    headers.extend(_named_matcher(item.name, item.match) for item in entry.headers)
    if entry.port is not None:
        # The port a request names is the one in its Host (:authority).
        headers.append({"name": ":authority", "string_match": {"suffix": f":{entry.port}"}})
    if headers:
        match["headers"] = headers
    if entry.query_params:
        match["query_parameters"] = [_query_matcher(item) for item in entry.query_params]
    return match


def _named_matcher(name: str, match: StringMatch) -> dict[str, Any]:
    if match.kind == "present":
        return {"name": name, "present_match": True}
    return {"name": name, "string_match": string_matcher(match)}


def _query_matcher(item: NamedMatch) -> dict[str, Any]:
    if item.match.kind == "present":
        return {"name": item.name, "present_match": True}
    return {"name": item.name, "string_match": string_matcher(item.match)}


# -- forwarding -----------------------------------------------------------------------------


def _forward(
    route: Route, action: Forward, entry: RequestMatch | None, clusters: Mapping[str, Cluster]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    destinations = action.destinations
    if len(destinations) == 1 and destinations[0].headers is None:
        result["cluster"] = destinations[0].cluster
    else:
        result["weighted_clusters"] = {
            "clusters": [_weighted_cluster(item) for item in destinations]
        }
    rewrite = route.rewrite
    if rewrite is not None and rewrite.uri is not None:
        matched = entry.uri.kind if entry is not None and entry.uri is not None else None
        if matched == "prefix":
            result["prefix_rewrite"] = rewrite.uri  # the prefix matched, swapped
        else:
            result["path_rewrite"] = header_value(rewrite.uri)  # the whole path, query kept
    if rewrite is not None and rewrite.authority is not None:
        result["host_rewrite_literal"] = rewrite.authority
    timeout = route.timeout.duration if route.timeout is not None else None
    result["timeout"] = duration(timeout) if timeout is not None else "0s"
    retries = route.retries
    if retries is not None and retries.attempts > 0:
        policy: dict[str, Any] = {
            "retry_on": ",".join(retries.retry_on),
            "num_retries": retries.attempts,
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": typed(
                        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    ),
                }
            ],
            "host_selection_retry_max_attempts": _HOST_SELECTION_RETRY_ATTEMPTS,
        }
        if retries.per_try_timeout is not None:
            policy["per_try_timeout"] = duration(retries.per_try_timeout)
        if retries.retriable_status_codes:
            policy["retriable_status_codes"] = list(retries.retriable_status_codes)
        result["retry_policy"] = policy
    if route.mirror is not None:
        result["request_mirror_policies"] = [
            {
                "cluster": route.mirror.cluster,
                "runtime_fraction": runtime_fraction(route.mirror.percentage),
            }
        ]
    hash_policy = _hash_policy(destinations, clusters)
    if hash_policy:
        result["hash_policy"] = hash_policy
    return result


def _weighted_cluster(destination: WeightedDestination) -> dict[str, Any]:
    result: dict[str, Any] = {"name": destination.cluster, "weight": destination.weight}
    if destination.headers is not None:
        result.update(_header_operations(destination.headers))
    return result


def _hash_policy(
    destinations: Iterable[WeightedDestination], clusters: Mapping[str, Cluster]
) -> list[dict[str, Any]]:
    """What a consistent-hash cluster hashes on; a route splitting between clusters
    that hash differently gives each its key (Envoy combines them)."""
    policies: list[dict[str, Any]] = []
    for destination in destinations:
        cluster = clusters.get(destination.cluster)
        if cluster is None or cluster.load_balancer.policy != "CONSISTENT_HASH":
            continue
        balancer = cluster.load_balancer
        if balancer.hash_header is not None:
            policy: dict[str, Any] = {"header": {"header_name": balancer.hash_header}}
        else:
            policy = {"connection_properties": {"source_ip": True}}
        if policy not in policies:
            policies.append(policy)
    return policies


def _header_operations(operations: HeaderOperations) -> dict[str, Any]:
    result: dict[str, Any] = {}
    request, response = operations.request, operations.response
    if request.set or request.add:
        result["request_headers_to_add"] = header_value_options(request)
    if request.remove:
        result["request_headers_to_remove"] = list(request.remove)
    if response.set or response.add:
        result["response_headers_to_add"] = header_value_options(response)
    if response.remove:
        result["response_headers_to_remove"] = list(response.remove)
    return result


# -- answering without an upstream ----------------------------------------------------------


def _redirect(action: Redirect) -> dict[str, Any]:
    result: dict[str, Any] = {"response_code": _REDIRECT_CODES[action.code]}
    if action.uri is not None:
        result["path_redirect"] = action.uri
    if action.authority is not None:
        result["host_redirect"] = action.authority
    if action.port is not None:
        result["port_redirect"] = action.port
    if action.scheme is not None:
        result["scheme_redirect"] = action.scheme
    return result


def _fault(fault: Fault) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if fault.delay is not None:
        config["delay"] = {
            "fixed_delay": duration(fault.delay.fixed_delay),
            "percentage": fraction(fault.delay.percentage),
        }
    if fault.abort is not None:
        config["abort"] = {
            "http_status": fault.abort.http_status,
            "percentage": fraction(fault.abort.percentage),
        }
    return typed(FAULT_FILTER_CONFIG, **config)


# -- route configurations -------------------------------------------------------------------


def route_configuration(
    name: str, virtual_hosts: list[dict[str, Any]], source: Source
) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": virtual_hosts,
        "metadata": metadata(source),
    }


def inbound_virtual_host(inbound: Inbound, app_cluster: str) -> dict[str, Any]:
    """A sidecar's inbound: every request to the app (the caller's sidecar holds the
    route's timeout and retries, so none here)."""
    return {
        "name": "inbound",
        "domains": ["*"],
        "routes": [
            {
                "name": str(inbound.source),
                "match": {"prefix": "/"},
                "route": {"cluster": app_cluster, "timeout": "0s"},
                "metadata": metadata(inbound.source),
            }
        ],
        "metadata": metadata(inbound.source),
    }


def outbound_virtual_hosts(
    services: Iterable[OutboundService], clusters: Mapping[str, Cluster]
) -> list[dict[str, Any]]:
    """A virtual host per Service a sidecar may call, named by the ``Host`` of a call:
    ``users-service``, ``users-service:80``, ``users-service.<namespace>.svc[...]``
    (any name that begins ``users-service.``); a Service without HTTP routes has none."""
    virtual_hosts = []
    for service in services:
        routes = [item for route in service.routes for item in envoy_routes(route, clusters)]
        if not routes:
            continue
        domains = [service.service]
        domains.extend(f"{service.service}:{port.number}" for port in service.ports)
        domains.append(f"{service.service}.*")
        virtual_hosts.append(
            {
                "name": service.service,
                "domains": domains,
                "routes": routes,
                "metadata": metadata(service.source),
            }
        )
    return virtual_hosts


def gateway_virtual_hosts(
    listener: GatewayListener, clusters: Mapping[str, Cluster]
) -> list[dict[str, Any]]:
    """The virtual hosts of a gateway port: each server's, its most specific host
    first; a host no VirtualService routes answers the server's 404, a host no server
    has the port's 404. A domain two servers share goes to the more specific server
    (the one the view gives the request to)."""
    taken: set[str] = set()
    virtual_hosts: list[dict[str, Any]] = []

    def claim(domains: Iterable[str]) -> list[str]:
        # A domain is the most specific server's, as the view chooses the server.
        free = [domain for domain in domains if domain not in taken]
        taken.update(free)
        return free

    servers = sorted(
        listener.servers,
        key=lambda server: tuple(-n for n in max(map(host_specificity, server.hosts))),
    )
    for server in servers:
        require_tls = server.https_redirect is not None
        for virtual_host in server.virtual_hosts:
            domains = claim(virtual_host.domains)
            if not domains:
                continue
            routes = [
                item for route in virtual_host.routes for item in envoy_routes(route, clusters)
            ]
            virtual_hosts.append(
                _gateway_virtual_host(
                    f"{virtual_host.source.name} {','.join(domains)}",
                    domains,
                    routes,
                    virtual_host.source,
                    server,
                    require_tls,
                )
            )
        domains = claim(server.hosts)
        if domains:
            virtual_hosts.append(
                _gateway_virtual_host(
                    f"{server.source} not found",
                    domains,
                    [_direct(server.not_found)],
                    server.not_found.source,
                    server,
                    require_tls,
                )
            )
    if "*" not in taken:
        virtual_hosts.append(
            {
                "name": f"port {listener.port} not found",
                "domains": ["*"],
                "routes": [_direct(listener.not_found)],
                "metadata": metadata(listener.not_found.source, reason=listener.not_found.reason),
            }
        )
    return virtual_hosts


def _gateway_virtual_host(
    name: str,
    domains: list[str],
    routes: list[dict[str, Any]],
    source: Source,
    server: GatewayServer,
    require_tls: bool,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": name,
        "domains": domains,
        "routes": routes,
        "metadata": metadata(source, server=str(server.source)),
    }
    if require_tls:
        # tls.httpsRedirect: a 301 to the same URL in https, whatever the route.
        result["require_tls"] = "ALL"
        assert server.https_redirect is not None
        result["metadata"]["filter_metadata"]["tessera"]["https_redirect"] = str(
            server.https_redirect.source
        )
    return result


def _direct(response: DirectResponse) -> dict[str, Any]:
    return {
        "name": str(response.source),
        "match": {"prefix": "/"},
        "direct_response": {"status": response.status},
        "metadata": metadata(response.source, reason=response.reason),
    }
