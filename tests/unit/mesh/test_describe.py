"""describe: what each proxy of a Service does, every line naming its source."""

from __future__ import annotations

import json

import pytest

from mesh import Catalog, GatewayProxy, UnknownServiceError, compile_view, describe, describe_view
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from tests.unit.mesh.meshes import (
    GATEWAY,
    INGRESS,
    ORDERS,
    USERS,
    USERS_INSTANCES,
    configured,
    everything,
    instance,
)


def test_the_mission_s_gateway_described() -> None:
    view = compile_view(
        configured(MISSION, USERS_SERVICE), Catalog(USERS_INSTANCES), GatewayProxy(GATEWAY, INGRESS)
    )
    lines = [str(line) for line in describe_view(view)]
    assert lines[:9] == [
        "authorization: otherwise ALLOW (no ALLOW policy selects this workload)  "
        "[default authorization]",
        "listener port 80 HTTP  [Gateway microservice-gateway spec.servers[0].port]",
        "  server for hosts *  [Gateway microservice-gateway spec.servers[0]]",
        "    hosts *  [VirtualService microservice-virtual-service]",
        "      route 0: uri exact /api/v1/users → users-service port 80 100%  "
        "[VirtualService microservice-virtual-service spec.http[0]]",
        "        match uri exact /api/v1/users  "
        "[VirtualService microservice-virtual-service spec.http[0].match[0]]",
        "        timeout none  [default timeout]",
        "        retries 2 on connect-failure,refused-stream,unavailable,cancelled,"
        "retriable-status-codes (status 503)  [default retries]",
        "      route 1: any request → answer 404: no route of VirtualService "
        "microservice-virtual-service matches the request  [default not-found]",
    ]
    assert "    any other host: answer 404  [default gateway-not-found]" in lines
    assert (
        "  endpoint 10.0.0.5:8443 (healthy, spiffe://example.org/users)  "
        "[catalog users-service 10.0.0.5:8443]"
    ) in lines


def test_every_line_names_a_source() -> None:
    config, catalog = everything()
    for service in ("users-service", "reviews", "orders"):
        description = describe(config, catalog, service)
        for proxy in description.proxies:
            for line in proxy.lines:
                assert line.source.kind and line.source.name, line
        assert all(line.endswith("]") for line in description.lines())


def test_a_service_s_proxies_are_its_instances_grouped_by_identity_and_labels() -> None:
    config, catalog = everything()
    description = describe(config, catalog, "reviews")
    assert [(dict(item.proxy.labels), item.instances) for item in description.proxies] == [
        ({"version": "v1"}, ("10.0.1.1:8443", "10.0.1.2:8443", "10.0.1.3:8443")),
        ({"version": "v2"}, ("10.0.2.1:8443", "10.0.2.2:8443")),
    ]
    lines = description.lines()
    assert lines[0] == (
        "sidecar of reviews (spiffe://example.org/reviews) {version=v1}: 10.0.1.1:8443, "
        "10.0.1.2:8443, 10.0.1.3:8443  [Service reviews]"
    )
    for expected in [
        "  outbound to reviews  [VirtualService reviews]",
        "    route 0: uri prefix /reviews → reviews port 9080 subset v1 90%, reviews port 9080 "
        "subset v2 10%  [VirtualService reviews spec.http[0]]",
        "      90% to reviews port 9080 subset v1  [VirtualService reviews spec.http[0].route[0]]",
        "      10% to reviews port 9080 subset v2  [VirtualService reviews spec.http[0].route[1]]",
        "    outlier detection: eject after 3 consecutive 5xx, checked every 5s, for 30s and "
        "longer, at most 10% of endpoints  "
        "[DestinationRule reviews spec.trafficPolicy.outlierDetection]",
        "    outlier detection: eject after 5 consecutive 5xx or 2 consecutive gateway errors, "
        "checked every 10s, for 60s and longer, at most 50% of endpoints  "
        "[DestinationRule reviews spec.subsets[1].trafficPolicy.outlierDetection]",
        "    no requests to 10.0.1.3:8443: unhealthy  [catalog reviews 10.0.1.3:8443]",
        "    upstream must present spiffe://example.org/reviews  [Service reviews spec.spiffeIds]",
    ]:
        assert expected in lines


def test_inbound_policy_and_limits_are_described() -> None:
    config, catalog = everything()
    lines = describe(config, catalog, "users-service").lines()
    assert lines[:10] == [
        f"sidecar of users-service ({USERS}) {{app=users}}: 10.0.0.5:8443, 10.0.0.6:8443  "
        "[Service users-service]",
        "  inbound of users-service  [Service users-service]",
        "    port 80 HTTP (http)  [Service users-service spec.ports[0]]",
        "    rate limit 5/s, burst 5, one bucket per caller SPIFFE ID  "
        "[RateLimit everyone-to-users spec]",
        f"    rate limit 50/s, burst 100, shared by {ORDERS}  [RateLimit orders-to-users spec]",
        "  authorization: DENY from spiffe://example.org/legacy/*  "
        "[AuthorizationPolicy no-legacy spec.rules[0]]",
        f"  authorization: ALLOW from {ORDERS} to methods GET and paths /api/v1/users, "
        "/api/v1/users/*  [AuthorizationPolicy users-readers spec.rules[0]]",
        f"  authorization: ALLOW from {GATEWAY}  [AuthorizationPolicy users-readers spec.rules[1]]",
        "  authorization: AUDIT to not methods GET, HEAD  "
        "[AuthorizationPolicy audit-writes spec.rules[0]]",
        "  authorization: otherwise DENY (an ALLOW policy selects this workload)  "
        "[AuthorizationPolicy users-readers]",
    ]


def test_a_service_without_instances_is_described_as_its_first_identity() -> None:
    config, _ = everything()
    description = describe(config, Catalog(), "users-service")
    [proxy] = description.proxies
    assert (proxy.proxy.spiffe_id, dict(proxy.proxy.labels), proxy.instances) == (USERS, {}, ())
    assert description.lines()[0].endswith(": no instance yet  [Service users-service]")
    assert "    no endpoint: calls get 503 (no healthy upstream)  [Service users-service]" in (
        description.lines()
    )


def test_the_json_form() -> None:
    config, catalog = everything()
    document = describe(
        config, Catalog([*catalog, instance("users-service", "10.0.0.9:8443", {"app": "users"})]),
        "users-service",
    ).to_json()  # fmt: skip
    json.dumps(document)
    [proxy] = document["proxies"]
    assert proxy["instances"] == ["10.0.0.5:8443", "10.0.0.6:8443", "10.0.0.9:8443"]
    assert proxy["version"] == proxy["view"]["version"]
    assert proxy["items"][1] == {
        "section": "inbound",
        "depth": 1,
        "text": "inbound of users-service",
        "source": {"kind": "Service", "name": "users-service", "path": ""},
    }


def test_a_service_that_does_not_exist() -> None:
    config, catalog = everything()
    with pytest.raises(UnknownServiceError) as caught:
        describe(config, catalog, "ghost")
    assert (str(caught.value), caught.value.status) == ("Service ghost does not exist", 404)
