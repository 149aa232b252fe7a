"""Requests as routes and policies see them; the catalog; matching helpers of the view."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mesh import Catalog, HttpRequest
from mesh.catalog import is_routable
from mesh.principals import parse_principal
from mesh.request import remove_dot_segments, split_host
from mesh.view import (
    ClaimCondition,
    OperationMatch,
    PeerMatch,
    RateLimitRule,
    Source,
    StringMatch,
    format_duration,
    host_matches,
)
from tests.unit.mesh.meshes import ORDERS, USERS, instance


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/", "/"),
        ("/a/b/../c/./d", "/a/c/d"),
        ("/public/../admin", "/admin"),
        ("/..", "/"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/../../etc", "/etc"),
        ("/a//b", "/a//b"),
    ],
)
def test_dot_segments_are_resolved(path: str, normal: str) -> None:
    assert remove_dot_segments(path) == normal


def test_a_request_s_path_query_and_headers() -> None:
    request = HttpRequest.of("get", "/api/./v1/users?page=2&page=3&q=", {"X-User": "ada"})
    assert (request.method, request.uri_path) == ("GET", "/api/v1/users")
    assert request.query_params == {"page": "2", "q": ""}
    assert request.header("x-user") == request.header("X-USER") == "ada"


@pytest.mark.parametrize(
    ("authority", "split"),
    [
        ("Api.Example.com", ("api.example.com", None)),
        ("api.example.com:8443", ("api.example.com", 8443)),
        ("[::1]:80", ("::1", 80)),
        ("host:99999", ("host:99999", None)),
    ],
)
def test_host_headers(authority: str, split: tuple[str, int | None]) -> None:
    assert split_host(authority) == split


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("*", "anything", True),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", True),
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
    ],
)
def test_host_patterns(pattern: str, host: str, matches: bool) -> None:
    assert host_matches(pattern, host) is matches


@pytest.mark.parametrize(
    ("match", "value", "matches"),
    [
        (StringMatch("exact", "/a"), "/a", True),
        (StringMatch("exact", "/a"), "/a/", False),
        (StringMatch("prefix", "/a"), "/ab", True),
        (StringMatch("regex", "/v[0-9]+"), "/v12", True),
        (StringMatch("regex", "/v[0-9]+"), "/v12/x", False),  # RE2 on the whole value
        (StringMatch("present"), "", True),
        (StringMatch("present"), None, False),
        (StringMatch("prefix", ""), None, False),
    ],
)
def test_string_matches(match: StringMatch, value: str | None, matches: bool) -> None:
    assert match.matches(value) is matches


@pytest.mark.parametrize(
    ("operation", "method", "path", "matches"),
    [
        (OperationMatch(("GET",), None, ("/api/*",), None), "GET", "/api/x", True),
        (OperationMatch(("GET",), None, ("/api/*",), None), "GET", "/apix", False),
        (OperationMatch(None, ("GET",), None, None), "GET", "/", False),
        (OperationMatch(None, None, ("*.png",), None), "PUT", "/a/b.png", True),
        (OperationMatch(None, None, ("*",), ("/admin",)), "GET", "/admin", False),
        (OperationMatch(None, None, ("/exact",), None), "GET", "/exact?x=1", True),
    ],
)
def test_operations(operation: OperationMatch, method: str, path: str, matches: bool) -> None:
    assert operation.matches(HttpRequest.of(method, path)) is matches


@pytest.mark.parametrize(
    ("peer", "caller", "matches"),
    [
        (PeerMatch(("spiffe://example.org/team/*",), None), "spiffe://example.org/team/a", True),
        (PeerMatch(("spiffe://example.org/team/*",), None), "spiffe://example.org/team-x", False),
        (PeerMatch(("*",), None), None, False),
        (PeerMatch(None, (ORDERS,)), ORDERS, False),
        (PeerMatch(None, (ORDERS,)), None, True),
        (PeerMatch(("*",), (ORDERS,)), USERS, True),
    ],
)
def test_peers(peer: PeerMatch, caller: str | None, matches: bool) -> None:
    assert peer.matches(caller) is matches


def test_claim_conditions() -> None:
    condition = ClaimCondition(("groups",), ("admin*",), None)
    assert condition.key == "request.auth.claims[groups]"
    assert condition.matches({"groups": ["dev", "admins"]})
    assert not condition.matches({"groups": []})
    assert ClaimCondition(("verified",), ("true",), None).matches({"verified": True})


def test_rate_limit_buckets() -> None:
    shared = RateLimitRule("shared", (ORDERS,), 10, 20, Source("RateLimit", "shared", "spec"))
    each = RateLimitRule("each", None, 10, 10, Source("RateLimit", "each", "spec"))
    assert (shared.applies_to(ORDERS), shared.applies_to(USERS)) == (True, False)
    assert shared.bucket(ORDERS) == "shared"
    assert (each.bucket(ORDERS), each.bucket(USERS)) == (f"each|{ORDERS}", f"each|{USERS}")


@pytest.mark.parametrize(
    ("health", "has_check", "routable"),
    [
        ("healthy", True, True),
        ("healthy", False, True),
        ("unhealthy", False, False),
        ("unknown", True, False),
        ("unknown", False, True),
    ],
)
def test_which_instances_are_routed_to(health: str, has_check: bool, routable: bool) -> None:
    item = instance("users-service", "10.0.0.1:8443", health=health)  # type: ignore[arg-type]
    assert is_routable(item, has_health_check=has_check) is routable


def test_the_catalog_sorts_instances_and_freezes_labels() -> None:
    labels = {"b": "2", "a": "1"}
    first = instance("users-service", "10.0.0.9:8443", labels)
    catalog = Catalog(
        [first, instance("users-service", "10.0.0.10:8443"), instance("a", "1.1.1.1:1")]
    )
    labels["c"] = "3"
    assert catalog.services() == ("a", "users-service")
    assert [str(item.address) for item in catalog.instances("users-service")] == [
        "10.0.0.10:8443",
        "10.0.0.9:8443",
    ]
    assert dict(first.labels) == {"a": "1", "b": "2"}
    assert first.to_json() == {
        "service": "users-service",
        "address": "10.0.0.9:8443",
        "node": "spiffe://example.org/spire/agent/node-1",
        "labels": {"a": "1", "b": "2"},
        "health": "healthy",
        "since": "2025-01-01T00:00:00+00:00",
        "spiffeId": USERS,
        "detail": None,
    }
    assert catalog.instances("ghost") == ()
    assert len(catalog) == 3


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(seconds=10), "10s"),
        (timedelta(milliseconds=1500), "1.5s"),
        (timedelta(milliseconds=100), "0.1s"),
        (timedelta(milliseconds=1), "0.001s"),
        (timedelta(hours=1), "3600s"),
    ],
)
def test_durations_are_spelt_as_istio_s_json(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


def test_principal_patterns_are_the_model_s() -> None:
    assert parse_principal("spiffe://example.org/*").matches(ORDERS)
