"""VirtualService: a full example, and what a new user gets wrong."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import VirtualService, parse_documents, parse_resource
from tests.unit.mesh.documents import REMOVE, errors, load, with_field

FULL = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
  labels: {app: reviews}
  annotations: {owner: team-reviews}
spec:
  hosts: [reviews, reviews.default.svc.cluster.local]
  gateways: [mesh, istio-system/public-gateway]
  http:
  - name: testers
    match:
    - name: by-header
      headers:
        x-tester: {exact: "yes"}
        x-debug: {}
        cookie: {regex: "^(.*?;)?(user=jason)(;.*)?$"}
    - queryParams: {canary: {exact: "1"}, v: {prefix: "2"}}
      sourceLabels: {app: frontend}
    - uri: {prefix: /reviews/}
      method: {regex: "GET|HEAD"}
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      headers:
        request: {set: {x-version: v2}}
  - match:
    - uri: {regex: "^/reviews/[0-9]+$"}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews.default.svc.cluster.local, subset: v2}
      weight: 10
    rewrite: {uri: /v1/reviews/, authority: reviews-v1}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,connect-failure,503"}
    fault:
      delay: {fixedDelay: 100ms, percentage: {value: 0.5}}
      abort: {httpStatus: 503, percentage: {value: 1}}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 5}
    headers:
      request: {add: {x-route: split}, remove: [x-legacy]}
      response: {set: {cache-control: no-store}}
  - match: [{uri: {exact: /old}}]
    redirect:
      {uri: /new, authority: reviews.example.com, port: 8443, scheme: https, redirectCode: 308}
  - route:
    - destination: {host: reviews}
"""

VS = load(FULL)
NAME = "VirtualService reviews"
WEIGHTS = "(with several destinations, one without a weight counts as 0)"


def test_full_example() -> None:
    [resource] = parse_documents(FULL)
    assert isinstance(resource, VirtualService)
    assert resource.metadata.namespace == "default"
    assert resource.gateway_names == ("mesh", "public-gateway")
    testers, split, redirect, default = resource.spec.http
    assert testers.match is not None
    assert testers.match[0].headers is not None
    assert testers.match[0].headers["x-debug"].exact is None  # presence
    assert testers.match[1].query_params is not None
    assert testers.match[1].query_params["v"].prefix == "2"
    assert split.route is not None
    assert [d.weight for d in split.route] == [90, 10]
    assert split.retries is not None and split.retries.per_try_timeout == "500ms"
    assert split.fault is not None and split.fault.delay is not None
    assert split.fault.delay.percentage is not None
    assert split.fault.delay.percentage.value == 0.5
    assert redirect.redirect is not None and redirect.redirect.redirect_code == 308
    assert default.route is not None and default.route[0].weight is None
    assert parse_resource(resource.to_document()) == resource


