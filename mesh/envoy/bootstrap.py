"""The bootstrap a proxy's Envoy starts from: who it is, and the agent to ask for the rest.

Everything else — listeners, routes, clusters, endpoints, certificates — comes over one
ADS stream from the agent of the node, on its Unix socket::

    bootstrap = build_bootstrap(
        node_id="sidecar~orders~10.0.3.1",
        node_cluster="orders",
        agent_socket="/run/tessera/agent.sock",
        admin_port=15000,
        metadata={"tessera.proxy": "sidecar"},
    )
    Path("envoy.json").write_text(json.dumps(bootstrap))   # envoy -c envoy.json

The runtime sets ``re2.max_program_size.error_level`` to
:data:`mesh.regex.MAX_PROGRAM_SIZE`, so Envoy refuses exactly the regular expressions
Tessera refuses at apply time (Envoy's own limit, 100, is smaller than everyday
expressions). Envoy's admin interface listens on loopback only: it can change what
the proxy does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from mesh.envoy.resources import XDS_CLUSTER
from mesh.envoy.values import ADS, typed
from mesh.regex import MAX_PROGRAM_SIZE

__all__ = [
    "ADMIN_HOST",
    "DEFAULT_MAX_CONNECTIONS",
    "build_bootstrap",
]

ADMIN_HOST: Final = "127.0.0.1"
DEFAULT_MAX_CONNECTIONS: Final = 50_000
"""Downstream connections a proxy accepts at once, over all its listeners."""
_XDS_CONNECT_TIMEOUT: Final = "1s"


def build_bootstrap(
    *,
    node_id: str,
    node_cluster: str,
    agent_socket: str,
    admin_port: int,
    metadata: Mapping[str, str] | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> dict[str, Any]:
    """An Envoy v3 ``Bootstrap`` (JSON-ready): the node, the ``tessera_agent`` cluster
    (HTTP/2 on the agent's Unix socket ``agent_socket``), ADS for listeners and
    clusters, admin on ``127.0.0.1:admin_port`` (0: any free port), and the runtime."""
    if not node_id or not node_cluster:
        raise ValueError("a bootstrap needs a node id and a node cluster (neither empty)")
    if not agent_socket.startswith("/") and not agent_socket.startswith("@"):
        raise ValueError(
            f"the agent socket {agent_socket!r} must be an absolute path (or @name for "
            "an abstract socket): Envoy resolves it from its own working directory"
        )
    if not 0 <= admin_port <= 65535:
        raise ValueError(f"the admin port must be 0-65535, not {admin_port}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    node: dict[str, Any] = {"id": node_id, "cluster": node_cluster}
    if metadata:
        node["metadata"] = dict(sorted(metadata.items()))
    return {
        "node": node,
        "static_resources": {"clusters": [_agent_cluster(agent_socket)]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": dict(ADS),
            "lds_config": dict(ADS),
        },
        "admin": {"address": {"socket_address": {"address": ADMIN_HOST, "port_value": admin_port}}},
        "layered_runtime": {
            "layers": [
                {
                    "name": "tessera",
                    "static_layer": {
                        "re2.max_program_size.error_level": MAX_PROGRAM_SIZE,
                        "re2.max_program_size.warn_level": MAX_PROGRAM_SIZE,
                    },
                },
            ]
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        max_active_downstream_connections=max_connections,
                    ),
                }
            ]
        },
    }


def _agent_cluster(agent_socket: str) -> dict[str, Any]:
    """The agent: gRPC (HTTP/2) on its Unix socket, where ADS and SDS are served."""
    return {
        "name": XDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _XDS_CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": agent_socket}}}}]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
    }
