"""explain: the route a request takes, where it goes, and the rule that allows or refuses it."""

from __future__ import annotations

import json

import pytest

from mesh import Catalog, explain, explain_gateway
from mesh.view import Source
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from tests.unit.mesh.meshes import (
    BILLING,
    GATEWAY,
    INGRESS,
    LEGACY,
    ORDERS,
    ORDERS_INSTANCES,
    ORDERS_SERVICE,
    REVIEWS,
    REVIEWS_INSTANCES,
    SPLIT,
    USERS,
    USERS_INSTANCES,
    configured,
    everything,
    instance,
)

MISSION_CONFIG = configured(MISSION, USERS_SERVICE)


@pytest.mark.parametrize(
    ("path", "allowed", "status", "route"),
    [
        ("/api/v1/users", True, None, "VirtualService microservice-virtual-service spec.http[0]"),
        ("/", False, 404, "default not-found"),
        ("/api/v1/users/42", False, 404, "default not-found"),
        ("/api/v2/users", False, 404, "default not-found"),
    ],
)
def test_the_mission_s_gateway(path: str, allowed: bool, status: int | None, route: str) -> None:
    explanation = explain_gateway(
        MISSION_CONFIG, Catalog(USERS_INSTANCES), labels=INGRESS, port=80,
        host="shop.example.com", path=path,
    )  # fmt: skip
    assert explanation.allowed is allowed
    assert explanation.status == status
    assert explanation.route is not None
    assert str(explanation.route.source) == route
    if allowed:
        destination = explanation.destination
        assert destination is not None
        assert (destination.destination.service, destination.destination.port) == (
            "users-service",
            80,
        )
        assert destination.endpoints == 2
        assert explanation.outcome == "forwarded"
        assert (
            "100% to users-service port 80 (cluster outbound|80||users-service, 2 endpoints)  "
            "[VirtualService microservice-virtual-service spec.http[0].route[0]]"
        ) in explanation.lines()
    else:
        assert explanation.outcome == "not-found"
        assert explanation.destinations == ()
        assert explanation.lines()[-1] == (
            "answered 404: no route of VirtualService microservice-virtual-service matches the "
            "request  [default not-found]"
        )


def test_the_mission_s_gateway_step_by_step() -> None:
    explanation = explain_gateway(
        MISSION_CONFIG, Catalog(USERS_INSTANCES), labels=INGRESS, port=80, path="/api/v1/users",
        spiffe_id=GATEWAY,
    )  # fmt: skip
    assert explanation.lines() == [
        "port 80 (HTTP)  [Gateway microservice-gateway spec.servers[0].port]",
        "host (none) is served by hosts *  [Gateway microservice-gateway spec.servers[0]]",
        "routed by hosts *  [VirtualService microservice-virtual-service]",
        "route taken: uri exact /api/v1/users  "
        "[VirtualService microservice-virtual-service spec.http[0].match[0]]",
        "timeout none  [default timeout]",
        "retries 2 on connect-failure,refused-stream,unavailable,cancelled,"
        "retriable-status-codes  [default retries]",
        "100% to users-service port 80 (cluster outbound|80||users-service, 2 endpoints)  "
        "[VirtualService microservice-virtual-service spec.http[0].route[0]]",
        f"allowed by users-service: no ALLOW policy selects this workload and no DENY rule "
        f"matches {GATEWAY}  [default authorization]",
    ]
    json.dumps(explanation.to_json())


def test_a_gateway_without_the_port_or_the_labels() -> None:
    wrong_port = explain_gateway(MISSION_CONFIG, Catalog(), labels=INGRESS, port=8080)
    assert (wrong_port.outcome, wrong_port.allowed) == ("no-listener", False)
    wrong_labels = explain_gateway(MISSION_CONFIG, Catalog(), labels={"istio": "x"}, port=80)
    assert wrong_labels.outcome == "no-listener"


