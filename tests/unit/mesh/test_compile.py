"""The compiler: each proxy's view, every element naming where it came from."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from mesh import Catalog, GatewayProxy, HttpRequest, SidecarProxy, compile_view
from mesh.view import (
    DirectResponse,
    Forward,
    Redirect,
    Source,
    StringMatch,
    View,
)
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from tests.unit.mesh.meshes import (
    GATEWAY,
    INGRESS,
    ORDERS,
    ORDERS_SERVICE,
    REVIEWS,
    REVIEWS_INSTANCES,
    SPLIT,
    USERS,
    USERS_INSTANCES,
    configured,
    everything,
    instance,
    unsourced,
)


def sidecar(service: str = "orders", spiffe_id: str = ORDERS, **labels: str) -> SidecarProxy:
    return SidecarProxy(service, spiffe_id, labels)


def views() -> list[View]:
    config, catalog = everything()
    return [
        compile_view(config, catalog, sidecar("orders", ORDERS, app="orders", version="v2")),
        compile_view(config, catalog, sidecar("users-service", USERS, app="users")),
        compile_view(config, catalog, sidecar("reviews", REVIEWS, version="v1")),
        compile_view(config, catalog, GatewayProxy(GATEWAY, INGRESS)),
    ]


@pytest.mark.parametrize("view", views(), ids=lambda view: str(view.proxy))
def test_every_element_of_a_view_names_its_source(view: View) -> None:
    assert unsourced(view) == []
    assert view.problems == ()


def test_an_element_without_a_source_is_found() -> None:
    """The check above can fail: a view with an element whose source is empty."""
    config, catalog = everything()
    view = compile_view(config, catalog, sidecar())
    route = view.outbound[0].routes[0]
    broken = type(route)(**{**route.__dict__, "source": Source("", "")})
    assert unsourced(broken) == ["view (Route)"]


# -- the mission's gateway ------------------------------------------------------------------


def mission_gateway(**labels: str) -> View:
    config = configured(MISSION, USERS_SERVICE)
    return compile_view(config, Catalog(USERS_INSTANCES), GatewayProxy(GATEWAY, labels or INGRESS))


def test_the_mission_s_gateway_listens_on_80_and_routes_one_path() -> None:
    view = mission_gateway()
    assert [listener.port for listener in view.gateway_listeners] == [80]
    [listener] = view.gateway_listeners
    assert listener.protocol == "HTTP"
    assert listener.source == Source("Gateway", "microservice-gateway", "spec.servers[0].port")
    [server] = listener.servers
    assert server.hosts == ("*",)
    [virtual_host] = server.virtual_hosts
    assert virtual_host.domains == ("*",)
    first, last = virtual_host.routes
    assert first.source == Source("VirtualService", "microservice-virtual-service", "spec.http[0]")
    assert first.matches[0].uri == StringMatch("exact", "/api/v1/users")
    assert isinstance(first.action, Forward)
    [destination] = first.action.destinations
    assert (destination.service, destination.port, destination.subset, destination.weight) == (
        "users-service",
        80,
        None,
        100,
    )
    assert isinstance(last.action, DirectResponse)
    assert last.action.status == 404
    assert last.source == Source("default", "not-found")
    assert server.not_found.status == 404
    assert [cluster.name for cluster in view.clusters] == ["outbound|80||users-service"]
    [endpoints] = view.endpoints
    assert [str(endpoint.address) for endpoint in endpoints.endpoints] == [
        "10.0.0.5:8443",
        "10.0.0.6:8443",
    ]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/users", None),
        ("/api/v1/users?page=2", None),
        ("/api/v1/../v1/users", None),
        ("/", 404),
        ("/api/v1/users/7", 404),
        ("/api/v1/user", 404),
        ("/API/V1/USERS", 404),
    ],
)
def test_the_mission_s_gateway_answers_404_for_any_other_path(
    path: str, status: int | None
) -> None:
    [listener] = mission_gateway().gateway_listeners
    server = listener.server_for("shop.example.com")
    assert server is not None
    virtual_host = server.virtual_host_for("shop.example.com")
    assert virtual_host is not None
    route = virtual_host.route_for(HttpRequest.of("GET", path))
    assert route is not None
    action = route.action
    assert (action.status if isinstance(action, DirectResponse) else None) == status


def test_a_gateway_with_other_labels_serves_nothing() -> None:
    view = mission_gateway(istio="egressgateway")
    assert view.gateway_listeners == ()
    assert view.clusters == ()


# -- routes: order, split, defaults ---------------------------------------------------------


def test_a_split_keeps_its_weights_and_the_sources_of_each_share() -> None:
    config, catalog = everything()
    view = compile_view(config, catalog, sidecar())
    reviews = view.outbound_service("reviews")
    assert reviews is not None
    assert reviews.source == Source("VirtualService", "reviews")
    split, not_found = reviews.routes
    assert isinstance(split.action, Forward)
    assert [
        (item.cluster, item.weight, item.source.path) for item in split.action.destinations
    ] == [
        ("outbound|9080|v1|reviews", 90, "spec.http[0].route[0]"),
        ("outbound|9080|v2|reviews", 10, "spec.http[0].route[1]"),
    ]
    assert isinstance(not_found.action, DirectResponse)


def test_the_first_matching_route_wins() -> None:
    text = (
        ORDERS_SERVICE
        + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orders}
spec:
  hosts: [orders]
  http:
  - name: exact-first
    match: [{uri: {exact: /orders/1}}]
    route: [{destination: {host: orders}}]
    timeout: 1s
  - name: by-prefix
    match: [{uri: {prefix: /orders}}, {headers: {x-canary: {}}}]
    route: [{destination: {host: orders}}]
    timeout: 2s
  - name: by-method
    match: [{method: {exact: POST}, queryParams: {dry: {regex: "[01]"}}}]
    redirect: {uri: /dry-run}
"""
    )
    view = compile_view(configured(text), Catalog(), sidecar())
    orders = view.outbound_service("orders")
    assert orders is not None

    def taken(method: str, path: str, **headers: str) -> str | None:
        route = orders.route_for(HttpRequest.of(method, path, headers))
        assert route is not None
        return route.name

    assert taken("GET", "/orders/1") == "exact-first"
    assert taken("GET", "/orders/2") == "by-prefix"
    assert taken("GET", "/other", **{"X-Canary": ""}) == "by-prefix"
    assert taken("POST", "/other?dry=1") == "by-method"
    assert taken("POST", "/other?dry=2") is None  # the 404
    assert orders.routes[-1].source == Source("default", "not-found")
    redirect = orders.routes[2].action
    assert isinstance(redirect, Redirect)
    assert (redirect.uri, redirect.code) == ("/dry-run", 301)
    assert orders.routes[0].timeout is not None
    assert orders.routes[0].timeout.duration == timedelta(seconds=1)
    assert orders.routes[2].timeout is None and orders.routes[2].retries is None


