"""What must exist for a configuration to hold together, each error at its field."""

from __future__ import annotations

import pytest

from mesh import check_references, parse_documents
from tests.unit.mesh.documents import MISSION, USERS_SERVICE

REVIEWS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  spiffeIds: [spiffe://example.org/reviews]
  ports: [{number: 9080, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews.default.svc.cluster.local, subset: v2, port: {number: 9080}}
      weight: 50
"""


def problems(*texts: str) -> list[str]:
    resources = [resource for text in texts for resource in parse_documents(text)]
    return [str(error) for error in check_references(resources)]


def test_the_mission_s_example_needs_its_service() -> None:
    assert problems(MISSION) == [
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service"
    ]
    assert problems(MISSION, USERS_SERVICE) == []


def test_a_consistent_configuration() -> None:
    assert problems(REVIEWS) == []


def change(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            change(REVIEWS, "subset: v2, port", "subset: v3, port"),
            [
                "VirtualService reviews: spec.http[0].route[1].destination.subset: subset v3 is "
                "not defined by any DestinationRule for host reviews.default.svc.cluster.local"
            ],
            id="missing-subset",
        ),
        pytest.param(
            change(REVIEWS, "subsets:\n  - {name: v1, labels: {version: v1}}\n", "subsets:\n"),
            [
                "VirtualService reviews: spec.http[0].route[0].destination.subset: subset v1 is "
                "not defined by any DestinationRule for host reviews"
            ],
            id="subset-gone-from-the-rule",
        ),
        pytest.param(
            change(REVIEWS, "{number: 9080}}", "{number: 8080}}"),
            [
                "VirtualService reviews: spec.http[0].route[1].destination.port.number: port "
                "8080 is not a port of Service reviews (its ports: 9080)"
            ],
            id="missing-port",
        ),
        pytest.param(
            change(
                REVIEWS,
                "ports: [{number: 9080, name: http, protocol: HTTP}]",
                "ports: [{number: 9080, protocol: HTTP}, {number: 9090, protocol: GRPC}]",
            ),
            [
                "VirtualService reviews: spec.http[0].route[0].destination.port is required: "
                "Service reviews has several ports (9080, 9090)"
            ],
            id="port-needed",
        ),
        pytest.param(
            change(REVIEWS, "host: reviews, subset: v1}", "host: ratings, subset: v1}"),
            [
                "VirtualService reviews: spec.http[0].route[0].destination.host: host ratings "
                "names no Service"
            ],
            id="missing-host",
        ),
        pytest.param(
            change(
                REVIEWS,
                "host: reviews.default.svc.cluster.local",
                "host: ratings.default.svc.cluster.local",
            ),
            [
                "VirtualService reviews: spec.http[0].route[1].destination.host: host "
                "ratings.default.svc.cluster.local names no Service (it would be Service "
                "ratings)"
            ],
            id="missing-fqdn-host",
        ),
        pytest.param(
            change(REVIEWS, "host: reviews, subset: v1}", "host: reviews.example.com, subset: v1}"),
            [
                "VirtualService reviews: spec.http[0].route[0].destination.host: host "
                "reviews.example.com names no Service"
            ],
            id="external-host",
        ),
        pytest.param(
            REVIEWS + "    mirror: {host: shadow, subset: v1}\n",
            ["VirtualService reviews: spec.http[0].mirror.host: host shadow names no Service"],
            id="missing-mirror-host",
        ),
        pytest.param(
            REVIEWS + "    mirror: {host: reviews, subset: v9}\n",
            [
                "VirtualService reviews: spec.http[0].mirror.subset: subset v9 is not defined by "
                "any DestinationRule for host reviews"
            ],
            id="missing-mirror-subset",
        ),
        pytest.param(
            change(REVIEWS, "hosts: [reviews]", "hosts: [reviews, ratings]"),
            [
                "VirtualService reviews: spec.hosts[1]: host ratings names no Service; a "
                "VirtualService for the mesh routes the calls made to a Service (to route a "
                "gateway's requests, name the gateway in spec.gateways)"
            ],
            id="mesh-host-without-service",
        ),
        pytest.param(
            change(REVIEWS, "hosts: [reviews]", "hosts: [reviews]\n  gateways: [public]"),
            ["VirtualService reviews: spec.gateways[0]: Gateway public does not exist"],
            id="missing-gateway",
        ),
        pytest.param(
            change(REVIEWS, "  host: reviews\n", "  host: ratings\n"),
            [
                "VirtualService reviews: spec.http[0].route[0].destination.subset: subset v1 is "
                "not defined by any DestinationRule for host reviews",
                "VirtualService reviews: spec.http[0].route[1].destination.subset: subset v2 is "
                "not defined by any DestinationRule for host "
                "reviews.default.svc.cluster.local",
                "DestinationRule reviews: spec.host: host ratings names no Service",
            ],
            id="rule-for-a-missing-service",
        ),
        pytest.param(
            REVIEWS + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            "metadata: {name: reviews-lb}\n"
            "spec: {host: reviews.default.svc, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n",
            [
                "DestinationRule reviews-lb: spec.host: Service reviews already has "
                "DestinationRule reviews: one DestinationRule per Service (put the subsets and "
                "policies together)"
            ],
            id="two-rules-for-one-service",
        ),
        pytest.param(
            REVIEWS + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: reviews-canary}\n"
            "spec: {hosts: [reviews.default.svc.cluster.local], gateways: [mesh],"
            " http: [{route: [{destination: {host: reviews}}]}]}\n",
            [
                "VirtualService reviews-canary: spec.hosts[0]: host "
                "reviews.default.svc.cluster.local on gateway mesh is already routed by "
                "VirtualService reviews: put the routes of one host in one VirtualService"
            ],
            id="two-virtual-services-for-one-host",
        ),
        pytest.param(
            REVIEWS + "---\napiVersion: tessera.io/v1alpha1\nkind: RateLimit\n"
            "metadata: {name: to-ratings}\nspec: {service: ratings, requestsPerSecond: 5}\n",
            ["RateLimit to-ratings: spec.service: Service ratings does not exist"],
            id="rate-limit-for-a-missing-service",
        ),
    ],
)
def test_refused(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


GATEWAY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: istio-system}
spec:
  selector: {istio: public}
  servers:
  - port: {number: 80, protocol: HTTP}
    hosts: ["*.example.com"]
"""

EDGE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge}
spec:
  hosts: [HOST]
  gateways: [istio-system/public]
  http:
  - route: [{destination: {host: users-service}}]
"""


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", []),
        ("*", []),
        ("*.example.com", []),
        (
            "api.example.org",
            [
                "VirtualService edge: spec.gateways[0]: Gateway public serves none of this "
                "VirtualService's hosts (it serves *.example.com)"
            ],
        ),
    ],
)
def test_a_gateway_must_serve_a_host_of_the_virtual_service(host: str, expected: list[str]) -> None:
    assert problems(GATEWAY, EDGE.replace("HOST", f'"{host}"'), USERS_SERVICE) == expected


def test_a_gateway_s_virtual_service_need_not_name_services_by_its_hosts() -> None:
    both = EDGE.replace("HOST", "api.example.com").replace(
        "[istio-system/public]", "[istio-system/public, mesh]"
    )
    assert problems(GATEWAY, both, USERS_SERVICE) == [
        "VirtualService edge: spec.hosts[0]: host api.example.com names no Service; a "
        "VirtualService for the mesh routes the calls made to a Service (to route a gateway's "
        "requests, name the gateway in spec.gateways)"
    ]


def test_the_same_kind_and_name_twice() -> None:
    resources = parse_documents(USERS_SERVICE) * 2
    assert [str(error) for error in check_references(resources)] == [
        "Service users-service is defined twice"
    ]


def test_a_subset_no_rule_defines() -> None:
    text = change(
        REVIEWS,
        "{host: reviews.default.svc.cluster.local, subset: v2,",
        "{host: reviews, subset: v3,",
    )
    assert problems(text) == [
        "VirtualService reviews: spec.http[0].route[1].destination.subset: subset v3 is not "
        "defined by any DestinationRule for host reviews"
    ]
