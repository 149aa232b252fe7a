"""A view's clusters and endpoints as Envoy's ``Cluster`` and ``ClusterLoadAssignment``.

Each of the view's clusters (a Service, port and subset, named as Istio names them:
``outbound|9080|v1|reviews``) is an EDS cluster whose endpoints come over the same ADS
stream, so a change in the catalog sends endpoints only::

    upstream_cluster(cluster, own_spiffe_id)
    # {"name": "outbound|9080|v1|reviews", "type": "EDS", "lb_policy": "LEAST_REQUEST",
    #  "circuit_breakers": {...}, "outlier_detection": {...}, "transport_socket": {...mTLS...}}
    load_assignment(endpoints)      # the healthy instances (and unknown, when unchecked)

Calls upstream are mTLS: the proxy presents its own SVID (SDS, named by its SPIFFE ID)
and accepts only a peer whose certificate carries one of the Service's SPIFFE IDs,
checked by Envoy's SPIFFE validator against every trust domain's bundle (SDS ``ALL``).
HTTP/1.1 or HTTP/2 is what ALPN settles with the peer's sidecar.

Limits a DestinationRule leaves out are Istio's "no limit", 2^32 - 1, not Envoy's own
defaults (1,024 connections, pending and active requests, 3 retries).
"""

from __future__ import annotations

from typing import Any, Final

from mesh import defaults
from mesh.envoy.resources import ALL_SECRET, identity_secret
from mesh.envoy.values import ADS, duration, metadata, socket_address, typed
from mesh.view import Cluster, ClusterEndpoints, ConnectionPool, OutlierDetection, Source
from sdk.address import HostPort

__all__ = [
    "HTTP_PROTOCOLS",
    "UNLIMITED",
    "load_assignment",
    "local_cluster",
    "sds_secret",
    "upstream_cluster",
]

UNLIMITED: Final = 2**32 - 1
"""Istio's "no limit" for a circuit breaker threshold."""

HTTP_PROTOCOLS: Final = frozenset({"HTTP", "HTTP2", "GRPC"})

_TLS_MIN = "TLSv1_2"
_LB_POLICIES = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "RANDOM": "RANDOM",
    "CONSISTENT_HASH": "RING_HASH",
}
_HEALTH = {"healthy": "HEALTHY", "unknown": "UNKNOWN", "unhealthy": "UNHEALTHY"}
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_FULL_PERCENT = 100


def sds_secret(name: str) -> dict[str, Any]:
    """An SDS secret the agent serves over ADS: ``{"name": ..., "sds_config": ads}``."""
    return {"name": name, "sds_config": dict(ADS)}


def upstream_cluster(cluster: Cluster, spiffe_id: str) -> dict[str, Any]:
    """The Envoy cluster of one view cluster, for a proxy whose SVID is ``spiffe_id``."""
    pool = cluster.connection_pool
    result: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": cluster.name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": dict(ADS), "service_name": cluster.name},
        "connect_timeout": duration(pool.connect_timeout),
        "lb_policy": _LB_POLICIES[cluster.load_balancer.policy],
        "circuit_breakers": {"thresholds": [_thresholds(pool)]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _upstream_tls(cluster, spiffe_id),
        },
        "metadata": metadata(
            cluster.source,
            service=cluster.service,
            port=str(cluster.port),
            subset=cluster.subset,
            load_balancer=str(cluster.load_balancer.source),
            connection_pool=str(pool.source),
            outlier_detection=str(cluster.outlier_detection.source)
            if cluster.outlier_detection is not None
            else None,
            peer_identities=str(cluster.peer_identities.source),
        ),
    }
    if cluster.protocol in HTTP_PROTOCOLS:
        result["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: typed(
                _HTTP_OPTIONS,
                common_http_protocol_options=_common_http_options(pool),
                auto_config={"http_protocol_options": {}, "http2_protocol_options": {}},
            )
        }
    if cluster.outlier_detection is not None:
        result["outlier_detection"] = _outlier_detection(cluster.outlier_detection)
    return result