def test_a_split_lists_each_share() -> None:
    config, catalog = everything()
    explanation = explain(config, catalog, caller=ORDERS, service="reviews", path="/reviews/1")
    assert explanation.allowed
    assert explanation.destination is None  # a split: no single destination
    assert [
        (item.destination.subset, item.destination.weight, item.endpoints)
        for item in explanation.destinations
    ] == [("v1", 90, 2), ("v2", 10, 1)]
    lines = explanation.lines()
    assert (
        "90% to reviews port 9080 subset v1 (cluster outbound|9080|v1|reviews, 2 endpoints)  "
        "[VirtualService reviews spec.http[0].route[0]]"
    ) in lines
    assert (
        "10% to reviews port 9080 subset v2 (cluster outbound|9080|v2|reviews, 1 endpoint)  "
        "[VirtualService reviews spec.http[0].route[1]]"
    ) in lines
    outside = explain(config, catalog, caller=ORDERS, service="reviews", path="/ratings")
    assert (outside.allowed, outside.status) == (False, 404)


@pytest.mark.parametrize(
    ("caller", "method", "path", "allowed", "rule"),
    [
        (ORDERS, "GET", "/api/v1/users", True, "AuthorizationPolicy users-readers spec.rules[0]"),
        (ORDERS, "GET", "/api/v1/users/7", True, "AuthorizationPolicy users-readers spec.rules[0]"),
        (ORDERS, "DELETE", "/api/v1/users/7", False, "AuthorizationPolicy users-readers"),
        (ORDERS, "GET", "/api/v1/admin", False, "AuthorizationPolicy users-readers"),
        (ORDERS, "GET", "/api/v1/users/../admin", False, "AuthorizationPolicy users-readers"),
        (BILLING, "GET", "/api/v1/users", False, "AuthorizationPolicy users-readers"),
        (GATEWAY, "POST", "/anything", True, "AuthorizationPolicy users-readers spec.rules[1]"),
        (LEGACY, "GET", "/api/v1/users", False, "AuthorizationPolicy no-legacy spec.rules[0]"),
    ],
)
def test_authorization_names_the_rule_that_decides(
    caller: str, method: str, path: str, allowed: bool, rule: str
) -> None:
    config, catalog = everything()
    explanation = explain(
        config, catalog, caller=caller, service="users-service", method=method, path=path
    )
    assert explanation.allowed is allowed
    assert explanation.decision is not None
    assert str(explanation.decision.rule) == rule
    assert explanation.outcome == ("forwarded" if allowed else "refused")
    assert explanation.status == (None if allowed else 403)


def test_a_refusal_says_why() -> None:
    config, catalog = everything()
    explanation = explain(config, catalog, caller=BILLING, service="users-service", method="POST")
    assert explanation.lines()[-3:] == [
        f"refused by users-service: no ALLOW rule matches {BILLING}, and AuthorizationPolicy "
        "users-readers (ALLOW) selects this workload: refused by default  "
        "[AuthorizationPolicy users-readers]",
        "audited  [AuthorizationPolicy audit-writes spec.rules[0]]",
        "rate limit 5/s, burst 5, its own bucket  [RateLimit everyone-to-users spec]",
    ]


@pytest.mark.parametrize(
    ("caller", "limits", "buckets"),
    [
        (ORDERS, ["everyone-to-users", "orders-to-users"],
         [f"everyone-to-users|{ORDERS}", "orders-to-users"]),
        (BILLING, ["everyone-to-users"], [f"everyone-to-users|{BILLING}"]),
    ],
)  # fmt: skip
def test_rate_limits_are_keyed_on_the_caller_s_spiffe_id(
    caller: str, limits: list[str], buckets: list[str]
) -> None:
    config, catalog = everything()
    explanation = explain(config, catalog, caller=caller, service="users-service")
    assert [rule.name for rule in explanation.rate_limits] == limits
    assert [rule.bucket(caller) for rule in explanation.rate_limits] == buckets
    assert all(rule.source.kind == "RateLimit" for rule in explanation.rate_limits)
    shown = [line for line in explanation.lines() if line.startswith("rate limit")]
    assert shown[0] == "rate limit 5/s, burst 5, its own bucket  [RateLimit everyone-to-users spec]"


def test_source_labels_default_to_the_caller_s_instances() -> None:
    text = (
        ORDERS_SERVICE
        + "---\n"
        + USERS_SERVICE
        + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users}
spec:
  hosts: [users-service]
  http:
  - match: [{sourceLabels: {version: v2}}]
    route: [{destination: {host: users-service}}]
    timeout: 1s
