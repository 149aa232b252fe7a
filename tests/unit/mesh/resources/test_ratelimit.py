"""Tessera's RateLimit: CLI.md's example, and what a new user gets wrong."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import RateLimit, parse_documents, parse_resource
from tests.unit.mesh.documents import REMOVE, errors, load, with_field

EXAMPLE = """\
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {name: orders-to-users}
spec:
  service: users-service
  from: {principals: [spiffe://example.org/orders]}   # omitted: each caller gets its own bucket
  requestsPerSecond: 50
  burst: 100
"""

LIMIT = load(EXAMPLE)
NAME = "RateLimit orders-to-users"


def test_cli_md_s_example() -> None:
    [resource] = parse_documents(EXAMPLE)
    assert isinstance(resource, RateLimit)
    assert resource.spec.from_ is not None
    assert resource.spec.from_.principals == ("spiffe://example.org/orders",)
    assert resource.spec.bucket_size == 100
    assert resource.to_document()["spec"]["from"] == {"principals": ["spiffe://example.org/orders"]}
    assert parse_resource(resource.to_document()) == resource


def test_each_caller_its_own_bucket_of_one_second() -> None:
    resource = parse_resource(
        with_field(with_field(LIMIT, "spec.from", REMOVE), "spec.burst", REMOVE)
    )
    assert isinstance(resource, RateLimit)
    assert resource.spec.from_ is None
    assert resource.spec.bucket_size == 50


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.service", REMOVE, "spec.service is required"),
        (
            "spec.service",
            "users-service.default.svc.cluster.local",
            "spec.service must be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters (e.g. "
            "users-service)",
        ),
        ("spec.requestsPerSecond", REMOVE, "spec.requestsPerSecond is required"),
        (
            "spec.requestsPerSecond",
            0,
            "spec.requestsPerSecond must be from 1 to 1,000,000, got 0",
        ),
        (
            "spec.requestsPerSecond",
            "50",
            "spec.requestsPerSecond must be an integer, not a string ('50')",
        ),
        ("spec.burst", 0, "spec.burst must be from 1 to 1,000,000, got 0"),
        ("spec.from", {}, "spec.from.principals is required"),
        ("spec.from.principals", [], "spec.from.principals must not be empty"),
        (
            "spec.from.principals",
            ["orders"],
            "spec.from.principals[0] must be a SPIFFE ID (spiffe://example.org/web), a prefix "
            "ending in '/*' (spiffe://example.org/team/*) or '*'",
        ),
        ("spec.requestsPerMinute", 5, "spec.requestsPerMinute is not supported"),
    ],
)
def test_refused(path: str, value: Any, expected: str) -> None:
    assert errors(with_field(LIMIT, path, value)) == [f"{NAME}: {expected}"]
