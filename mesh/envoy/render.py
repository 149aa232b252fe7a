"""A compiled view in, the proxy's Envoy resources out: pure, deterministic, whole.

::

    resources = render_sidecar(view, SidecarAddresses(
        inbound=HostPort("10.0.0.5", 8443),     # the catalog's address of the instance
        app=HostPort("127.0.0.1", 8080),        # the app behind the sidecar
        outbound=HostPort("127.0.0.1", 15001),  # where the app sends its calls
    ))
    resources = render_gateway(view, host="0.0.0.0", port_offset=10000)

Both give a :class:`~mesh.envoy.resources.Resources`: listeners, route configurations,
clusters and cluster load assignments, each a dict in Envoy's proto3 JSON with its
``@type``, for the xDS server to turn into ``Any`` (``json_format.ParseDict``) and serve
over ADS. TLS material is never inline: certificates and trust come over SDS from the
same agent (:mod:`mesh.envoy.resources` names the secrets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from mesh import defaults
from mesh.envoy.clusters import HTTP_PROTOCOLS, load_assignment, local_cluster, upstream_cluster
from mesh.envoy.listeners import (
    INBOUND,
    OUTBOUND,
    fault_filter,
    gateway_listener,
    gateway_name,
    inbound_listener,
    outbound_listener,
)
from mesh.envoy.policies import (
    identity_header_filter,
    jwt_filter,
    rate_limit_filter,
    rbac_filters,
)
from mesh.envoy.resources import Resources
from mesh.envoy.routes import (
    gateway_virtual_hosts,
    has_fault,
    inbound_virtual_host,
    outbound_virtual_hosts,
    route_configuration,
)
from mesh.envoy.tracing import otlp_cluster, tracing
from mesh.envoy.values import duration
from mesh.proxy import GatewayProxy, SidecarProxy
from mesh.view import Cluster, Source, View
from sdk.address import HostPort

__all__ = [
    "DEFAULT_TRUSTED_CA",
    "RenderOptions",
    "SidecarAddresses",
    "app_cluster_name",
    "render_gateway",
    "render_sidecar",
]

DEFAULT_TRUSTED_CA: Final = "/etc/ssl/certs/ca-certificates.crt"
"""Debian's bundle of public CAs: what a remote JWKS's certificate is checked against."""


@dataclass(frozen=True)
class SidecarAddresses:
    """Where a sidecar listens and where its app is.

    ``inbound`` is the instance's address in the catalog (what other sidecars call,
    over mTLS); ``app`` the app behind the sidecar (plain HTTP, usually loopback);
    ``outbound`` where the app sends its calls to other Services (plain HTTP; keep it
    on loopback: whoever reaches it calls with the sidecar's identity), or None for a
    sidecar that only serves callers (no outbound listener, no upstream clusters).
    """

    inbound: HostPort
    app: HostPort
    outbound: HostPort | None = None


@dataclass(frozen=True)
class RenderOptions:
    """What a render needs besides the view.

    - ``access_log``: the file each listener writes a JSON line per request to
      (``/dev/stdout`` by default; None: no access log);
    - ``jwt_bundles``: per trust domain, its JWT bundle as a JWK Set in JSON, for the
      ``jwtRules`` that accept its JWT-SVIDs (the agent's bundles);
    - ``trusted_ca``: the CA file a remote ``jwksUri``'s certificate is checked against;
    - ``max_callers``: per-caller rate limit buckets kept per RateLimit (the least
      recently seen caller's is dropped beyond it);
    - ``otlp_endpoint``: an OTLP/gRPC collector every connection manager sends its
      spans to (Envoy's OpenTelemetry tracer, as the sidecar's Service or the gateway's
      SPIFFE ID), or None: no tracing.
    """

    access_log: str | None = "/dev/stdout"
    jwt_bundles: Mapping[str, str] = field(default_factory=dict, hash=False)
    trusted_ca: str = DEFAULT_TRUSTED_CA
    max_callers: int = 1024
    otlp_endpoint: HostPort | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "jwt_bundles", MappingProxyType(dict(self.jwt_bundles)))
        if self.max_callers < 1:
            raise ValueError(f"max_callers must be at least 1, not {self.max_callers}")


def app_cluster_name(service: str, port: int) -> str:
    """The cluster of the app behind a sidecar: ``inbound|8080||orders`` (Istio's)."""
    return f"inbound|{port}||{service}"


def render_sidecar(
    view: View, addresses: SidecarAddresses, options: RenderOptions | None = None
) -> Resources:
    """The Envoy resources of a sidecar's view: inbound and outbound listeners, their
    routes, the app's cluster and one per view cluster, with their endpoints."""
    if not isinstance(view.proxy, SidecarProxy) or view.inbound is None:
        raise ValueError(f"render_sidecar takes a sidecar's view, not a {view.proxy.KIND}'s")
    options = options or RenderOptions()
    problems: list[str] = []
    inbound = view.inbound
    spiffe_id = view.proxy.spiffe_id
    clusters = _by_name(view.clusters)

    listeners = []
    route_configurations = []
    envoy_clusters: list[dict[str, Any]] = []

    http_ports = [port for port in inbound.ports if port.protocol in HTTP_PROTOCOLS]
    traced = tracing(options.otlp_endpoint, service_name=inbound.service)
    jwt, jwks_clusters = jwt_filter(
        view.jwt_rules,
        jwt_bundles=options.jwt_bundles,
        trusted_ca=options.trusted_ca,
        problems=problems,
    )
    if http_ports:
        port = http_ports[0]
        app_cluster = app_cluster_name(inbound.service, port.number)
        if len(http_ports) > 1 or len(inbound.ports) > 1:
            problems.append(
                f"Service {inbound.service} has several ports; its sidecar's inbound "
                f"listener sends every request to the app at {addresses.app} "
                f"(port {port.number}'s protocol, {port.protocol})"
            )
        filters = [identity_header_filter()]
        if jwt is not None:
            filters.append(jwt)
        filters.extend(rbac_filters(view.authorization))
        if inbound.rate_limits:
            filters.append(rate_limit_filter(inbound.rate_limits, max_callers=options.max_callers))
        listeners.append(
            inbound_listener(
                addresses.inbound,
                spiffe_id,
                filters,
                inbound.source,
                access_log=options.access_log,
                tracing=traced,
            )
        )
        route_configurations.append(
            route_configuration(
                INBOUND, [inbound_virtual_host(inbound, app_cluster)], inbound.source
            )
        )
        envoy_clusters.append(
            local_cluster(
                app_cluster,
                addresses.app,
                port.protocol,
                port.source,
                connect_timeout=duration(defaults.CONNECT_TIMEOUT),
            )
        )
    else:
        problems.append(
            f"Service {inbound.service} has no HTTP port: its sidecar has no inbound listener"
        )

    if addresses.outbound is not None:
        routes = [route for service in view.outbound for route in service.routes]
        outbound_source = Source("sidecar", inbound.service, "outbound")
        listeners.append(
            outbound_listener(
                addresses.outbound,
                [fault_filter()] if has_fault(routes) else [],
                outbound_source,
                access_log=options.access_log,
                tracing=traced,
            )
        )
        route_configurations.append(
            route_configuration(
                OUTBOUND, outbound_virtual_hosts(view.outbound, clusters), outbound_source
            )
        )
        envoy_clusters.extend(upstream_cluster(cluster, spiffe_id) for cluster in view.clusters)
    envoy_clusters.extend(jwks_clusters)
    if options.otlp_endpoint is not None:
        envoy_clusters.append(otlp_cluster(options.otlp_endpoint))
    return _resources(
        view,
        listeners,
        route_configurations,
        envoy_clusters,
        problems,
        with_endpoints=addresses.outbound is not None,
    )


def render_gateway(
    view: View,
    *,
    host: str,
    port_offset: int = 0,
    options: RenderOptions | None = None,
) -> Resources:
    """The Envoy resources of a gateway's view: a listener per Gateway port (on
    ``host``, at the port plus ``port_offset``), its routes, and the clusters its
    routes send to, with their endpoints."""
    if not isinstance(view.proxy, GatewayProxy):
        raise ValueError(f"render_gateway takes a gateway's view, not a {view.proxy.KIND}'s")
    options = options or RenderOptions()
    problems: list[str] = []
    clusters = _by_name(view.clusters)
    jwt, jwks_clusters = jwt_filter(
        view.jwt_rules,
        jwt_bundles=options.jwt_bundles,
        trusted_ca=options.trusted_ca,
        problems=problems,
    )
    traced = tracing(options.otlp_endpoint, service_name=view.proxy.spiffe_id)
    listeners = []
    route_configurations = []
    for listener in view.gateway_listeners:
        if not 0 < listener.port + port_offset <= 65535:
            problems.append(
                f"{listener.source}: port {listener.port} plus the gateway's port offset "
                f"{port_offset} is {listener.port + port_offset}, outside 1-65535: the "
                "gateway does not listen for it (run it with another --port-offset)"
            )
            continue
        routes = [
            route
            for server in listener.servers
            for virtual_host in server.virtual_hosts
            for route in virtual_host.routes
        ]
        filters = [jwt] if jwt is not None else []
        filters.extend(rbac_filters(view.authorization))
        if has_fault(routes):
            filters.append(fault_filter())
        listeners.append(
            gateway_listener(
                listener,
                host,
                port_offset,
                filters,
                problems,
                access_log=options.access_log,
                tracing=traced,
            )
        )
        route_configurations.append(
            route_configuration(
                gateway_name(listener.port),
                gateway_virtual_hosts(listener, clusters),
                listener.source,
            )
        )
    envoy_clusters = [upstream_cluster(cluster, view.proxy.spiffe_id) for cluster in view.clusters]
    envoy_clusters.extend(jwks_clusters)
    if options.otlp_endpoint is not None:
        envoy_clusters.append(otlp_cluster(options.otlp_endpoint))
    return _resources(view, listeners, route_configurations, envoy_clusters, problems)


def _by_name(clusters: tuple[Cluster, ...]) -> dict[str, Cluster]:
    return {cluster.name: cluster for cluster in clusters}


def _resources(
    view: View,
    listeners: list[dict[str, Any]],
    route_configurations: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    problems: list[str],
    *,
    with_endpoints: bool = True,
) -> Resources:
    assignments = (
        [load_assignment(endpoints, problems) for endpoints in view.endpoints]
        if with_endpoints
        else []
    )
    return Resources(
        listeners=tuple(listeners),
        route_configurations=tuple(route_configurations),
        clusters=tuple(clusters),
        cluster_load_assignments=tuple(assignments),
        problems=tuple(problems),
    )
