"""Spans over OTLP: Envoy's OpenTelemetry tracer in every connection manager.

When the agent is given a collector (its ``otlp_endpoint`` setting, ``HOST:PORT`` of an
OTLP/gRPC receiver), each connection manager gets the tracer and each render a cluster
to the collector; without one, a render has no tracing at all::

    tracing(HostPort("10.0.0.9", 4317), service_name="orders")
    # {"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {...
    #   "grpc_service": {"envoy_grpc": {"cluster_name": "tessera_otlp"}, ...},
    #   "service_name": "orders"}}}
    otlp_cluster(HostPort("10.0.0.9", 4317))     # the cluster "tessera_otlp", HTTP/2

Envoy's OpenTelemetry tracer reads and writes W3C trace context: a request carrying a
``traceparent`` continues its trace (and its sampling decision), one without starts a
trace, and the request Envoy sends on carries a ``traceparent`` naming Envoy's span.
Envoy sends its spans in batches (every 5 seconds, or 5 spans, by default).
"""

from __future__ import annotations

from typing import Any, Final

from mesh.envoy.values import metadata, socket_address, typed
from mesh.view import Source
from sdk.address import HostPort

__all__ = ["OTLP_CLUSTER", "OTLP_SOURCE", "otlp_cluster", "tracing"]

OTLP_CLUSTER: Final = "tessera_otlp"
"""The cluster the spans go through: the agent's ``otlp_endpoint``."""
OTLP_SOURCE: Final = Source("agent", "otlp_endpoint")
"""Where the collector's cluster comes from: the agent's setting, not a resource."""

_EXPORT_TIMEOUT: Final = "5s"
_CONNECT_TIMEOUT: Final = "5s"
_HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def tracing(endpoint: HostPort | None, *, service_name: str) -> dict[str, Any] | None:
    """A connection manager's ``tracing``: the OpenTelemetry tracer exporting to
    :data:`OTLP_CLUSTER` as ``service_name``; None without an ``endpoint``."""
    if endpoint is None:
        return None
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={
                    "envoy_grpc": {"cluster_name": OTLP_CLUSTER},
                    "timeout": _EXPORT_TIMEOUT,
                },
                service_name=service_name,
            ),
        }
    }


def otlp_cluster(endpoint: HostPort) -> dict[str, Any]:
    """The cluster to the collector at ``endpoint``: gRPC (HTTP/2, plaintext), its
    address as given or its name resolved (IPv4 first)."""
    cluster: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": OTLP_CLUSTER,
        "type": "STATIC" if endpoint.is_ip else "STRICT_DNS",
        "connect_timeout": _CONNECT_TIMEOUT,
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: typed(_HTTP_OPTIONS, explicit_http_config={"http2_protocol_options": {}})
        },
        "load_assignment": {
            "cluster_name": OTLP_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(endpoint.host, endpoint.port)}}
                    ]
                }
            ],
        },
        "metadata": metadata(OTLP_SOURCE),
    }
    if not endpoint.is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster
