"""What the console's pages show, from the admin API's answers."""

from __future__ import annotations

import pytest

from ca.console import views

NOW = 1_800_000_000


def authority(authority_id: str, status: str, start: int, end: int) -> dict[str, object]:
    return {"authority_id": authority_id, "status": status, "not_before": start,
            "expires_at": end, "tainted": False}


def test_the_timeline_spans_every_authority_now_and_the_next_rotation() -> None:
    old = authority("a", "old", NOW - 200, NOW + 100)
    active = authority("b", "active", NOW - 100, NOW + 300)
    line = views.timeline([active, old], {"prepare_at": NOW + 50, "activate_at": NOW + 250},
                          NOW)
    assert (line.start, line.end) == (NOW - 200, NOW + 300)
    # Sorted by when each starts; each bar in percent of the 500 s shown.
    assert [(b.authority["authority_id"], b.left, b.width, b.row) for b in line.bars] == [
        ("a", 0.0, 60.0, 0), ("b", 20.0, 80.0, 1)]
    assert [(m.label, m.left) for m in line.marks] == [
        ("now", 40.0), ("next prepare", 50.0), ("next activate", 90.0)]
    assert [t.left for t in line.ticks] == [0.0, 25.0, 50.0, 75.0, 100.0]


def test_a_timeline_without_authorities_or_rotation_is_just_now() -> None:
    line = views.timeline([], None, NOW)
    assert line.bars == () and [m.label for m in line.marks] == ["now"]


@pytest.mark.parametrize(("agent", "state"), [
    ({"banned": True, "expires_at": NOW + 60, "last_seen": NOW}, "banned"),
    ({"banned": False, "expires_at": NOW - 1, "last_seen": NOW}, "expired"),
    ({"banned": False, "expires_at": NOW + 60, "last_seen": None}, "quiet"),
    ({"banned": False, "expires_at": NOW + 60, "last_seen": NOW - 301}, "quiet"),
    ({"banned": False, "expires_at": NOW + 60, "last_seen": NOW - 300}, "active"),
])
def test_agent_state(agent: dict[str, object], state: str) -> None:
    assert views.agent_state(agent, NOW) == state


def test_agents_are_filtered_by_text_and_state_in_id_order() -> None:
    agents = [
        {"spiffe_id": "spiffe://td/agent/b", "attestation_type": "join_token",
         "banned": False, "expires_at": NOW + 60, "last_seen": NOW},
        {"spiffe_id": "spiffe://td/agent/a", "attestation_type": "x509pop",
         "banned": True, "expires_at": NOW + 60, "last_seen": NOW},
        {"spiffe_id": "spiffe://td/agent/c", "attestation_type": "join_token",
         "banned": False, "expires_at": NOW + 60, "last_seen": None},
    ]
    assert [a["spiffe_id"] for a in views.filter_agents(agents, "", "", NOW)] == [
        "spiffe://td/agent/a", "spiffe://td/agent/b", "spiffe://td/agent/c"]
    assert [a["state"] for a in views.filter_agents(agents, "join", "", NOW)] == [
        "active", "quiet"]
    assert [a["spiffe_id"] for a in views.filter_agents(agents, " ", "banned", NOW)] == [
        "spiffe://td/agent/a"]


def test_lines_are_split_from_the_resource_they_came_from() -> None:
    assert views.split_source("route 'default' taken: any request  [default route]") == (
        "route 'default' taken: any request", "default route")
    assert views.split_source("  DENY from x  [AuthorizationPolicy deny spec.rules[0]]") == (
        "  DENY from x", "AuthorizationPolicy deny spec.rules[0]")
    assert views.split_source("no source here [x]") == ("no source here [x]", "")


def decision(allowed: bool, kind: str, name: str) -> dict[str, object]:
    return {"allowed": allowed, "rule": {"kind": kind, "name": name, "path": "spec.rules[0]"},
            "reason": "why"}


def test_the_deciding_rule_is_the_refusal_when_a_share_is_refused() -> None:
    explanation = {"destinations": [
        {"destination": {"weight": 50}, "decision": decision(True, "default", "authorization")},
        {"destination": {"weight": 50}, "decision": decision(False, "AuthorizationPolicy",
                                                             "deny-billing")},
        {"destination": {"weight": 0}, "decision": decision(False, "AuthorizationPolicy",
                                                            "never-taken")},
    ]}
    assert views.deciding_rule(explanation) == {
        "allowed": False, "rule": "AuthorizationPolicy deny-billing", "path": "spec.rules[0]",
        "reason": "why"}


def test_the_deciding_rule_names_a_default_and_a_gateway_comes_first() -> None:
    allowed = {"destinations": [{"destination": {"weight": 100},
                                 "decision": decision(True, "default", "authorization")}]}
    assert views.deciding_rule(allowed)["rule"] == "default (authorization)"  # type: ignore[index]
    refused_at_gateway = {**allowed, "gateway_decision": decision(False, "AuthorizationPolicy",
                                                                  "edge")}
    assert views.deciding_rule(refused_at_gateway)["rule"] == "AuthorizationPolicy edge"  # type: ignore[index]
    assert views.deciding_rule({"destinations": []}) is None


def test_headers_are_name_value_lines() -> None:
    assert views.parse_headers("X-Tenant: blue\n\n x-b :  2 ") == {"x-tenant": "blue",
                                                                  "x-b": "2"}
    with pytest.raises(ValueError, match="header line 2 is not 'Name: value': 'oops'"):
        views.parse_headers("a: 1\noops")
    with pytest.raises(ValueError, match="at most 2 headers"):
        views.parse_headers("a: 1\nb: 2\nc: 3", limit=2)
