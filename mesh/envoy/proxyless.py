"""A view for gRPC's own xDS client (proxyless gRPC): what an ``xds:///`` target resolves to.

A gRPC channel to ``xds:///users-service`` asks its xDS server for the Listener
``users-service``, finds the route configuration in it, the cluster the route picks and
that cluster's endpoints, and balances its calls over them itself — no proxy in between.
This renders a sidecar's outbound view (every Service it may call) for such a client::

    resources = render_proxyless(view, certificate_provider="tessera")
    resources.named(LISTENER, "users-service")      # api_listener, routes inline
    resources.named(CLUSTER, "outbound|50051||users-service")

Per Service with HTTP routes, a Listener named as the Service (``xds:///users-service``)
and one per port (``xds:///users-service:50051``), each an ``api_listener`` whose
connection manager holds its routes inline (gRPC reads them as it reads RDS); the
clusters and endpoints are the sidecar's (:mod:`mesh.envoy.clusters`), spelled the way
gRPC's client accepts them (gRFCs A27, A28, A29):

- **endpoints** in one locality of weight 1 (gRPC ignores a locality without a weight);
- **load balancing**: ``ROUND_ROBIN`` and ``RING_HASH`` (``consistentHash``) as given;
  gRPC refuses a cluster with any other ``lb_policy`` (``LEAST_REQUEST``, Tessera's
  default, and ``RANDOM``), so those become ``ROUND_ROBIN`` (said in ``problems`` when a
  DestinationRule asked for them);
- **upstream mTLS** (gRFC A29): the certificate and trust come from the *certificate
  provider instance* ``certificate_provider`` of the client's bootstrap (a
  ``file_watcher`` over the files ``tessera sidecar files`` writes), not over SDS, which
  gRPC does not speak; the peer must present one of the Service's SPIFFE IDs. The client
  must use ``XdsCredentials`` for this to apply (with insecure credentials gRPC ignores
  it and dials in plaintext, which a sidecar's inbound refuses).

What gRPC does not do is left to it: a route's redirect or direct response, mirrors,
header changes and URI rewrites are ignored by gRPC; timeouts are the caller's deadline
(gRPC reads ``max_stream_duration``, not the route's ``timeout``); retries honour the gRPC
status codes among ``retryOn`` (``unavailable``, ``cancelled``, ``deadline-exceeded``,
``internal``, ``resource-exhausted``).
"""

from __future__ import annotations

from typing import Any, Final

from mesh.envoy.clusters import load_assignment, upstream_cluster
from mesh.envoy.listeners import fault_filter
from mesh.envoy.policies import http_filter
from mesh.envoy.resources import Resources
from mesh.envoy.routes import has_fault, outbound_virtual_hosts, route_configuration
from mesh.envoy.values import metadata, typed
from mesh.proxy import SidecarProxy
from mesh.view import Cluster, OutboundService, View

__all__ = ["DEFAULT_CERTIFICATE_PROVIDER", "proxyless_listener_names", "render_proxyless"]

DEFAULT_CERTIFICATE_PROVIDER: Final = "tessera"
"""The ``certificate_providers`` key of a gRPC bootstrap the clusters' mTLS names."""

_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_GRPC_LB_POLICIES: Final = frozenset({"ROUND_ROBIN", "RING_HASH"})
_FALLBACK_LB: Final = "ROUND_ROBIN"


def proxyless_listener_names(service: OutboundService) -> list[str]:
    """The targets a gRPC client may dial a Service by: ``users-service`` and
    ``users-service:PORT`` for each of its ports."""
    return [service.service, *(f"{service.service}:{port.number}" for port in service.ports)]


def render_proxyless(
    view: View, *, certificate_provider: str | None = DEFAULT_CERTIFICATE_PROVIDER
) -> Resources:
    """The xDS resources of a proxyless gRPC client whose view is ``view`` (a sidecar's:
    the Services it may call). ``certificate_provider`` None: clusters without mTLS."""
    if not isinstance(view.proxy, SidecarProxy):
        raise ValueError(f"render_proxyless takes a sidecar's view, not a {view.proxy.KIND}'s")
    problems: list[str] = []
    clusters = {cluster.name: cluster for cluster in view.clusters}
    listeners = []
    for service in view.outbound:
        virtual_hosts = outbound_virtual_hosts([service], clusters)
        if not virtual_hosts:
            continue  # no HTTP port: nothing gRPC could call
        filters = [fault_filter()] if has_fault(service.routes) else []
        for name in proxyless_listener_names(service):
            routes = route_configuration(name, virtual_hosts, service.source)
            del routes["@type"]  # inline in the connection manager
            listeners.append(_api_listener(name, routes, filters, service))
    grpc_clusters = [
        _grpc_cluster(cluster, view.proxy.spiffe_id, certificate_provider, problems)
        for cluster in view.clusters
    ]
    assignments = [
        _weighted_locality(load_assignment(endpoints, problems)) for endpoints in view.endpoints
    ]
    return Resources(
        listeners=tuple(listeners),
        route_configurations=(),
        clusters=tuple(grpc_clusters),
        cluster_load_assignments=tuple(assignments),
        problems=tuple(problems),
    )


def _api_listener(
    name: str, routes: dict[str, Any], filters: list[dict[str, Any]], service: OutboundService
) -> dict[str, Any]:
    router = http_filter(
        "envoy.filters.http.router", typed("envoy.extensions.filters.http.router.v3.Router")
    )
    manager = typed(_HCM, stat_prefix=name, route_config=routes, http_filters=[*filters, router])
    return {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "api_listener": {"api_listener": manager},
        "metadata": metadata(service.source),
    }


def _grpc_cluster(
    cluster: Cluster, spiffe_id: str, provider: str | None, problems: list[str]
) -> dict[str, Any]:
    result = upstream_cluster(cluster, spiffe_id)
    if result["lb_policy"] not in _GRPC_LB_POLICIES:
        if cluster.load_balancer.source.kind != "default":  # a DestinationRule asked for it
            problems.append(
                f"cluster {cluster.name}: gRPC's xDS clients take no "
                f"{cluster.load_balancer.policy} load balancer "
                f"({cluster.load_balancer.source}); they balance ROUND_ROBIN"
            )
        result["lb_policy"] = _FALLBACK_LB
    if provider is None:
        del result["transport_socket"]
    else:
        result["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _upstream_tls(cluster, provider),
        }
    return result


def _upstream_tls(cluster: Cluster, provider: str) -> dict[str, Any]:
    """gRFC A29's UpstreamTlsContext: certificate and trust from the bootstrap's
    certificate provider, the peer's SPIFFE ID checked against the Service's."""
    instance = {"instance_name": provider}
    return typed(
        _UPSTREAM_TLS,
        common_tls_context={
            "tls_certificate_provider_instance": instance,
            "validation_context": {
                "ca_certificate_provider_instance": instance,
                "match_subject_alt_names": [
                    {"exact": identity} for identity in cluster.peer_identities.spiffe_ids
                ],
            },
        },
    )


def _weighted_locality(assignment: dict[str, Any]) -> dict[str, Any]:
    """gRPC ignores a locality without a weight: the endpoints in one of weight 1."""
    for locality in assignment["endpoints"]:
        locality["locality"] = {}
        locality["load_balancing_weight"] = 1
    return assignment