def test_a_service_without_virtual_service_gets_the_default_route() -> None:
    config, catalog = everything()
    users = compile_view(config, catalog, sidecar()).outbound_service("users-service")
    assert users is not None
    [route] = users.routes
    assert route.source == Source("default", "route")
    assert route.matches == ()
    assert isinstance(route.action, Forward)
    [destination] = route.action.destinations
    assert destination.cluster == "outbound|80||users-service"
    assert destination.source == Source("Service", "users-service", "spec.ports[0]")
    assert route.timeout is not None and route.timeout.duration is None
    assert route.timeout.source == Source("default", "timeout")
    assert route.retries is not None
    assert (
        route.retries.attempts,
        route.retries.retry_on,
        route.retries.retriable_status_codes,
    ) == (
        2,
        ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"),
        (503,),
    )
    assert route.retries.source == Source("default", "retries")


def test_a_service_with_several_ports_is_routed_by_the_request_s_port() -> None:
    text = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: multi}
spec:
  spiffeIds: [spiffe://example.org/multi]
  ports:
  - {number: 80, protocol: HTTP}
  - {number: 5432, protocol: TCP}
  - {number: 9090, protocol: GRPC}
"""
    multi = compile_view(configured(text), Catalog(), sidecar()).outbound_service("multi")
    assert multi is not None

    def port(request_port: int | None) -> int:
        route = multi.route_for(HttpRequest.of("GET", "/", port=request_port))
        assert route is not None and isinstance(route.action, Forward)
        return route.action.destinations[0].port

    assert [port(9090), port(80), port(None), port(1234)] == [9090, 80, 80, 80]
    assert [port.number for port in multi.ports] == [80, 5432, 9090]


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        ("{attempts: 3}", (3, None, ("connect-failure", "refused-stream", "unavailable",
                                     "cancelled", "retriable-status-codes"), (503,), ("retryOn",))),
        ("{attempts: 0}", (0, None, (), (), ())),
        ("{attempts: 1, perTryTimeout: 250ms, retryOn: '5xx,503,reset,504'}",
         (1, timedelta(milliseconds=250), ("5xx", "reset", "retriable-status-codes"),
          (503, 504), ())),
    ],
)  # fmt: skip
def test_retries_keep_istio_s_defaults_for_what_they_leave_out(
    retries: str, expected: tuple[object, ...]
) -> None:
    text = (
        ORDERS_SERVICE
        + f"""\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: orders}}
