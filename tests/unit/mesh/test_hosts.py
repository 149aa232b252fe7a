"""Hosts, and the Service a host names."""

from __future__ import annotations

import pytest

from mesh.hosts import (
    check_authority,
    check_destination_host,
    check_gateway_host,
    check_gateway_reference,
    check_route_host,
    gateway_name,
    hosts_overlap,
    service_name,
)


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("users-service", "users-service"),
        ("users-service.default.svc", "users-service"),
        ("users-service.default.svc.cluster.local", "users-service"),
        ("users-service.prod.svc.cluster.local", "users-service"),
        ("users-service.default", None),
        ("api.example.com", None),
        ("users.a.b.svc.cluster.local", None),
        ("users-service.svc.cluster.local", None),
        ("*", None),
    ],
)
def test_service_name(host: str, name: str | None) -> None:
    assert service_name(host) == name


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("*", "api.example.com", True),
        ("api.example.com", "*", True),
        ("*.example.com", "api.example.com", True),
        ("api.example.com", "*.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "*.api.example.com", True),
        ("*.a.com", "*.b.com", False),
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
    ],
)
def test_hosts_overlap(first: str, second: str, overlap: bool) -> None:
    assert hosts_overlap(first, second) is overlap


ROUTE_HOST = (
    "must be a lower-case DNS name (reviews, api.example.com), a wildcard '*.example.com' or '*'"
)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (check_route_host, "Reviews", ROUTE_HOST),
        (check_route_host, "api.*.com", ROUTE_HOST),
        (check_route_host, "*example.com", ROUTE_HOST),
        (check_route_host, "reviews:9080", ROUTE_HOST),
        (check_gateway_host, "prod/API.example.com", ROUTE_HOST),
        (
            check_gateway_host,
            "Prod/api.example.com",
            "must be a host with an optional namespace prefix ('./', '*/' or a DNS label and "
            "'/'), e.g. api.example.com",
        ),
        (check_destination_host, "*", "must name a Service; a destination cannot be a wildcard"),
        (
            check_destination_host,
            "users_service",
            "must be a Service's name (users-service) or its fully qualified name "
            "(users-service.default.svc.cluster.local)",
        ),
        (
            check_gateway_reference,
            "Gateway_1",
            "must be 'mesh' or the name of a Gateway (optionally 'namespace/name')",
        ),
        (
            check_authority,
            "api.example.com:0",
            "must be a lower-case DNS name with an optional port, e.g. api.example.com:8080",
        ),
        (
            check_authority,
            "api.example.com:http",
            "must be a lower-case DNS name with an optional port, e.g. api.example.com:8080",
        ),
    ],
)
def test_refused(check: object, value: str, message: str) -> None:
    assert callable(check)
    with pytest.raises(ValueError) as caught:
        check(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (check_route_host, "*"),
        (check_route_host, "*.example.com"),
        (check_route_host, "reviews"),
        (check_gateway_host, "./api.example.com"),
        (check_gateway_host, "*/api.example.com"),
        (check_gateway_host, "prod/*"),
        (check_destination_host, "reviews.default.svc.cluster.local"),
        (check_gateway_reference, "mesh"),
        (check_gateway_reference, "istio-system/public-gateway"),
        (check_authority, "api.example.com"),
        (check_authority, "api.example.com:8443"),
    ],
)
def test_accepted(check: object, value: str) -> None:
    assert callable(check)
    check(value)


def test_gateway_name_drops_the_namespace() -> None:
    assert gateway_name("istio-system/public-gateway") == "public-gateway"
    assert gateway_name("public-gateway") == "public-gateway"
