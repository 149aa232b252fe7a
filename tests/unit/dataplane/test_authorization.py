"""The built-in proxy's judge: the mesh's AuthorizationPolicies, per request and right after
the handshake, as ``tessera sidecar run`` asks them."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from spiffe import SpiffeId

from dataplane.authorization import NOT_READY, MeshJudge
from mesh import Config, parse_documents
from mesh.compile import compile_authorization, compile_jwt_rules
from sdk.policy import Decision

WEB = SpiffeId("spiffe://example.org/web")
OPS = SpiffeId("spiffe://example.org/ops/alice")
LEGACY = SpiffeId("spiffe://example.org/legacy")
INTRUDER = SpiffeId("spiffe://example.org/intruder")

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users-readers}
spec:
  selector: {matchLabels: {app: users}}
  rules:
  - from: [{source: {principals: ["spiffe://example.org/web"]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
  - from: [{source: {principals: ["spiffe://example.org/ops/*"]}}]
    when: [{key: "request.auth.claims[groups]", values: [admins]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-legacy}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["spiffe://example.org/legacy"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-deletes}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: [DELETE]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-web}
spec:
  action: AUDIT
  rules:
  - from: [{source: {principals: ["spiffe://example.org/web"]}}]
"""


def judge(labels: dict[str, str], text: str = POLICIES) -> MeshJudge:
    config, _ = Config().apply(parse_documents(text))
    return MeshJudge(compile_authorization(config, labels), revision=3)


def test_requests_are_judged_as_istio_does_with_the_rule_named_by_its_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    users = judge({"app": "users"})
    with caplog.at_level(logging.INFO, logger="tessera.sidecar"):
        allowed = users.decide(WEB, "GET", "/api/users")
        not_matched = users.decide(WEB, "POST", "/api/users")
        deleted = users.decide(WEB, "DELETE", "/api/users")
    assert allowed == Decision(
        True, "AuthorizationPolicy users-readers spec.rules[0]",
        f"{WEB} is allowed by an ALLOW rule for GET /api/users")  # fmt: skip
    assert not_matched == Decision(
        False, "AuthorizationPolicy users-readers",
        f"no ALLOW rule matches {WEB}, and AuthorizationPolicy users-readers (ALLOW) selects "
        "this workload: refused by default for POST /api/users")  # fmt: skip
    assert deleted == Decision(
        False, "AuthorizationPolicy no-deletes spec.rules[0]",
        f"{WEB} is refused by a DENY rule for DELETE /api/users")  # fmt: skip
    assert (f"AUDIT: {WEB} for GET /api/users matches AuthorizationPolicy audit-web "
            "spec.rules[0]") in caplog.text  # fmt: skip
    assert (f"refused {WEB} for DELETE /api/users by AuthorizationPolicy no-deletes "
            f"spec.rules[0] (mesh revision 3): {WEB} is refused by a DENY rule") in caplog.text


def test_a_request_judged_again_gets_the_same_answer_and_its_log_lines_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = judge({"app": "users"})
    asked: list[str] = []
    policies = type(users.authorization)
    decide = policies.decide

    def counted(self: Any, caller: str | None, request: Any, claims: Any = None) -> Any:
        asked.append(str(caller))
        return decide(self, caller, request, claims)

    monkeypatch.setattr(policies, "decide", counted)
    with caplog.at_level(logging.INFO, logger="tessera.sidecar"):
        first = [users.decide(WEB, "GET", "/api/users"), users.decide(WEB, "DELETE", "/x")]
        again = [users.decide(WEB, "GET", "/api/users"), users.decide(WEB, "DELETE", "/x")]
    assert first == again and [d.allowed for d in again] == [True, False]
    assert asked == [str(WEB)] * 2  # the policies were asked once per request kind
    assert caplog.text.count(f"AUDIT: {WEB} for GET /api/users matches") == 2
    assert caplog.text.count(f"refused {WEB} for DELETE /x by") == 2
    assert users.decide(OPS, "GET", "/api/users") != again[0]  # another caller: judged anew
    assert asked == [str(WEB)] * 2 + [str(OPS)]


def test_at_the_handshake_a_caller_some_allow_rule_names_goes_on_to_its_requests() -> None:
    at_handshake = judge({"app": "users"}).at_handshake()
    # named by a rule with methods and paths, or with a JWT condition: each request decides
    assert at_handshake.decide(WEB) == Decision(
        True, "AuthorizationPolicy users-readers spec.rules[0]",
        f"{WEB} is named by an ALLOW rule: each request is judged")  # fmt: skip
    assert at_handshake.decide(OPS).allowed
    assert at_handshake.decide(INTRUDER) == Decision(
        False, "AuthorizationPolicy users-readers",
        f"no ALLOW rule names {INTRUDER}, and AuthorizationPolicy users-readers (ALLOW) "
        "selects this workload: refused by default")  # fmt: skip
    assert at_handshake.decide(LEGACY) == Decision(
        False, "AuthorizationPolicy no-legacy spec.rules[0]",
        f"{LEGACY} is refused by a DENY rule")  # fmt: skip


def test_without_an_allow_policy_only_deny_rules_without_to_or_when_refuse_at_the_handshake(
) -> None:
    orders = judge({"app": "orders"}).at_handshake()  # only the selector-less policies
    assert orders.decide(INTRUDER) == Decision(
        True, "default authorization",
        "no ALLOW policy selects this workload: each request is judged by the DENY rules")
    assert not orders.decide(LEGACY).allowed
    assert judge({"app": "orders"}).decide(INTRUDER, "DELETE", "/x").rule == (
        "AuthorizationPolicy no-deletes spec.rules[0]")


def test_an_allow_policy_without_rules_refuses_everyone() -> None:
    nobody = judge({}, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                       "metadata: {name: nobody}\nspec: {}\n")  # fmt: skip
    assert not nobody.at_handshake().decide(WEB).allowed
    assert not nobody.decide(WEB, "GET", "/").allowed


def test_before_the_first_snapshot_nobody_gets_through() -> None:
    expected = Decision(False, "not-ready", "this sidecar has not received the mesh "
                        "configuration from its agent yet, so it lets nothing through; try "
                        "again shortly")  # fmt: skip
    assert NOT_READY.at_handshake().decide(WEB) == expected
    assert NOT_READY.decide(WEB, "GET", "/") == expected


JWT = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: users-jwt}
spec:
  selector: {matchLabels: {app: users}}
  jwtRules:
  - issuer: https://issuer.example.com
    jwksUri: https://issuer.example.com/jwks.json
"""


def test_a_request_authentication_it_cannot_check_refuses_every_request_with_401() -> None:
    config, _ = Config().apply(parse_documents(POLICIES + "---\n" + JWT))
    labels = {"app": "users"}
    strict = MeshJudge(compile_authorization(config, labels), revision=3,
                       jwt_rules=compile_jwt_rules(config, labels))  # fmt: skip

    refused = strict.decide(WEB, "GET", "/api/users")
    assert (refused.allowed, refused.status, refused.rule) == (
        False, 401, "RequestAuthentication users-jwt spec.jwtRules[0]")
    assert "does not validate JWTs" in refused.reason
    # The caller alone (at the handshake) is judged as before: the 401 is per request.
    assert strict.decide(WEB).allowed
    other = compile_jwt_rules(config, {"app": "orders"})
    assert other == () and MeshJudge(compile_authorization(config, {"app": "orders"}),
                                     revision=3, jwt_rules=other).decide(WEB, "GET", "/").allowed
