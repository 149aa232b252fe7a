"""AuthorizationPolicy: a full example, and what a new user gets wrong."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import AuthorizationPolicy, parse_documents, parse_resource
from mesh.principals import parse_principal
from tests.unit.mesh.documents import REMOVE, errors, load, with_field

FULL = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: users}
spec:
  selector: {matchLabels: {app: users}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["spiffe://example.org/orders", "spiffe://example.org/team/*"]
        notPrincipals: ["spiffe://example.org/team/intern"]
    - source: {principals: ["*"]}
    to:
    - operation:
        methods: [GET, HEAD]
        notMethods: [DELETE]
        paths: ["/api/v1/users/*", "*.json", /health]
        notPaths: ["/api/v1/users/admin"]
    when:
    - key: request.auth.claims[groups]
      values: [admins, ops]
    - key: request.auth.claims[realm][role]
      notValues: [guest]
  - {}
"""

POLICY = load(FULL)
NAME = "AuthorizationPolicy users"


def test_full_example() -> None:
    [resource] = parse_documents(FULL)
    assert isinstance(resource, AuthorizationPolicy)
    assert resource.spec.effective_action == "DENY"
    assert resource.spec.rules is not None
    first, match_all = resource.spec.rules
    assert first.from_ is not None and first.from_[0].source.principals is not None
    patterns = [parse_principal(text) for text in first.from_[0].source.principals]
    assert [p.matches("spiffe://example.org/team/a") for p in patterns] == [False, True]
    assert match_all.from_ is None and match_all.to is None and match_all.when is None
    document = resource.to_document()
    assert "from" in document["spec"]["rules"][0]
    assert parse_resource(document) == resource


def test_allow_nothing() -> None:
    [resource] = parse_documents(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all}\nspec: {}\n"
    )
    assert isinstance(resource, AuthorizationPolicy)
    assert resource.spec.effective_action == "ALLOW"
    assert resource.spec.rules is None


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "spec.action",
            "CUSTOM",
            "spec.action must be ALLOW, DENY or AUDIT, not 'CUSTOM'",
        ),
        ("spec.provider", {"name": "opa"}, "spec.provider is not supported"),
        (
            "spec.selector",
            {"app": "users"},
            ["spec.selector.matchLabels is required", "spec.selector.app is not supported"],
        ),
        (
            "spec.rules[0].from[0].source.principals",
            ["cluster.local/ns/default/sa/orders"],
            "spec.rules[0].from[0].source.principals[0] must be a SPIFFE ID "
            "(spiffe://example.org/web), a prefix ending in '/*' (spiffe://example.org/team/*) "
            "or '*'; Istio's 'cluster.local/ns/default/sa/orders' is written "
            "spiffe://cluster.local/ns/default/sa/orders",
        ),
        (
            "spec.rules[0].from[0].source.principals",
            ["spiffe://example.org/team*"],
            "spec.rules[0].from[0].source.principals[0] may have '*' only as a whole last path "
            "segment (spiffe://example.org/team/*): a prefix ends at a '/'",
        ),
        (
            "spec.rules[0].from[0].source.principals",
            "spiffe://example.org/orders",
            "spec.rules[0].from[0].source.principals must be a list, not a string "
            "('spiffe://example.org/orders')",
        ),
        (
            "spec.rules[0].from[1].source",
            {},
            "spec.rules[0].from[1].source must set principals, notPrincipals or both",
        ),
        (
            "spec.rules[0].from[1].source.namespaces",
            ["default"],
            "spec.rules[0].from[1].source.namespaces is not supported",
        ),
        (
            "spec.rules[0].from[1].source.requestPrincipals",
            ["*"],
            "spec.rules[0].from[1].source.requestPrincipals is not supported",
        ),
        (
            "spec.rules[0].from[1]",
            {"principals": ["*"]},
            [
                "spec.rules[0].from[1].source is required",
                "spec.rules[0].from[1].principals is not supported",
            ],
        ),
        (
            "spec.rules[0].to[0].operation",
            {},
            "spec.rules[0].to[0].operation must set at least one of methods, notMethods, paths "
            "or notPaths",
        ),
        (
            "spec.rules[0].to[0].operation.methods",
            ["get"],
            "spec.rules[0].to[0].operation.methods[0] must be an HTTP method in upper case, "
            "e.g. GET",
        ),
        (
            "spec.rules[0].to[0].operation.paths",
            ["/api/*/users"],
            "spec.rules[0].to[0].operation.paths[0] may have '*' only at its start (a suffix, "
            "*.png) or its end (a prefix, /api/*), or be '*'",
        ),
        (
            "spec.rules[0].to[0].operation.ports",
            ["8080"],
            "spec.rules[0].to[0].operation.ports is not supported",
        ),
        (
            "spec.rules[0].when[0].key",
            "source.ip",
            "spec.rules[0].when[0].key must be request.auth.claims[<claim>] (e.g. "
            "request.auth.claims[groups], or request.auth.claims[a][b] for a nested claim): "
            "Tessera's conditions read the claims of the caller's validated JWT",
        ),
        (
            "spec.rules[0].when[0].values",
            REMOVE,
            "spec.rules[0].when[0] must set values, notValues or both",
        ),
        ("spec.rules[0].when", [], "spec.rules[0].when must not be empty"),
        ("spec.targetRef", {"kind": "Gateway"}, "spec.targetRef is not supported"),
    ],
)
def test_refused(path: str, value: Any, expected: str | list[str]) -> None:
    expected = [expected] if isinstance(expected, str) else expected
    assert errors(with_field(POLICY, path, value)) == [f"{NAME}: {line}" for line in expected]
