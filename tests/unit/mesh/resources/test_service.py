"""Tessera's Service: a full example, and what a new user gets wrong."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import Service, parse_documents, parse_resource
from tests.unit.mesh.documents import REMOVE, SERVICE, USERS_SERVICE, errors, with_field

NAME = "Service users-service"

FULL = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: orders, labels: {team: shop}}
spec:
  spiffeIds: [spiffe://example.org/orders, spiffe://example.org/orders-canary]
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  - {number: 9090, name: grpc, protocol: GRPC}
  - {number: 8443, protocol: HTTP2}
  - {number: 5432, name: db, protocol: TCP}
  healthCheck: {tcp: {}, interval: 5s, timeout: 1s}
"""


def test_cli_md_s_example() -> None:
    [resource] = parse_documents(USERS_SERVICE)
    assert isinstance(resource, Service)
    assert resource.spec.spiffe_ids == ("spiffe://example.org/users",)
    assert resource.spec.health_check is not None
    assert resource.spec.health_check.http is not None
    assert resource.spec.health_check.http.path == "/healthz"
    assert resource.port(80) is not None and resource.port(81) is None


def test_full_example() -> None:
    [resource] = parse_documents(FULL)
    assert isinstance(resource, Service)
    assert [port.protocol for port in resource.spec.ports] == ["HTTP", "GRPC", "HTTP2", "TCP"]
    assert resource.spec.health_check is not None and resource.spec.health_check.tcp is not None
    assert parse_resource(resource.to_document()) == resource


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "metadata.name",
            "users.service",
            "metadata.name must be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters (e.g. "
            "users-service)",
        ),
        ("spec.spiffeIds", REMOVE, "spec.spiffeIds is required"),
        ("spec.spiffeIds", [], "spec.spiffeIds must not be empty"),
        (
            "spec.spiffeIds",
            ["spiffe://example.org/users/*"],
            "spec.spiffeIds[0]: SPIFFE ID 'spiffe://example.org/users/*' is not valid: invalid "
            "character in path segment; expected spiffe://<trust-domain>/<path>, e.g. "
            "spiffe://example.org/web",
        ),
        (
            "spec.spiffeIds",
            ["example.org/users"],
            "spec.spiffeIds[0] must be a SPIFFE ID (spiffe://example.org/web), a prefix ending "
            "in '/*' (spiffe://example.org/team/*) or '*'; Istio's 'example.org/users' is "
            "written spiffe://example.org/users",
        ),
        ("spec.ports", [], "spec.ports must not be empty"),
        (
            "spec.ports[0].protocol",
            "http",
            "spec.ports[0].protocol must be HTTP, HTTP2, GRPC or TCP, not 'http'",
        ),
        ("spec.ports[0].protocol", REMOVE, "spec.ports[0].protocol is required"),
        (
            "spec.ports",
            [{"number": 80, "protocol": "HTTP"}, {"number": 80, "protocol": "GRPC"}],
            "spec.ports has port 80 twice",
        ),
        (
            "spec.ports",
            [
                {"number": 80, "name": "web", "protocol": "HTTP"},
                {"number": 81, "name": "web", "protocol": "HTTP"},
            ],
            "spec.ports has two ports named web",
        ),
        (
            "spec.healthCheck",
            {"interval": "2s"},
            "spec.healthCheck must set http or tcp",
        ),
        (
            "spec.healthCheck.tcp",
            {},
            "spec.healthCheck must set http or tcp, not both",
        ),
        (
            "spec.healthCheck.http.path",
            "healthz",
            "spec.healthCheck.http.path must start with '/'",
        ),
        (
            "spec.healthCheck.tcp",
            {"port": 80},
            "spec.healthCheck.tcp.port is not supported",
        ),
        (
            "spec.healthCheck.interval",
            "2",
            "spec.healthCheck.interval must be a duration: a number with a unit h, m, s or ms, "
            "e.g. 2s, 100ms, 1.5s, 1m",
        ),
        (
            "apiVersion",
            "networking.istio.io/v1",
            "apiVersion must be tessera.io/v1alpha1 for a Service, not 'networking.istio.io/v1'",
        ),
    ],
)
def test_refused(path: str, value: Any, expected: str) -> None:
    document = with_field(SERVICE, path, value)
    name = f"Service {document['metadata']['name']}"
    assert errors(document) == [f"{name}: {expected}"]
    assert name == NAME or path == "metadata.name"
