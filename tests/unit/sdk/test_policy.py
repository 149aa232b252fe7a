"""The policy file: decisions, audit mode, and what a bad file says."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from spiffe import SpiffeId

from sdk.errors import PolicyError
from sdk.policy import Decision, Mode, Policy

WEB = SpiffeId("spiffe://example.org/web")
OPS_DB = SpiffeId("spiffe://example.org/ops/db")
PARTNER = SpiffeId("spiffe://partner.org/billing")
LEGACY = SpiffeId("spiffe://example.org/legacy")
STRANGER = SpiffeId("spiffe://example.org/stranger")

POLICY_FILE = """
mode = "enforce"

[[allow]]
name = "web-to-api"
ids = ["spiffe://example.org/web"]
methods = ["GET", "POST"]
paths = ["/api/", "/health"]

[[allow]]
name = "ops"
prefixes = ["spiffe://example.org/ops/"]

[[allow]]
name = "partners"
trust_domains = ["partner.org"]
paths = ["/partner"]

[[deny]]
name = "no-legacy"
ids = ["spiffe://example.org/legacy"]

[[deny]]
name = "no-ops-deletes"
prefixes = ["spiffe://example.org/ops"]
methods = ["DELETE"]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_FILE)
    return Policy.load(path)


@pytest.mark.parametrize(
    ("peer", "method", "path", "expected"),
    [
        (
            WEB,
            "GET",
            "/api/items",
            Decision(True, "web-to-api", "allowed by its ids for GET /api/items"),
        ),
        (
            WEB,
            "POST",
            "/health",
            Decision(True, "web-to-api", "allowed by its ids for POST /health"),
        ),
        (
            WEB,
            "DELETE",
            "/api/items",
            Decision(False, "default-deny", "no allow rule matches it for DELETE /api/items"),
        ),
        (
            WEB,
            "GET",
            "/healthz",
            Decision(False, "default-deny", "no allow rule matches it for GET /healthz"),
        ),
        (
            WEB,
            "GET",
            "/api/../admin",
            Decision(False, "default-deny", "no allow rule matches it for GET /admin"),
        ),
        (WEB, None, None, Decision(False, "default-deny", "no allow rule matches it")),
        (
            OPS_DB,
            "GET",
            "/anything",
            Decision(
                True, "ops", "allowed by its prefix spiffe://example.org/ops/ for GET /anything"
            ),
        ),
        (
            OPS_DB,
            None,
            None,
            Decision(True, "ops", "allowed by its prefix spiffe://example.org/ops/"),
        ),
        (
            OPS_DB,
            "DELETE",
            "/x",
            Decision(
                False,
                "no-ops-deletes",
                "denied by its prefix spiffe://example.org/ops/ for DELETE /x",
            ),
        ),
        (
            SpiffeId("spiffe://example.org/opsec"),
            "GET",
            "/x",
            Decision(False, "default-deny", "no allow rule matches it for GET /x"),
        ),
        (
            PARTNER,
            "GET",
            "/partner/invoices",
            Decision(
                True,
                "partners",
                "allowed by its trust domain partner.org for GET /partner/invoices",
            ),
        ),
        (LEGACY, "GET", "/api/x", Decision(False, "no-legacy", "denied by its ids for GET /api/x")),
        (
            STRANGER,
            "GET",
            "/api/x",
            Decision(False, "default-deny", "no allow rule matches it for GET /api/x"),
        ),
    ],
    ids=[
        "allowed-method-and-path",
        "allowed-second-path",
        "method-not-listed",
        "path-segment-not-a-prefix",
        "dot-segments-resolved",
        "narrowed-rule-matches-no-connection",
        "prefix",
        "prefix-at-handshake",
        "deny-beats-allow",
        "prefix-is-segment-wise",
        "trust-domain",
        "deny-by-id",
        "default-deny",
    ],
)
def test_decisions(
    policy: Policy, peer: SpiffeId, method: str | None, path: str | None, expected: Decision
) -> None:
    assert policy.decide(peer, method=method, path=path) == expected


def test_without_allow_rules_everything_not_denied_is_allowed() -> None:
    only_deny = Policy.from_dict({"deny": [{"name": "no-legacy", "ids": [str(LEGACY)]}]})
    empty = Policy.from_dict({})

    assert only_deny.decide(WEB, "GET", "/") == Decision(
        True, "default-allow", "no deny rule matches it for GET /, and there are no allow rules"
    )
    assert only_deny.decide(LEGACY).allowed is False
    assert empty.decide(LEGACY) == Decision(
        True, "default-allow", "no deny rule matches it, and there are no allow rules"
    )


def test_every_decision_is_logged_with_its_rule(
    policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tessera.policy")
    source = policy.source

    policy.decide(WEB, "GET", "/api/x")
    policy.decide(LEGACY, "GET", "/api/x")

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "DEBUG",
            f"policy {source}: allowed spiffe://example.org/web for GET /api/x by rule "
            "'web-to-api': allowed by its ids for GET /api/x",
        ),
        (
            "INFO",
            f"policy {source}: refused spiffe://example.org/legacy for GET /api/x by rule "
            "'no-legacy': denied by its ids for GET /api/x",
        ),
    ]
    assert caplog.records[1].policy_rule == "no-legacy"  # type: ignore[attr-defined]


