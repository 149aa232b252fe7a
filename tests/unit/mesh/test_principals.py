"""SPIFFE ID patterns in policies: exact, prefix, any."""

from __future__ import annotations

import pytest

from mesh.principals import check_spiffe_id, parse_principal

FORMS = (
    "must be a SPIFFE ID (spiffe://example.org/web), a prefix ending in '/*' "
    "(spiffe://example.org/team/*) or '*'"
)
WILDCARD = (
    "may have '*' only as a whole last path segment (spiffe://example.org/team/*): a "
    "prefix ends at a '/'"
)


@pytest.mark.parametrize(
    ("pattern", "caller", "matches"),
    [
        ("spiffe://example.org/web", "spiffe://example.org/web", True),
        ("spiffe://example.org/web", "spiffe://example.org/web/x", False),
        ("spiffe://example.org/team/*", "spiffe://example.org/team/a", True),
        ("spiffe://example.org/team/*", "spiffe://example.org/team/a/b", True),
        ("spiffe://example.org/team/*", "spiffe://example.org/team", False),
        ("spiffe://example.org/team/*", "spiffe://example.org/team-evil", False),
        ("spiffe://example.org/team/*", "spiffe://example.org/team/", False),
        ("spiffe://example.org/*", "spiffe://example.org/anything", True),
        ("spiffe://example.org/*", "spiffe://example.org.evil/x", False),
        ("*", "spiffe://other.org/x", True),
    ],
)
def test_matches(pattern: str, caller: str, matches: bool) -> None:
    assert parse_principal(pattern).matches(caller) is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "cluster.local/ns/default/sa/web",
            f"{FORMS}; Istio's 'cluster.local/ns/default/sa/web' is written "
            "spiffe://cluster.local/ns/default/sa/web",
        ),
        ("web", FORMS),
        ("", FORMS),
        ("spiffe://example.org/team*", WILDCARD),
        ("spiffe://example.org/*/admin", WILDCARD),
        ("spiffe://*/web", WILDCARD),
        (
            "spiffe://Example.org/web",
            "SPIFFE ID 'spiffe://Example.org/web' is not valid: trust domain must be lower "
            "case; expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web",
        ),
        (
            "spiffe://example.org",
            "names trust domain example.org, not a workload: write a workload's ID, or "
            "spiffe://example.org/* for every ID in it",
        ),
        (
            "spiffe://exa mple.org/*",
            "trust domain 'exa mple.org' is not valid: contains disallowed characters; use "
            "lower-case letters, digits, '.', '-' and '_', e.g. example.org",
        ),
        (
            "spiffe://example.org/a//*",
            "has a prefix that is not a SPIFFE ID: SPIFFE ID 'spiffe://example.org/a/' is not "
            "valid: path cannot contain empty segments; expected "
            "spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web",
        ),
    ],
)
def test_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_principal(pattern)
    assert str(caught.value) == message


def test_an_exact_id_is_not_a_pattern() -> None:
    check_spiffe_id("spiffe://example.org/users")
    with pytest.raises(ValueError, match="must be a SPIFFE ID"):
        check_spiffe_id("*")
    with pytest.raises(ValueError, match="is not valid: path cannot contain empty segments"):
        check_spiffe_id("spiffe://example.org/team/")
