"""The view of a proxyless gRPC client: a Listener per target it may dial, routes inline,
clusters and endpoints in the form gRPC's xDS client accepts (gRFCs A27, A28, A29).
That gRPC itself accepts them is tests/integration/test_grpc_xds.py's part."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import Catalog, GatewayProxy, SidecarProxy, compile_view
from mesh.envoy import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, RESOURCE_TYPES, Resources
from mesh.envoy.proxyless import render_proxyless
from tests.unit.mesh.meshes import (
    ORDERS,
    ORDERS_SERVICE,
    REVIEWS_INSTANCES,
    SPLIT,
    USERS_INSTANCES,
    configured,
    everything,
)
from tests.unit.mesh.test_envoy_render import ORDERS_ROUTES
from workload_api.xds_server import pack_resources

WEB = "spiffe://example.org/web"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
      "HttpConnectionManager"  # fmt: skip


def rendered(*texts: str, provider: str | None = "tessera") -> Resources:
    config = configured(*texts) if texts else everything()[0]
    catalog = Catalog([*USERS_INSTANCES, *REVIEWS_INSTANCES])
    return render_proxyless(
        compile_view(config, catalog, SidecarProxy("", WEB)), certificate_provider=provider
    )


def named(resources: Resources, type_url: str, name: str) -> dict[str, Any]:
    found = resources.named(type_url, name)
    assert found is not None, f"no {name}"
    return found


def test_a_listener_per_target_with_its_routes_inline() -> None:
    resources = rendered()
    assert [item["name"] for item in resources.listeners] == [
        "orders",
        "orders:8080",
        "reviews",
        "reviews:9080",
        "users-service",
        "users-service:80",
    ]
    manager = named(resources, LISTENER, "reviews")["api_listener"]["api_listener"]
    assert manager["@type"] == HCM
    assert [f["name"] for f in manager["http_filters"]] == ["envoy.filters.http.router"]
    [host] = manager["route_config"]["virtual_hosts"]
    assert host["domains"] == ["reviews", "reviews:9080", "reviews.*"]
    assert host["routes"][0]["route"]["weighted_clusters"]["clusters"] == [
        {"name": "outbound|9080|v1|reviews", "weight": 90},
        {"name": "outbound|9080|v2|reviews", "weight": 10},
    ]
    assert "@type" not in manager["route_config"]
    assert resources.route_configurations == ()


def test_a_route_with_a_fault_brings_the_fault_filter_before_the_router() -> None:
    manager = named(rendered(ORDERS_ROUTES, SPLIT, ORDERS_SERVICE), LISTENER,
                    "orders")["api_listener"]["api_listener"]  # fmt: skip
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]


def test_upstream_mtls_names_the_certificate_provider_and_the_services_spiffe_ids() -> None:
    cluster = named(rendered(), CLUSTER, "outbound|80||users-service")
    assert cluster["transport_socket"]["typed_config"]["common_tls_context"] == {
        "tls_certificate_provider_instance": {"instance_name": "tessera"},
        "validation_context": {
            "ca_certificate_provider_instance": {"instance_name": "tessera"},
            "match_subject_alt_names": [{"exact": "spiffe://example.org/users"}],
        },
    }
    plain = named(rendered(provider=None), CLUSTER, "outbound|80||users-service")
    assert "transport_socket" not in plain


def test_endpoints_are_in_one_weighted_locality() -> None:
    assignment = named(rendered(), CLUSTER_LOAD_ASSIGNMENT, "outbound|80||users-service")
    [locality] = assignment["endpoints"]
    assert (locality["locality"], locality["load_balancing_weight"]) == ({}, 1)
    assert [e["endpoint"]["address"]["socket_address"]["address"]
            for e in locality["lb_endpoints"]] == ["10.0.0.5", "10.0.0.6"]  # fmt: skip


def test_load_balancers_grpc_lacks_become_round_robin_said_when_asked_for() -> None:
    resources = rendered(SPLIT.replace("simple: ROUND_ROBIN", "simple: RANDOM"))
    policies = {item["name"]: item["lb_policy"] for item in resources.clusters}
    assert set(policies.values()) == {"ROUND_ROBIN"}
    assert resources.problems == tuple(
        f"cluster {name}: gRPC's xDS clients take no RANDOM load balancer "
        "(DestinationRule reviews spec.trafficPolicy.loadBalancer); they balance ROUND_ROBIN"
        for name in ("outbound|9080||reviews", "outbound|9080|v1|reviews",
                     "outbound|9080|v2|reviews"))  # fmt: skip
    # Tessera's default (LEAST_REQUEST) goes unsaid: it is nobody's choice.
    assert rendered().problems == ()
    hashed = rendered(ORDERS_ROUTES, SPLIT, ORDERS_SERVICE)
    assert named(hashed, CLUSTER, "outbound|8080|hashed|orders")["lb_policy"] == "RING_HASH"


def test_every_resource_is_valid_for_envoys_api() -> None:
    invalid: list[tuple[str, str]] = []
    packed = pack_resources(rendered(ORDERS_ROUTES, SPLIT, ORDERS_SERVICE).by_type(),
                            lambda which, error: invalid.append((which, error)))  # fmt: skip
    assert invalid == []
    assert set(packed) == set(RESOURCE_TYPES)


def test_only_a_sidecars_view_is_rendered() -> None:
    view = compile_view(everything()[0], Catalog([]), GatewayProxy(ORDERS))
    with pytest.raises(ValueError, match="render_proxyless takes a sidecar's view, not a gateway"):
        render_proxyless(view)