def test_audit_mode_logs_what_it_would_refuse_and_refuses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = Policy.from_dict(
        {"mode": "audit", "allow": [{"name": "web", "ids": [str(WEB)]}]}, source="audit.toml"
    )

    decision = audit.decide(STRANGER, "GET", "/x")

    assert audit.mode is Mode.AUDIT
    assert decision == Decision(
        True, "default-deny", "audit mode, would have refused: no allow rule matches it for GET /x"
    )
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "policy audit.toml: audit mode, would have refused spiffe://example.org/stranger "
            "for GET /x by rule 'default-deny': no allow rule matches it for GET /x",
        )
    ]


def test_rules_without_names_are_named_by_position() -> None:
    policy = Policy.from_dict({"allow": [{"ids": [str(WEB)]}], "deny": [{"ids": [str(LEGACY)]}]})

    assert policy.decide(WEB).rule == "allow[0]"
    assert policy.decide(LEGACY).rule == "deny[0]"


# -- bad policies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"allows": []}, "p.toml: unknown key 'allows'; expected one of allow, deny, mode"),
        ({"mode": "enforced"}, 'p.toml: mode must be "enforce" or "audit", not \'enforced\''),
        (
            {"allow": {"ids": []}},
            "p.toml: allow must be an array of tables ([[allow]]), not a table",
        ),
        ({"allow": ["x"]}, "p.toml: allow[0]: must be a table ([[allow]]), not a string"),
        (
            {"allow": [{"name": "web", "id": [str(WEB)]}]},
            "p.toml: allow[0] ('web'): unknown key 'id'; expected one of ids, methods, name, "
            "paths, prefixes, trust_domains",
        ),
        (
            {"allow": [{"name": "web", "ids": ["spiffe://Example.org/web"]}]},
            "p.toml: allow[0] ('web'): ids entry 'spiffe://Example.org/web' is not valid: "
            "trust domain must be lower case; expected spiffe://<trust-domain>/<path>, "
            "e.g. spiffe://example.org/web",
        ),
        (
            {"deny": [{"ids": [str(LEGACY)]}, {"prefixes": ["example.org/ops/"]}]},
            "p.toml: deny[1]: prefixes entry 'example.org/ops/' is not valid: does not start "
            "with 'spiffe://'; expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web",
        ),
        (
            {"allow": [{"trust_domains": ["Partner.org"]}]},
            "p.toml: allow[0]: trust domain 'Partner.org' is not valid: trust domain must be "
            "lower case; use lower-case letters, digits, '.', '-' and '_', e.g. example.org",
        ),
        (
            {"allow": [{"name": "web", "ids": [str(WEB)], "methods": ["get"]}]},
            "p.toml: allow[0] ('web'): 'get' in methods is not an HTTP method; use one of "
            "CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE (upper case)",
        ),
        (
            {"allow": [{"ids": [str(WEB)], "paths": ["api/"]}]},
            "p.toml: allow[0]: 'api/' in paths must start with '/'",
        ),
        (
            {"allow": [{"ids": [str(WEB)], "methods": []}]},
            "p.toml: allow[0]: methods is empty, which would match nothing; leave it out to "
            "match every method",
        ),
        (
            {"allow": [{"name": "nobody", "methods": ["GET"]}]},
            "p.toml: allow[0] ('nobody'): the rule names no peer: give at least one of ids, "
            "prefixes, trust_domains",
        ),
        (
            {"allow": [{"ids": "spiffe://example.org/web"}]},
            "p.toml: allow[0]: ids must be an array of strings, not a string",
        ),
        (
            {"allow": [{"ids": [str(WEB), 3]}]},
            "p.toml: allow[0]: ids must be an array of strings; 3 is an integer",
        ),
        (
            {
                "allow": [{"name": "x", "ids": [str(WEB)]}],
                "deny": [{"name": "x", "ids": [str(WEB)]}],
            },
            "p.toml: deny[0] ('x'): name 'x' is already used by allow[0]",
        ),
        (
            {"allow": [{"name": "default-deny", "ids": [str(WEB)]}]},
            "p.toml: allow[0] ('default-deny'): name 'default-deny' is reserved for the "
            "policy's default decision",
        ),
        (
            {"allow": [{"name": " ", "ids": [str(WEB)]}]},
            "p.toml: allow[0] (' '): name must be a non-empty string",
        ),
    ],
    ids=[
        "unknown-top-level-key",
        "bad-mode",
        "allow-not-an-array",
        "rule-not-a-table",
        "unknown-rule-key",
        "bad-spiffe-id",
        "bad-prefix",
        "bad-trust-domain",
        "bad-method",
        "relative-path",
        "empty-methods",
        "no-peer",
        "ids-not-an-array",
        "ids-not-strings",
        "duplicate-name",
        "reserved-name",
        "blank-name",
    ],
)
def test_bad_policies_say_where_and_what(data: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as refused:
        Policy.from_dict(data, source="p.toml")

    assert str(refused.value) == message


def test_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[[allow]\nids = []\n")

    with pytest.raises(PolicyError) as refused:
        Policy.load(path)

    assert str(refused.value) == (
        f"{path}: not valid TOML: Expected ']]' at the end of an array declaration (at line 1, "
        "column 8)"
    )
    assert refused.value.source == str(path)


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"

    with pytest.raises(PolicyError) as refused:
        Policy.load(path)

    assert str(refused.value) == f"{path}: cannot read the policy file: No such file or directory"
