"""Spans over OTLP in rendered Envoy resources: the OpenTelemetry tracer in every
connection manager and a cluster to the collector when an endpoint is given, nothing of
tracing without one — and Envoy itself accepting it (``envoy --mode validate``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2, json_format

from mesh import GatewayProxy, SidecarProxy, compile_view
from mesh.envoy import (
    ALL_SECRET,
    RESOURCE_TYPES,
    RenderOptions,
    Resources,
    SidecarAddresses,
    build_bootstrap,
    render_gateway,
    render_sidecar,
)
from mesh.envoy.tracing import OTLP_CLUSTER
from sdk.address import HostPort
from tests.support.envoy_static import (
    require_envoy,
    spiffe_trust,
    static_bootstrap,
    svid_secret,
    validate,
    write_json,
)
from tests.support.pki import TestCA
from tests.unit.mesh.meshes import GATEWAY, INGRESS, USERS, everything
from tests.unit.mesh.test_envoy_render import _register_messages

ADDRESSES = SidecarAddresses(
    inbound=HostPort("10.0.0.5", 8443),
    app=HostPort("127.0.0.1", 8080),
    outbound=HostPort("127.0.0.1", 15001),
)
COLLECTOR = HostPort("127.0.0.1", 4317)
OTEL_CONFIG = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"


def _gateway(options: RenderOptions | None = None) -> Resources:
    config, catalog = everything()
    view = compile_view(config, catalog, GatewayProxy(GATEWAY, INGRESS))
    return render_gateway(view, host="127.0.0.1", port_offset=10000, options=options)


def _sidecar(options: RenderOptions | None = None) -> Resources:
    config, catalog = everything()
    view = compile_view(config, catalog, SidecarProxy("users-service", USERS, {"app": "users"}))
    return render_sidecar(view, ADDRESSES, options)


def _managers(resources: Resources) -> dict[str, dict[str, Any]]:
    return {
        listener["name"]: chain["filters"][0]["typed_config"]
        for listener in resources.listeners
        for chain in listener["filter_chains"]
    }


@pytest.mark.parametrize(
    ("render", "service_name", "listeners"),
    [
        (_gateway, GATEWAY, ["gateway_80"]),
        (_sidecar, "users-service", ["inbound", "outbound"]),
    ],
)
def test_every_connection_manager_traces_to_the_collector(
    render: Any, service_name: str, listeners: list[str]
) -> None:
    resources = render(RenderOptions(otlp_endpoint=COLLECTOR))
    managers = _managers(resources)
    assert sorted(managers) == listeners
    for manager in managers.values():
        assert manager["tracing"] == {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": OTEL_CONFIG,
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": OTLP_CLUSTER},
                        "timeout": "5s",
                    },
                    "service_name": service_name,
                },
            }
        }
    [cluster] = [item for item in resources.clusters if item["name"] == OTLP_CLUSTER]
    assert cluster["type"] == "STATIC"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 4317}}
    }
    http = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert http["explicit_http_config"] == {"http2_protocol_options": {}}
    assert cluster["metadata"]["filter_metadata"]["tessera"]["source"] == "agent otlp_endpoint"


def test_a_collector_by_name_is_resolved() -> None:
    resources = _gateway(RenderOptions(otlp_endpoint=HostPort("otel.internal", 4317)))
    [cluster] = [item for item in resources.clusters if item["name"] == OTLP_CLUSTER]
    assert (cluster["type"], cluster["dns_lookup_family"]) == ("STRICT_DNS", "V4_PREFERRED")


@pytest.mark.parametrize("render", [_gateway, _sidecar])
def test_without_an_endpoint_there_is_no_tracing(render: Any) -> None:
    resources = render(RenderOptions())
    assert all("tracing" not in manager for manager in _managers(resources).values())
    assert OTLP_CLUSTER not in {cluster["name"] for cluster in resources.clusters}
    assert "opentelemetry" not in json.dumps(resources.by_type())


def test_the_tracer_and_its_cluster_are_their_messages() -> None:
    import envoy.config.trace.v3.opentelemetry_pb2  # noqa: F401

    _register_messages()
    resources = _gateway(RenderOptions(otlp_endpoint=COLLECTOR))
    for type_url in RESOURCE_TYPES:
        for resource in resources.of_type(type_url):
            json_format.ParseDict(json.loads(json.dumps(resource)), any_pb2.Any())


@pytest.mark.envoy
def test_envoy_accepts_the_tracing(tmp_path: Path) -> None:
    envoy = require_envoy()
    ca = TestCA("example.org")
    options = RenderOptions(otlp_endpoint=COLLECTOR)
    renders = [_gateway(options), _sidecar(options)]
    bootstrap = static_bootstrap(
        build_bootstrap(
            node_id="n", node_cluster="c", agent_socket="/run/tessera/agent.sock", admin_port=0
        ),
        renders,
        secrets=[
            *(svid_secret(name, ca.issue_x509_svid(name)) for name in (GATEWAY, USERS)),
            spiffe_trust(ALL_SECRET, [ca]),
        ],
    )
    listeners = bootstrap["static_resources"]["listeners"]
    assert all(
        "tracing" in chain["filters"][0]["typed_config"]
        for listener in listeners
        for chain in listener["filter_chains"]
    )
    result = validate(envoy, write_json(tmp_path / "envoy.json", bootstrap))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