spec:
  hosts: [orders]
  http:
  - route: [{{destination: {{host: orders}}}}]
    retries: {retries}
"""
    )
    orders = compile_view(configured(text), Catalog(), sidecar()).outbound_service("orders")
    assert orders is not None
    policy = orders.routes[0].retries
    assert policy is not None
    got = (
        policy.attempts,
        policy.per_try_timeout,
        policy.retry_on,
        policy.retriable_status_codes,
        policy.defaulted,
    )
    assert got == expected
    assert policy.source == Source("VirtualService", "orders", "spec.http[0].retries")


def test_source_labels_are_matched_against_the_proxy_s_own_labels() -> None:
    text = (
        ORDERS_SERVICE
        + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orders}
spec:
  hosts: [orders]
  http:
  - name: from-v2
    match: [{sourceLabels: {version: v2}, uri: {prefix: /}}]
    route: [{destination: {host: orders}}]
  - name: rest
    route: [{destination: {host: orders}}]
"""
    )
    config = configured(text)

    def names(**labels: str) -> list[str | None]:
        orders = compile_view(config, Catalog(), sidecar(**labels)).outbound_service("orders")
        assert orders is not None
        return [route.name for route in orders.routes]

    assert names(version="v2", app="x") == ["from-v2", "rest"]
    assert names(version="v1") == ["rest"]
    assert names() == ["rest"]


def test_mesh_routes_come_from_the_most_specific_host() -> None:
    text = (
        ORDERS_SERVICE
        + "---\n"
        + USERS_SERVICE
        + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-everything}
spec:
  hosts: ["*"]
  http: [{route: [{destination: {host: users-service}}], timeout: 9s}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-cluster}
spec:
  hosts: ["*.svc.cluster.local"]
  http: [{route: [{destination: {host: users-service}}], timeout: 8s}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: c-orders}
spec:
  hosts: [orders.shop.svc.cluster.local]
  http: [{route: [{destination: {host: orders}}], timeout: 7s}]
