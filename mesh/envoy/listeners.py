"""Envoy's listeners for a sidecar and a gateway, with their connection managers.

- **inbound** (a sidecar): mTLS requiring the caller's certificate (the proxy's SVID,
  callers checked against every trust domain's bundle), then the caller's identity
  header, JWTs, RBAC, rate limits, and the app;
- **outbound** (a sidecar): plain HTTP on the address the app calls, routed by ``Host``;
- **gateway_PORT**: per Gateway port, HTTP, or HTTPS with each server's certificate
  (chosen by SNI), then JWTs, RBAC and the routes.

Every connection manager normalises the path (``.`` and ``..`` resolved, as the view
judges it), reads its routes over ADS (RDS), and writes a JSON access log line per
request: the caller's SPIFFE ID, the route (the ``match`` entry it came from), the
upstream, the status and the duration. Given a ``tracing`` config
(:func:`mesh.envoy.tracing.tracing`), it also reports a span per request, with the W3C
trace context carried on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from mesh.envoy.clusters import sds_secret
from mesh.envoy.policies import RBAC_AUDIT_PREFIX, http_filter
from mesh.envoy.resources import ALL_SECRET, identity_secret
from mesh.envoy.routes import FAULT_FILTER, FAULT_FILTER_CONFIG
from mesh.envoy.values import ADS, metadata, socket_address, typed
from mesh.view import GatewayListener, GatewayServer, Source
from sdk.address import HostPort

__all__ = [
    "ACCESS_LOG_FIELDS",
    "INBOUND",
    "OUTBOUND",
    "fault_filter",
    "gateway_listener",
    "gateway_name",
    "http_connection_manager",
    "inbound_listener",
    "outbound_listener",
]

INBOUND: Final = "inbound"
OUTBOUND: Final = "outbound"

_TLS_MIN = "TLSv1_2"
_ALPN = ["h2", "http/1.1"]
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_DOWNSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_REQUEST_HEADERS_TIMEOUT: Final = "10s"
"""How long a peer may take to send a request's headers (inbound and gateways)."""

ACCESS_LOG_FIELDS: Final[Mapping[str, str]] = {
    "start_time": "%START_TIME%",
    "source": "%DOWNSTREAM_PEER_URI_SAN%",
    "source_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "protocol": "%PROTOCOL%",
    "route": "%ROUTE_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_peer": "%UPSTREAM_PEER_URI_SAN%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
    "audit": f"%DYNAMIC_METADATA(envoy.filters.http.rbac:{RBAC_AUDIT_PREFIX}"
    "shadow_effective_policy_id)%",
}
"""One JSON object per request. The path is logged without its query string, which may
carry a token (``access_token``). ``trace_id`` is the request's trace (with tracing on),
so a line leads to its spans."""


def gateway_name(port: int) -> str:
    """A gateway port's listener and route configuration: ``gateway_80`` (the port of
    the Gateway, before any offset)."""
    return f"gateway_{port}"


def _access_log(path: str, listener: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": typed(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path=path,
            log_format={
                "json_format": {"listener": listener, **ACCESS_LOG_FIELDS},
                "formatters": [
                    {
                        "name": "envoy.formatter.req_without_query",
                        "typed_config": typed(
                            "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                        ),
                    }
                ],
            },
        ),
    }


def fault_filter() -> dict[str, Any]:
    """The fault filter, idle unless a route's per-filter config asks for a fault."""
    return http_filter(FAULT_FILTER, typed(FAULT_FILTER_CONFIG))