def _thresholds(pool: ConnectionPool) -> dict[str, Any]:
    def limit(value: int | None) -> int:
        return value if value is not None else UNLIMITED

    thresholds: dict[str, Any] = {
        "priority": "DEFAULT",
        "max_connections": limit(pool.max_connections),
        "max_pending_requests": limit(pool.http1_max_pending_requests),
        "max_requests": limit(pool.http2_max_requests),
    }
    if pool.max_retries is not None:
        thresholds["max_retries"] = pool.max_retries
    else:  # a budget, which Envoy then uses in place of a fixed count
        thresholds["retry_budget"] = {
            "budget_percent": {"value": defaults.RETRY_BUDGET_PERCENT},
            "min_retry_concurrency": defaults.RETRY_BUDGET_MIN_RETRIES,
        }
    return thresholds


def _common_http_options(pool: ConnectionPool) -> dict[str, Any]:
    options: dict[str, Any] = {"idle_timeout": duration(pool.idle_timeout)}
    if pool.max_requests_per_connection is not None:
        options["max_requests_per_connection"] = pool.max_requests_per_connection
    return options


def _outlier_detection(settings: OutlierDetection) -> dict[str, Any]:
    result: dict[str, Any] = {
        "interval": duration(settings.interval),
        "base_ejection_time": duration(settings.base_ejection_time),
        "max_ejection_percent": settings.max_ejection_percent,
        # Only the consecutive-error checks the DestinationRule asks for eject (Envoy
        # would also judge success rates, which Istio turns off).
        "enforcing_success_rate": 0,
    }
    if settings.consecutive_5xx_errors is not None:
        result["consecutive_5xx"] = settings.consecutive_5xx_errors
        result["enforcing_consecutive_5xx"] = _FULL_PERCENT
    else:
        result["enforcing_consecutive_5xx"] = 0
    if settings.consecutive_gateway_errors is not None:
        result["consecutive_gateway_failure"] = settings.consecutive_gateway_errors
        result["enforcing_consecutive_gateway_failure"] = _FULL_PERCENT
    else:
        result["enforcing_consecutive_gateway_failure"] = 0
    return result


def _upstream_tls(cluster: Cluster, spiffe_id: str) -> dict[str, Any]:
    identities = cluster.peer_identities.spiffe_ids
    return typed(
        _UPSTREAM_TLS,
        common_tls_context={
            "tls_params": {"tls_minimum_protocol_version": _TLS_MIN},
            "tls_certificate_sds_secret_configs": [sds_secret(identity_secret(spiffe_id))],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": identity}}
                        for identity in identities
                    ]
                },
                "validation_context_sds_secret_config": sds_secret(ALL_SECRET),
            },
        },
    )


def load_assignment(endpoints: ClusterEndpoints, problems: list[str]) -> dict[str, Any]:
    """The ``ClusterLoadAssignment`` of a view cluster: its routable instances.

    EDS takes IP addresses only; an instance registered with a host name is left out,
    and said so in ``problems``.
    """
    lb_endpoints = []
    for endpoint in endpoints.endpoints:
        if not endpoint.address.is_ip:
            problems.append(
                f"cluster {endpoints.cluster}: instance {endpoint.address} "
                f"({endpoint.source}) is left out: Envoy's endpoints are IP addresses, "
                "register the instance with one"
            )
            continue
        lb_endpoints.append(
            {
                "endpoint": {
                    "address": socket_address(endpoint.address.host, endpoint.address.port)
                },
                "health_status": _HEALTH[endpoint.health],
                "metadata": metadata(
                    endpoint.source, spiffe_id=endpoint.spiffe_id, node=endpoint.node
                ),
            }
        )
    return {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": endpoints.cluster,
        "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
    }


def local_cluster(
    name: str, address: HostPort, protocol: str, source: Source, *, connect_timeout: str
) -> dict[str, Any]:
    """A plaintext cluster to one address on the proxy's host (the app behind a
    sidecar): static for an IP, resolved for a name such as ``localhost``."""
    result: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC" if address.is_ip else "STRICT_DNS",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(address.host, address.port)}}
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": UNLIMITED,
                    "max_pending_requests": UNLIMITED,
                    "max_requests": UNLIMITED,
                    "max_retries": UNLIMITED,
                }
            ]
        },
        "metadata": metadata(source),
    }
    if protocol in ("HTTP2", "GRPC"):
        result["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: typed(_HTTP_OPTIONS, explicit_http_config={"http2_protocol_options": {}})
        }
    return result