def test_the_gateways_default_to_the_mesh() -> None:
    resource = parse_resource(with_field(VS, "spec.gateways", REMOVE))
    assert isinstance(resource, VirtualService)
    assert resource.gateway_names == ("mesh",)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        # Weights
        (
            "spec.http[1].route[0].weight",
            80,
            f"spec.http[1].route must have weights that add up to 100, not 90 {WEIGHTS}",
        ),
        (
            "spec.http[1].route[0].weight",
            REMOVE,
            f"spec.http[1].route must have weights that add up to 100, not 10 {WEIGHTS}",
        ),
        (
            "spec.http[3].route[0].weight",
            50,
            f"spec.http[3].route must have weights that add up to 100, not 50 {WEIGHTS}",
        ),
        (
            "spec.http[3].route[0].weight",
            101,
            "spec.http[3].route[0].weight must be a weight from 0 to 100, got 101",
        ),
        ("spec.http[3].route", [], "spec.http[3].route must not be empty"),
        # Matches
        (
            "spec.http[1].match[0].uri.regex",
            "^/reviews/(?!admin)",
            "spec.http[1].match[0].uri.regex must be an RE2 regular expression: invalid perl "
            "operator: (?! (RE2 has no lookahead)",
        ),
        (
            "spec.http[1].match[0].uri.regex",
            "[0-9",
            "spec.http[1].match[0].uri.regex must be an RE2 regular expression: missing ]: [0-9",
        ),
        (
            "spec.http[1].match[0].uri",
            {"exact": "/a", "prefix": "/b"},
            "spec.http[1].match[0].uri must set only one of exact, prefix and regex, not "
            "exact and prefix",
        ),
        (
            "spec.http[1].match[0].uri",
            {},
            "spec.http[1].match[0].uri must set one of exact, prefix or regex",
        ),
        (
            "spec.http[1].match[0].uri",
            {"exact": "reviews"},
            "spec.http[1].match[0].uri.exact must start with '/'",
        ),
        (
            "spec.http[1].match[0]",
            {},
            "spec.http[1].match[0] must set at least one of uri, method, headers, queryParams "
            "or sourceLabels (a route without match takes every request)",
        ),
        (
            "spec.http[1].match[0].ignoreUriCase",
            True,
            "spec.http[1].match[0].ignoreUriCase is not supported",
        ),
        (
            "spec.http[0].match[0].headers.X-Tester",
            {"exact": "yes"},
            "spec.http[0].match[0].headers[X-Tester] must be a header name: lower-case "
            "letters, digits and '-' (an HTTP token), e.g. x-request-id",
        ),
        (
            "spec.http[0].match[2].method",
            {"exact": "get"},
            "spec.http[0].match[2].method.exact must be an HTTP method in upper case, e.g. GET",
        ),
        (
            "spec.http[0].match[1].queryParams.canary",
            {},
            "spec.http[0].match[1].queryParams[canary] must set one of exact, prefix or regex",
        ),
        # What a route does
        (
            "spec.http[3].redirect",
            {"uri": "/x"},
            "spec.http[3] cannot have route with a redirect (a redirect answers the request "
            "itself)",
        ),
        ("spec.http[3].route", REMOVE, "spec.http[3] must have a route or a redirect"),
        (
            "spec.http[2].rewrite",
            {"uri": "/x"},
            "spec.http[2] cannot have rewrite with a redirect (a redirect answers the request "
            "itself)",
        ),
        (
            "spec.http[2].redirect",
            {"redirectCode": 301},
            "spec.http[2].redirect must set at least one of uri, authority, port or scheme",
        ),
        (
            "spec.http[2].redirect.redirectCode",
            300,
            "spec.http[2].redirect.redirectCode must be 301, 302, 303, 307 or 308, not 300",
        ),
        (
            "spec.http[2].redirect.scheme",
            "ftp",
            "spec.http[2].redirect.scheme must be http or https, not 'ftp'",
        ),
        (
            "spec.http[1].rewrite",
            {},
            "spec.http[1].rewrite must set uri, authority or both",
        ),
        (
            "spec.http[1].rewrite.uriRegexRewrite",
            {"match": "^/a", "rewrite": "/b"},
            "spec.http[1].rewrite.uriRegexRewrite is not supported",
        ),
        (
            "spec.http[1].mirror",
            REMOVE,
            "spec.http[1] cannot have mirrorPercentage without a mirror",
        ),
        (
            "spec.http[1].mirrorPercentage.value",
            120,
            "spec.http[1].mirrorPercentage.value must be a percentage from 0 to 100, got 120",
        ),
        # Timeouts, retries, faults
        (
            "spec.http[1].timeout",
            "5",
            "spec.http[1].timeout must be a duration: a number with a unit h, m, s or ms, e.g. "
            "2s, 100ms, 1.5s, 1m",
        ),
        (
            "spec.http[1].timeout",
            5,
            "spec.http[1].timeout must be a duration such as 2s, 100ms or 1m, not an integer (5)",
        ),
        ("spec.http[1].timeout", "0s", "spec.http[1].timeout must be at least 1ms"),
        ("spec.http[1].timeout", "48h", "spec.http[1].timeout must be at most 24h"),
        ("spec.http[1].retries.attempts", REMOVE, "spec.http[1].retries.attempts is required"),
        (
            "spec.http[1].retries.attempts",
            50,
            "spec.http[1].retries.attempts must be a number of attempts from 0 to 10, got 50",
        ),
        (
            "spec.http[1].retries.retryOn",
            "5xx;reset",
            "spec.http[1].retries.retryOn has '5xx;reset', which is not a retry condition; use "
            "a comma separated list of 5xx, gateway-error, reset, reset-before-request, "
            "connect-failure, envoy-ratelimited, retriable-4xx, refused-stream, "
            "retriable-status-codes, retriable-headers, http3-post-connect-failure, cancelled, "
            "deadline-exceeded, internal, resource-exhausted, unavailable or HTTP status codes "
            "(503)",
        ),
        ("spec.http[1].fault", {}, "spec.http[1].fault must set delay, abort or both"),
        (
            "spec.http[1].fault.abort.httpStatus",
            700,
            "spec.http[1].fault.abort.httpStatus must be an HTTP status from 200 to 599, got 700",
        ),
        (
            "spec.http[1].fault.delay.fixedDelay",
            REMOVE,
            "spec.http[1].fault.delay.fixedDelay is required",
        ),
        (
            "spec.http[1].fault.delay.percent",
            50,
            "spec.http[1].fault.delay.percent is not supported (did you mean percentage?)",
        ),
        (
            "spec.http[1].fault.abort.grpcStatus",
            "UNAVAILABLE",
            "spec.http[1].fault.abort.grpcStatus is not supported",
        ),
        # Headers
        (
            "spec.http[1].headers.request.set",
            {"x-a": "b\r\nx-injected: 1"},
            "spec.http[1].headers.request.set[x-a] must not contain a line break or a NUL "
            "character",
        ),
        (
            "spec.http[1].headers.request.remove",
            ["x-a", "x-a"],
            "spec.http[1].headers.request.remove has 'x-a' twice",
        ),
        # Destinations
        (
            "spec.http[3].route[0].destination.host",
            "*",
            "spec.http[3].route[0].destination.host must name a Service; a destination cannot "
            "be a wildcard",
        ),
        (
            "spec.http[3].route[0].destination.port",
            {"number": 0},
            "spec.http[3].route[0].destination.port.number must be a port number from 1 to "
            "65535, got 0",
        ),
        (
            "spec.http[3].route[0].destination.port",
            9080,
            "spec.http[3].route[0].destination.port must be a mapping: write port: {number: "
            "9080}, as Istio does",
        ),
        (
            "spec.http[3].route[0].destination.port",
            {},
            "spec.http[3].route[0].destination.port.number is required",
        ),
        (
            "spec.http[3].route[0].destination.subset",
            "V1",
            "spec.http[3].route[0].destination.subset must be a DNS-1123 label: lower-case "
            "letters, digits and '-', starting and ending with a letter or digit, at most 63 "
            "characters (e.g. users-service)",
        ),
        # The resource
        ("spec.hosts", [], "spec.hosts must not be empty"),
        ("spec.hosts", ["reviews", "reviews"], "spec.hosts has 'reviews' twice"),
        (
            "spec.gateways",
            ["Public Gateway"],
            "spec.gateways[0] must be 'mesh' or the name of a Gateway (optionally "
            "'namespace/name')",
        ),
        ("spec.http", REMOVE, "spec.http is required"),
        ("spec.tcp", [{"route": []}], "spec.tcp is not supported"),
        ("spec.exportTo", ["."], "spec.exportTo is not supported"),
    ],
)
def test_refused(path: str, value: Any, expected: str) -> None:
    assert errors(with_field(VS, path, value)) == [f"{NAME}: {expected}"]


def test_a_weight_error_does_not_hide_another_route_s() -> None:
    document = with_field(VS, "spec.http[1].route[0].weight", 80)
    document = with_field(document, "spec.http[0].corsPolicy", {"allowOrigins": []})
    assert errors(document) == [
        f"{NAME}: spec.http[0].corsPolicy is not supported",
        f"{NAME}: spec.http[1].route must have weights that add up to 100, not 90 {WEIGHTS}",
    ]