"""
    )
    config = configured(text)
    _, catalog = everything()
    from_v2 = explain(config, catalog, caller=ORDERS, service="users-service")
    assert from_v2.allowed and from_v2.route is not None
    assert from_v2.route.source == Source("VirtualService", "users", "spec.http[0]")
    from_v1 = explain(
        config, catalog, caller=ORDERS, service="users-service", caller_labels={"version": "v1"}
    )
    assert (from_v1.allowed, from_v1.status) == (False, 404)


def test_claims_decide_when_conditions() -> None:
    text = (
        USERS_SERVICE
        + """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins}
spec:
  rules:
  - when:
    - key: request.auth.claims[groups]
      values: [admins]
    - key: request.auth.claims[org][tier]
      notValues: ["free*"]
"""
    )
    config = configured(text)

    def allowed(claims: dict[str, object] | None) -> bool:
        return explain(
            config,
            Catalog(USERS_INSTANCES),
            caller=ORDERS,
            service="users-service",
            claims=claims,
        ).allowed

    assert allowed({"groups": ["dev", "admins"], "org": {"tier": "gold"}})
    assert allowed({"groups": "admins"})
    assert not allowed({"groups": ["admins"], "org": {"tier": "free-trial"}})
    assert not allowed({"groups": ["dev"]})
    assert not allowed(None)


def test_a_service_that_does_not_exist() -> None:
    config, catalog = everything()
    explanation = explain(config, catalog, caller=ORDERS, service="ghost")
    assert (explanation.outcome, explanation.allowed) == ("unknown-service", False)
    assert explanation.lines() == ["Service ghost does not exist  [Service ghost]"]


def test_aborts_redirects_and_rewrites() -> None:
    text = (
        ORDERS_SERVICE
        + "---\n"
        + USERS_SERVICE
        + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orders}
spec:
  hosts: [orders]
  http:
  - match: [{uri: {prefix: /broken}}]
    route: [{destination: {host: orders}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
  - match: [{uri: {prefix: /sometimes}}]
    route: [{destination: {host: orders}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
  - match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new, redirectCode: 308}
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/v1/}
    route: [{destination: {host: orders}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [shop.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-api-only}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - to: [{operation: {paths: ["/api/*", "/sometimes"]}}]
"""
    )
    config = configured(text)
    _, catalog = everything()

    def outcome(path: str) -> tuple[str, bool, int | None]:
        found = explain(config, catalog, caller=USERS, service="orders", path=path)
        return found.outcome, found.allowed, found.status

    assert outcome("/broken") == ("aborted", False, 503)
    assert outcome("/sometimes") == ("forwarded", True, None)
    assert outcome("/old/x") == ("redirected", True, 308)
    assert outcome("/v1/orders") == ("forwarded", True, None)  # judged as /api/v1/orders
    assert outcome("/orders") == ("not-found", False, 404)
    rewritten = explain(config, catalog, caller=USERS, service="orders", path="/v1/orders?x=1")
    assert "rewritten to /api/v1/orders?x=1  [VirtualService orders spec.http[3].rewrite]" in (
        rewritten.lines()
    )
    edge = explain_gateway(config, catalog, labels=INGRESS, port=80, host="shop.example.com:80")
    assert (edge.outcome, edge.status, edge.lines()[-1]) == (
        "redirected",
        301,
        "answered 301 to https  [Gateway edge spec.servers[0].tls.httpsRedirect]",
    )
    elsewhere = explain_gateway(config, catalog, labels=INGRESS, port=80, host="example.org")
    assert (elsewhere.outcome, elsewhere.status, elsewhere.lines()[-1]) == (
        "not-found",
        404,
        "answered 404: no server on port 80 has the request's host  [default gateway-not-found]",
    )


def test_a_service_without_an_http_port_is_not_routed_by_request() -> None:
    text = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: db}