def http_connection_manager(
    name: str,
    http_filters: list[dict[str, Any]],
    *,
    access_log: str | None,
    tracing: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The ``http_connection_manager`` network filter: routes ``name`` over RDS,
    ``http_filters`` then the router, the access log when a path is given, the tracer
    when ``tracing`` is given."""
    config: dict[str, Any] = {
        "stat_prefix": name,
        "rds": {"config_source": dict(ADS), "route_config_name": name},
        "http_filters": [
            *http_filters,
            http_filter(
                "envoy.filters.http.router", typed("envoy.extensions.filters.http.router.v3.Router")
            ),
        ],
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        **settings,
    }
    if access_log is not None:
        config["access_log"] = [_access_log(access_log, name)]
    if tracing is not None:
        config["tracing"] = dict(tracing)
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(_HCM, **config),
    }


def _listener(
    name: str, address: HostPort, filter_chains: list[dict[str, Any]], source: Source, **more: Any
) -> dict[str, Any]:
    if not address.is_ip:
        raise ValueError(
            f"the {name} listener's address {address} must be an IP address "
            "(Envoy listens on addresses, not names), e.g. 127.0.0.1"
        )
    return {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "address": socket_address(address.host, address.port),
        "filter_chains": filter_chains,
        "metadata": metadata(source),
        # One socket shared by Envoy's workers: a port another process (another Envoy
        # among them) listens on is refused, never shared with it.
        "enable_reuse_port": False,
        **more,
    }


def inbound_listener(
    address: HostPort,
    spiffe_id: str,
    http_filters: list[dict[str, Any]],
    source: Source,
    *,
    access_log: str | None,
    tracing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Where callers reach the instance: mTLS, the caller's certificate required."""
    manager = http_connection_manager(
        INBOUND,
        http_filters,
        access_log=access_log,
        tracing=tracing,
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
        request_headers_timeout=_REQUEST_HEADERS_TIMEOUT,
    )
    tls = typed(
        _DOWNSTREAM_TLS,
        require_client_certificate=True,
        common_tls_context={
            "tls_params": {"tls_minimum_protocol_version": _TLS_MIN},
            "tls_certificate_sds_secret_configs": [sds_secret(identity_secret(spiffe_id))],
            "validation_context_sds_secret_config": sds_secret(ALL_SECRET),
            "alpn_protocols": _ALPN,
        },
    )
    chain = {
        "name": INBOUND,
        "filters": [manager],
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
    }
    return _listener(INBOUND, address, [chain], source, traffic_direction="INBOUND")


def outbound_listener(
    address: HostPort,
    http_filters: list[dict[str, Any]],
    source: Source,
    *,
    access_log: str | None,
    tracing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Where the app sends its calls to other Services: plain HTTP, by ``Host``."""
    manager = http_connection_manager(
        OUTBOUND,
        http_filters,
        access_log=access_log,
        tracing=tracing,
        forward_client_cert_details="SANITIZE",
    )
    chain = {"name": OUTBOUND, "filters": [manager]}
    return _listener(OUTBOUND, address, [chain], source, traffic_direction="OUTBOUND")


def gateway_listener(
    listener: GatewayListener,
    host: str,
    port_offset: int,
    http_filters: list[dict[str, Any]],
    problems: list[str],
    *,
    access_log: str | None,
    tracing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Gateway port, on ``host`` and the port plus ``port_offset``.

    The edge: the client's address is the connection's (``use_remote_address``), any
    ``X-Forwarded-Client-Cert`` it sent is dropped, and the ``Host``'s port is not part
    of the name routes are chosen by (the view's servers and hosts have none).
    """
    name = gateway_name(listener.port)
    port = listener.port + port_offset
    if not 0 < port <= 65535:
        raise ValueError(
            f"port {listener.port} plus the port offset {port_offset} is {port}, "
            "outside 1-65535: choose another offset"
        )
    manager = http_connection_manager(
        name,
        http_filters,
        access_log=access_log,
        tracing=tracing,
        use_remote_address=True,
        forward_client_cert_details="SANITIZE",
        strip_any_host_port=True,
        request_headers_timeout=_REQUEST_HEADERS_TIMEOUT,
    )
    more: dict[str, Any] = {}
    if listener.protocol == "HTTPS":
        chains = _https_chains(listener, manager, problems)
        more["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": typed(
                    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                ),
            }
        ]
    else:
        chains = [{"name": name, "filters": [manager]}]
    return _listener(name, HostPort(host, port), chains, listener.source, **more)


def _https_chains(
    listener: GatewayListener, manager: dict[str, Any], problems: list[str]
) -> list[dict[str, Any]]:
    """A filter chain per HTTPS server, chosen by the client's SNI (``*``: any name no
    other server has); a name another server already has goes to the first."""
    chains = []
    names_taken: set[str] = set()
    default_taken = False
    for server in listener.servers:
        if server.tls is None:
            problems.append(f"{server.source}: an HTTPS server without tls is left out")
            continue
        chain: dict[str, Any] = {
            "name": str(server.source),
            "filters": [manager],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": _server_tls(server),
            },
        }
        if "*" in server.hosts:
            if default_taken:
                problems.append(
                    f"{server.source}: hosts * on port {listener.port} is already served "
                    "by another server; this one is left out"
                )
                continue
            default_taken = True
        else:
            names = [host for host in server.hosts if host not in names_taken]
            if not names:
                problems.append(
                    f"{server.source}: every host of it on port {listener.port} is already "
                    "served by another server; this one is left out"
                )
                continue
            names_taken.update(names)
            chain["filter_chain_match"] = {"server_names": names}
        chains.append(chain)
    return chains


def _server_tls(server: GatewayServer) -> dict[str, Any]:
    assert server.tls is not None
    return typed(
        _DOWNSTREAM_TLS,
        common_tls_context={
            "tls_params": {"tls_minimum_protocol_version": _TLS_MIN},
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": server.tls.server_certificate},
                    "private_key": {"filename": server.tls.private_key},
                }
            ],
            "alpn_protocols": _ALPN,
        },
    )