"""
    )
    view = compile_view(configured(text), Catalog(), sidecar())
    assert [(item.service, item.source.name) for item in view.outbound] == [
        ("orders", "c-orders"),
        ("users-service", "b-cluster"),
    ]


def test_gateway_hosts_narrow_to_what_server_and_virtual_service_share() -> None:
    text = (
        USERS_SERVICE
        + """\
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: SIMPLE, serverCertificate: /etc/gw/cert.pem, privateKey: /etc/gw/key.pem}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com"]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  gateways: [public]
  http:
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/v1/}
    route: [{destination: {host: users-service}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catch-all}
spec:
  hosts: ["*"]
  gateways: [public]
  http:
  - route: [{destination: {host: users-service}}]
    fault: {abort: {httpStatus: 503}}
"""
    )
    view = compile_view(configured(text), Catalog(), GatewayProxy(GATEWAY, INGRESS))
    assert unsourced(view) == []
    http, https = view.gateway_listeners
    assert (http.port, https.port, https.protocol) == (80, 443, "HTTPS")
    [server] = https.servers
    assert server.tls is not None
    assert (server.tls.server_certificate, server.tls.private_key) == (
        "/etc/gw/cert.pem",
        "/etc/gw/key.pem",
    )
    assert [(vh.domains, vh.source.name) for vh in server.virtual_hosts] == [
        (("api.example.com",), "api"),
        (("*.example.com",), "catch-all"),
    ]
    chosen = server.virtual_host_for("api.example.com")
    assert chosen is not None and chosen.source.name == "api"
    other = server.virtual_host_for("www.example.com")
    assert other is not None and other.source.name == "catch-all"
    assert server.virtual_host_for("example.org") is None
    assert https.server_for("example.org") is None
    fault = other.routes[0].fault
    assert fault is not None and fault.abort is not None
    assert fault.abort.percentage == 0  # no percentage: Istio injects none
    [redirecting] = http.servers
    assert redirecting.https_redirect is not None
    assert redirecting.https_redirect.source.path == "spec.servers[1].tls.httpsRedirect"
    route = server.virtual_hosts[0].routes[0]
    request = HttpRequest.of("GET", "/v1/users?x=1")
    assert route.rewrite_request(request, route.match(request)).path == "/api/v1/users?x=1"


# -- clusters and endpoints -----------------------------------------------------------------


def test_outlier_detection_and_pools_come_from_the_destination_rule() -> None:
    config, catalog = everything()
    view = compile_view(config, catalog, sidecar())
    whole = view.cluster("outbound|9080||reviews")
    v1 = view.cluster("outbound|9080|v1|reviews")
    v2 = view.cluster("outbound|9080|v2|reviews")
    assert whole is not None and v1 is not None and v2 is not None
    assert whole.outlier_detection == v1.outlier_detection
    outlier = v1.outlier_detection
    assert outlier is not None
    assert (
        outlier.consecutive_5xx_errors,
        outlier.consecutive_gateway_errors,
        outlier.interval,
        outlier.base_ejection_time,
        outlier.max_ejection_percent,
    ) == (3, None, timedelta(seconds=5), timedelta(seconds=30), 10)
    assert outlier.defaulted == (
        "consecutiveGatewayErrors",
        "baseEjectionTime",
        "maxEjectionPercent",
    )
    assert outlier.source == Source(
        "DestinationRule", "reviews", "spec.trafficPolicy.outlierDetection"
    )
    replaced = v2.outlier_detection
    assert replaced is not None
    assert (
        replaced.consecutive_5xx_errors,
        replaced.consecutive_gateway_errors,
        replaced.base_ejection_time,
        replaced.max_ejection_percent,
    ) == (5, 2, timedelta(minutes=1), 50)
    assert replaced.source.path == "spec.subsets[1].trafficPolicy.outlierDetection"
    assert v2.load_balancer.policy == "ROUND_ROBIN"  # the rule's: the subset sets no loadBalancer
    assert v2.load_balancer.source.path == "spec.trafficPolicy.loadBalancer"
    pool = v1.connection_pool
    assert (
        pool.max_connections,
        pool.http1_max_pending_requests,
        pool.max_requests_per_connection,
    ) == (
        100,
        10,
        None,
    )
    assert pool.connect_timeout == timedelta(seconds=10)
    assert "connectTimeout" in pool.defaulted and "maxConnections" not in pool.defaulted
    assert v1.peer_identities.spiffe_ids == (REVIEWS,)
    assert v1.peer_identities.source == Source("Service", "reviews", "spec.spiffeIds")
    users = view.cluster("outbound|80||users-service")
    assert users is not None
    crashes = users.outlier_detection  # without a rule's: ejected for gateway errors only
    assert crashes is not None and crashes.source == Source("default", "outlier-detection")
    assert (crashes.consecutive_5xx_errors, crashes.consecutive_gateway_errors,
            crashes.base_ejection_time, crashes.max_ejection_percent) == (
        None, 5, timedelta(seconds=30), 50)  # fmt: skip
    assert users.load_balancer.policy == "LEAST_REQUEST"
    assert users.load_balancer.source == Source("default", "load-balancer")


def test_endpoints_are_the_routable_instances_with_the_subset_s_labels() -> None:
    config, catalog = everything()
    view = compile_view(config, catalog, sidecar())

    def addresses(cluster: str) -> tuple[list[str], list[tuple[str, str]]]:
        found = view.cluster_endpoints(cluster)
        assert found is not None
        return (
            [str(item.address) for item in found.endpoints],
            [(str(item.address), item.reason) for item in found.excluded],
        )

    assert addresses("outbound|9080|v1|reviews") == (
        ["10.0.1.1:8443", "10.0.1.2:8443"],
        [("10.0.1.3:8443", "unhealthy")],
    )
    assert addresses("outbound|9080|v2|reviews") == (
        ["10.0.2.1:8443"],
        [("10.0.2.2:8443", "not checked yet (the Service has a health check)")],
    )
    v1 = view.cluster_endpoints("outbound|9080|v1|reviews")
    assert v1 is not None and v1.source == Source("DestinationRule", "reviews", "spec.subsets[0]")
    assert v1.endpoints[0].source == Source("catalog", "reviews", "10.0.1.1:8443")


def test_unknown_health_is_routed_when_the_service_has_no_health_check() -> None:
    config = configured(ORDERS_SERVICE)
    catalog = Catalog([instance("orders", "10.0.3.9:8443", health="unknown", spiffe_id=ORDERS)])
    [endpoints] = compile_view(config, catalog, sidecar()).endpoints
    assert [str(item.address) for item in endpoints.endpoints] == ["10.0.3.9:8443"]


# -- inbound --------------------------------------------------------------------------------


def test_a_sidecar_s_inbound_has_its_ports_rate_limits_and_policies() -> None:
    config, catalog = everything()
    view = compile_view(config, catalog, sidecar("users-service", USERS, app="users"))
    assert view.inbound is not None
    assert [(port.number, port.protocol) for port in view.inbound.ports] == [(80, "HTTP")]
    assert [(rule.name, rule.keyed_on, rule.burst) for rule in view.inbound.rate_limits] == [
        ("everyone-to-users", "caller", 5),
        ("orders-to-users", "shared", 100),
    ]
    assert [(rule.action, str(rule.source)) for rule in view.authorization.rules] == [
        ("DENY", "AuthorizationPolicy no-legacy spec.rules[0]"),
        ("ALLOW", "AuthorizationPolicy users-readers spec.rules[0]"),
        ("ALLOW", "AuthorizationPolicy users-readers spec.rules[1]"),
        ("AUDIT", "AuthorizationPolicy audit-writes spec.rules[0]"),
    ]
    assert view.authorization.default.action == "DENY"
    assert view.authorization.default.source == Source("AuthorizationPolicy", "users-readers")
    orders = compile_view(config, catalog, sidecar())
    assert [rule.policy for rule in orders.authorization.rules] == ["no-legacy", "audit-writes"]
    assert orders.authorization.default.action == "ALLOW"


def test_a_sidecar_of_a_service_that_does_not_exist_says_so() -> None:
    view = compile_view(configured(ORDERS_SERVICE), Catalog(), sidecar("ghost", ORDERS))
    assert view.inbound is not None and view.inbound.ports == ()
    assert [problem.message for problem in view.problems] == [
        "Service ghost does not exist: the sidecar serves no port"
    ]


# -- versions -------------------------------------------------------------------------------


def test_a_view_is_deterministic_and_its_version_follows_its_content() -> None:
    config, catalog = everything()
    proxy = sidecar(app="orders", version="v2")
    first = compile_view(config, catalog, proxy)
    reordered = Catalog(reversed(list(catalog)))
    again = compile_view(
        config, reordered, SidecarProxy("orders", ORDERS, {"version": "v2", "app": "orders"})
    )
    assert again == first
    assert again.version == first.version
    assert json.dumps(first.to_json(), sort_keys=True) == json.dumps(
        again.to_json(), sort_keys=True
    )
    assert first.to_json()["version"] == first.version

    flipped = [
        instance("reviews", "10.0.2.2:8443", {"version": "v2"}, "healthy", spiffe_id=REVIEWS)
        if str(item.address) == "10.0.2.2:8443"
        else item
        for item in catalog
    ]
    changed = compile_view(config, Catalog(flipped), proxy)
    assert changed.version != first.version
    assert changed.part_version("endpoints") != first.part_version("endpoints")
    assert changed.part_version("clusters") == first.part_version("clusters")
    assert changed.part_version("outbound") == first.part_version("outbound")


def test_the_view_s_json_names_sources_and_spells_durations_as_istio() -> None:
    config, catalog = everything()
    document = compile_view(config, catalog, sidecar()).to_json()
    text = json.dumps(document)
    reviews = next(item for item in document["outbound"] if item["service"] == "reviews")
    route = reviews["routes"][0]
    assert route["source"] == {"kind": "VirtualService", "name": "reviews", "path": "spec.http[0]"}
    assert route["action"]["destinations"][0]["weight"] == 90
    cluster = next(
        item for item in document["clusters"] if item["name"] == "outbound|9080|v1|reviews"
    )
    assert cluster["outlierDetection"]["interval"] == "5s"
    assert cluster["connectionPool"]["idleTimeout"] == "3600s"
    assert '"address": "10.0.1.1:8443"' in text
    assert document["proxy"] == {
        "kind": "sidecar",
        "service": "orders",
        "spiffeId": ORDERS,
        "labels": {},
    }


def test_views_need_only_the_services_they_reach() -> None:
    config = configured(MISSION, USERS_SERVICE, SPLIT)
    gateway = compile_view(config, Catalog(REVIEWS_INSTANCES), GatewayProxy(GATEWAY, INGRESS))
    assert {cluster.service for cluster in gateway.clusters} == {"users-service"}
    assert gateway.outbound == () and gateway.inbound is None
    side = compile_view(config, Catalog(), sidecar())
    assert {cluster.service for cluster in side.clusters} == {"users-service", "reviews"}
    assert side.gateway_listeners == ()
