"""DestinationRule: a full example, and what a new user gets wrong."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import DestinationRule, parse_documents, parse_resource
from tests.unit.mesh.documents import REMOVE, errors, load, with_field

FULL = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 100
        maxRequestsPerConnection: 0
        maxRetries: 3
        idleTimeout: 60s
    outlierDetection:
      consecutive5xxErrors: 5
      consecutiveGatewayErrors: 2
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2, track: canary}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true}}
"""

RULE = load(FULL)
NAME = "DestinationRule reviews"


def test_full_example() -> None:
    [resource] = parse_documents(FULL)
    assert isinstance(resource, DestinationRule)
    policy = resource.spec.traffic_policy
    assert policy is not None and policy.outlier_detection is not None
    assert policy.outlier_detection.consecutive_5xx_errors == 5
    assert policy.connection_pool is not None and policy.connection_pool.http is not None
    assert policy.connection_pool.http.http1_max_pending_requests == 10
    assert resource.spec.subsets is not None
    assert [subset.name for subset in resource.spec.subsets] == ["v1", "v2", "v3"]
    document = resource.to_document()
    assert document["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 5
    assert parse_resource(document) == resource


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.host", REMOVE, "spec.host is required"),
        (
            "spec.trafficPolicy.loadBalancer.simple",
            "LEAST_CONN",
            "spec.trafficPolicy.loadBalancer.simple must be ROUND_ROBIN, LEAST_REQUEST or "
            "RANDOM, not 'LEAST_CONN'",
        ),
        (
            "spec.trafficPolicy.loadBalancer.simple",
            "round_robin",
            "spec.trafficPolicy.loadBalancer.simple must be ROUND_ROBIN, LEAST_REQUEST or "
            "RANDOM, not 'round_robin'",
        ),
        (
            "spec.trafficPolicy.loadBalancer",
            {},
            "spec.trafficPolicy.loadBalancer must set simple or consistentHash",
        ),
        (
            "spec.trafficPolicy.loadBalancer.consistentHash",
            {"useSourceIp": True},
            "spec.trafficPolicy.loadBalancer must set simple or consistentHash, not both",
        ),
        (
            "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash",
            {"httpHeaderName": "x-user", "useSourceIp": True},
            "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash must set httpHeaderName "
            "or useSourceIp: true, not both",
        ),
        (
            "spec.subsets[2].trafficPolicy.loadBalancer.consistentHash.useSourceIp",
            False,
            "spec.subsets[2].trafficPolicy.loadBalancer.consistentHash must set httpHeaderName "
            "or useSourceIp: true",
        ),
        (
            "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash",
            {"httpCookie": {"name": "user"}},
            "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.httpCookie is not supported",
        ),
        (
            "spec.trafficPolicy.tls",
            {"mode": "ISTIO_MUTUAL"},
            "spec.trafficPolicy.tls is not supported",
        ),
        (
            "spec.trafficPolicy.portLevelSettings",
            [],
            "spec.trafficPolicy.portLevelSettings is not supported",
        ),
        (
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            0,
            "spec.trafficPolicy.connectionPool.tcp.maxConnections must be a count from 1 to "
            "2147483647, got 0",
        ),
        (
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            -1,
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors must be a count from 0 "
            "to 2147483647, got -1",
        ),
        (
            "spec.trafficPolicy.outlierDetection.consecutiveErrors",
            5,
            "spec.trafficPolicy.outlierDetection.consecutiveErrors is not supported (did you mean "
            "consecutive5xxErrors?)",
        ),
        (
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            150,
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent must be a weight from 0 to "
            "100, got 150",
        ),
        (
            "spec.trafficPolicy.outlierDetection.interval",
            "10",
            "spec.trafficPolicy.outlierDetection.interval must be a duration: a number with a "
            "unit h, m, s or ms, e.g. 2s, 100ms, 1.5s, 1m",
        ),
        ("spec.subsets[1].name", "v1", "spec.subsets has two subsets named v1"),
        ("spec.subsets[0].labels", REMOVE, "spec.subsets[0].labels is required"),
        ("spec.subsets[0].labels", {}, "spec.subsets[0].labels must not be empty"),
        ("spec.exportTo", ["*"], "spec.exportTo is not supported"),
    ],
)
def test_refused(path: str, value: Any, expected: str) -> None:
    assert errors(with_field(RULE, path, value)) == [f"{NAME}: {expected}"]