spec:
  spiffeIds: [spiffe://example.org/db]
  ports: [{number: 5432, protocol: TCP}]
"""
    explanation = explain(configured(text), Catalog(), caller=ORDERS, service="db")
    assert (explanation.outcome, explanation.allowed, explanation.route) == (
        "not-found",
        False,
        None,
    )
    assert explanation.lines()[-1] == (
        "no route takes the request: the Service has no HTTP port  [Service db]"
    )


# -- before any instance is registered: the labels its sidecars will run with are unknown --

NO_USERS_YET = Catalog([*REVIEWS_INSTANCES, *ORDERS_INSTANCES])
UNKNOWN_LABELS = (
    "no instance of users-service is registered yet: AuthorizationPolicy users-readers "
    "selects workloads by labels, so whether it applies depends on the labels its sidecars "
    "will run with  [Service users-service]"
)


def test_before_any_instance_the_labels_may_decide() -> None:
    config, _ = everything()
    explanation = explain(config, NO_USERS_YET, caller=BILLING, service="users-service",
                          path="/api/v1/users")  # fmt: skip
    assert (explanation.outcome, explanation.allowed, explanation.status) == (
        "undecided",
        False,
        None,
    )
    assert explanation.lines()[-6:] == [
        "503: no instance of users-service is registered  [Service users-service]",
        UNKNOWN_LABELS,
        f"with app=users: refused by users-service: no ALLOW rule matches {BILLING}, and "
        "AuthorizationPolicy users-readers (ALLOW) selects this workload: refused by default  "
        "[AuthorizationPolicy users-readers]",
        "with labels it does not select: allowed by users-service: no ALLOW policy selects "
        f"this workload and no DENY rule matches {BILLING}  [default authorization]",
        "undecided: users-service allows it with some of these labels and refuses it with "
        "others; explain again once an instance of users-service is registered  "
        "[Service users-service]",
        "rate limit 5/s, burst 5, its own bucket  [RateLimit everyone-to-users spec]",
    ]
    [share] = explanation.destinations
    assert share.undecided
    assert [(dict(case.labels), case.decision.allowed) for case in share.label_cases] == [
        ({"app": "users"}, False),
        ({}, True),
    ]
    document = explanation.to_json()
    assert document["outcome"] == "undecided"
    assert document["destinations"][0]["labelCases"][0]["selected"] == [
        {"kind": "AuthorizationPolicy", "name": "users-readers", "path": ""}
    ]


@pytest.mark.parametrize(
    ("caller", "method", "allowed", "verdict", "cases"),
    [
        (ORDERS, "GET", True, "allowed by users-service whatever labels its sidecars run with",
         [f"with app=users: allowed by users-service: {ORDERS} is allowed by an ALLOW rule  "
          "[AuthorizationPolicy users-readers spec.rules[0]]",
          "with labels it does not select: allowed by users-service: no ALLOW policy selects "
          f"this workload and no DENY rule matches {ORDERS}  [default authorization]"]),
        (LEGACY, "GET", False, "refused by users-service whatever labels its sidecars run with",
         [f"with app=users: refused by users-service: {LEGACY} is refused by a DENY rule  "
          "[AuthorizationPolicy no-legacy spec.rules[0]]",
          f"with labels it does not select: refused by users-service: {LEGACY} is refused by "
          "a DENY rule  [AuthorizationPolicy no-legacy spec.rules[0]]"]),
    ],
)  # fmt: skip
def test_before_any_instance_what_every_label_set_gives_is_the_answer(
    caller: str, method: str, allowed: bool, verdict: str, cases: list[str]
) -> None:
    config, _ = everything()
    explanation = explain(config, NO_USERS_YET, caller=caller, service="users-service",
                          method=method, path="/api/v1/users")  # fmt: skip
    # Allowed by every label set, it is still not served: no instance is there to serve it.
    assert (explanation.allowed, explanation.outcome, explanation.status) == (
        (False, "unavailable", 503) if allowed else (False, "refused", 403)
    )
    lines = explanation.lines()
    start = lines.index(UNKNOWN_LABELS)
    assert lines[start + 1 : start + 4] == [*cases, f"{verdict}  [Service users-service]"]
    assert explanation.decision is not None and explanation.decision.allowed is allowed
    if allowed:
        assert lines[-1] == (
            "not served: requests get 503: no instance of users-service is registered  "
            "[Service users-service spec.ports[0]]"
        )


REVIEWS_POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v1-no-legacy}
spec:
  selector: {matchLabels: {version: v1}}
  action: DENY
  rules:
  - from: [{source: {principals: ["spiffe://example.org/legacy/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v2-orders-only}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  rules:
  - from: [{source: {principals: [spiffe://example.org/orders]}}]
"""


@pytest.mark.parametrize(
    ("caller", "outcome", "v1", "v2"),
    [
        (ORDERS, "unavailable", "allowed by reviews: no ALLOW policy",
         "allowed by reviews whatever labels its sidecars run with"),
        (BILLING, "undecided", "allowed by reviews: no ALLOW policy",
         "undecided: reviews allows it with some of these labels and refuses it with others"),
        (LEGACY, "refused", "refused by reviews: spiffe://example.org/legacy/batch is refused "
         "by a DENY rule", "undecided: reviews allows it"),
    ],
)  # fmt: skip
def test_a_subset_s_labels_are_known_before_its_instances(
    caller: str, outcome: str, v1: str, v2: str
) -> None:
    config = configured(SPLIT, REVIEWS_POLICIES)
    explanation = explain(config, Catalog(), caller=caller, service="reviews", path="/reviews/1")
    assert explanation.outcome == outcome
    lines = explanation.lines()
    # v1: version=v1 decides both policies (one selects it, one cannot): no case to tell.
    first = lines.index(
        "90% to reviews port 9080 subset v1 (cluster outbound|9080|v1|reviews, 0 endpoints)  "
        "[VirtualService reviews spec.http[0].route[0]]"
    )
    assert lines[first + 2].startswith(v1)
    # v2: version=v2 is known, app=reviews is not.
    second = lines.index(
        "no instance of reviews subset v2 is registered yet: AuthorizationPolicy "
        "v2-orders-only selects workloads by labels, so whether it applies depends on the "
        "labels its sidecars will run with  [DestinationRule reviews spec.subsets[1]]"
    )
    assert lines[second + 1].startswith("with app=reviews: ")
    assert lines[second + 3].startswith(v2)


def test_instances_not_serving_yet_tell_their_labels() -> None:
    config, _ = everything()
    waiting = Catalog([
        instance("users-service", "10.0.0.5:8443", {"app": "users"}, "unhealthy"),
    ])  # fmt: skip
    explanation = explain(config, waiting, caller=BILLING, service="users-service")
    assert (explanation.outcome, explanation.status) == ("refused", 403)
    assert UNKNOWN_LABELS not in explanation.lines()
    assert explanation.decision is not None
    assert str(explanation.decision.rule) == "AuthorizationPolicy users-readers"


def test_a_request_no_healthy_instance_serves_is_not_allowed() -> None:
    config, _ = everything()
    down = Catalog([
        *ORDERS_INSTANCES,
        instance("users-service", "10.0.0.5:8443", {"app": "users"}, "unhealthy"),
        instance("users-service", "10.0.0.6:8443", {"app": "users"}, "unhealthy"),
    ])  # fmt: skip
    explanation = explain(config, down, caller=ORDERS, service="users-service",
                          path="/api/v1/users")  # fmt: skip
    assert (explanation.outcome, explanation.allowed, explanation.status) == (
        "unavailable", False, 503
    )  # fmt: skip
    reason = "503: no healthy instance of users-service (2 unhealthy: 10.0.0.5:8443, 10.0.0.6:8443)"
    assert f"{reason}  [Service users-service]" in explanation.lines()
    assert explanation.lines()[-1] == (
        f"not served: requests get {reason}  [Service users-service spec.ports[0]]"
    )
    document = explanation.to_json()
    assert (document["outcome"], document["status"]) == ("unavailable", 503)
    assert document["destinations"][0]["unavailable"] == reason


def test_a_split_share_no_instance_serves_names_its_share_and_instances() -> None:
    config = configured(SPLIT)
    waiting = Catalog([
        instance("reviews", "10.0.1.1:8443", {"version": "v1"}, spiffe_id=REVIEWS),
        *(instance("reviews", f"10.0.2.{n}:8443", {"version": "v2"}, "unknown", REVIEWS)
          for n in range(1, 6)),
    ])  # fmt: skip
    explanation = explain(config, waiting, caller=ORDERS, service="reviews", path="/reviews/1")
    assert (explanation.outcome, explanation.status) == ("unavailable", 503)
    assert explanation.lines()[-1].startswith(
        "not served: 10% of requests get 503: no healthy instance of reviews subset v2 "
        "(5 not checked yet: 10.0.2.1:8443, 10.0.2.2:8443, 10.0.2.3:8443 and 2 more)  ["
    )
