"""The admin API's reads for the web console, in process, on the server's real admin app:
entry search, valid SVIDs, agents' last contact, the trust domain in one answer, and the
watch of every change counter. Bounds answer 400, never 500."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ca.agent_activity import AgentActivity
from ca.api.admin import create_admin_app
from ca.authority import NextRotation, next_rotation
from ca.config import server_config
from ca.datastore.records import IssuedSvid
from ca.revisions import RevisionWatcher
from ca.server import Server
from sdk.clock import ManualClock
from tests.unit.ca.conftest import START
from tests.unit.ca.federation_helpers import call

TD = "spiffe://example.org"


class Harness:
    def __init__(self, server: Server, clock: ManualClock) -> None:
        self.server = server
        self.clock = clock
        self.activity = AgentActivity(clock)
        self.watcher = RevisionWatcher(server.store.sync_counters, interval=0.01)
        self.app = create_admin_app(
            store=server.store, authorities=server.authorities, issuer=server.issuer,
            clock=clock, changed=self.watcher.poke, health=server.health,
            activity=self.activity, watcher=self.watcher,
        )

    def get(self, path: str, status: int = 200, **params: Any) -> Any:
        response: Any = call(self.app, "GET", path, params=params)
        assert response.status_code == status, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any], status: int = 201) -> Any:
        response: Any = call(self.app, "POST", path, json=body)
        assert response.status_code == status, response.text
        return response.json()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "bind": "127.0.0.1:0", "key_manager": {"memory": {}}}),
                    clock=clock)
    try:
        yield Harness(server, clock)
    finally:
        server.store.close()


def entry(api: Harness, name: str, selector: str = "unix:uid:1000") -> dict[str, Any]:
    return api.post("/v1/entries", {"parent_id": f"{TD}/node/a", "spiffe_id": f"{TD}/{name}",
                                    "selectors": [selector]})  # fmt: skip


def test_entry_search_pages_and_counts(api: Harness) -> None:
    for n in range(3):
        entry(api, f"web-{n}", f"unix:uid:{n}")
    entry(api, "db")
    page = api.get("/v1/entries/search", q="web", limit=2, offset=1)
    assert page["total"] == 3
    assert [e["spiffe_id"] for e in page["entries"]] == [f"{TD}/web-1", f"{TD}/web-2"]
    assert api.get("/v1/entries/search", selector="unix:uid:1000")["total"] == 1
    assert api.get("/v1/entries/search", parent_id=f"{TD}/node/a")["total"] == 4
    assert api.get("/v1/entries/search")["total"] == 4


@pytest.mark.parametrize("params", [
    {"limit": 0}, {"limit": 1001}, {"offset": -1}, {"selector": "no-colon"},
    {"parent_id": "not-an-id"}, {"q": "x" * 2049},
])
def test_entry_search_refuses_what_is_out_of_bounds(api: Harness, params: dict[str, Any]) -> None:
    refused = api.get("/v1/entries/search", 400, **params)
    assert refused["error"]["code"] == "invalid_argument"


def test_valid_svids_expiring_soon_and_of_one_spiffe_id(api: Harness) -> None:
    api.server.store.record_issued_svids([
        IssuedSvid("s1", f"{TD}/web", "x509", f"{TD}/agent", "a1", START + timedelta(minutes=5)),
        IssuedSvid("s2", f"{TD}/db", "jwt", None, "a1", START + timedelta(hours=2)),
        IssuedSvid("s3", f"{TD}/web", "x509", f"{TD}/agent", "a1", START - timedelta(seconds=1)),
    ])
    soon = api.get("/v1/svids", expiring_within=3600)
    assert soon["total"] == 1 and soon["svids"] == [{
        "serial": "s1", "spiffe_id": f"{TD}/web", "kind": "x509", "agent_id": f"{TD}/agent",
        "authority_id": "a1", "expires_at": int((START + timedelta(minutes=5)).timestamp())}]
    assert [s["serial"] for s in api.get("/v1/svids")["svids"]] == ["s2", "s1"]
    assert api.get("/v1/svids", spiffe_id=f"{TD}/db")["svids"][0]["agent_id"] is None
    for bad in ({"limit": 0}, {"expiring_within": -1}, {"expiring_within": 10**12}):
        assert api.get("/v1/svids", 400, **bad)["error"]["code"] == "invalid_argument"


def test_agents_carry_when_this_server_last_heard_from_them(api: Harness) -> None:
    agent_id = f"{TD}/spire/agent/join_token/abc"
    api.server.store.register_agent(agent_id, attestation_type="join_token", serial="1",
                                    expires_at=START + timedelta(hours=1))  # fmt: skip
    assert api.get("/v1/agents")["agents"][0]["last_seen"] is None
    api.clock.advance(timedelta(seconds=42))
    api.activity.seen(agent_id)
    expected = int((START + timedelta(seconds=42)).timestamp())
    assert api.get("/v1/agents")["agents"][0]["last_seen"] == expected
    assert api.get("/v1/agents/show", spiffe_id=agent_id)["last_seen"] == expected


def test_agent_activity_forgets_the_longest_quiet_past_its_limit() -> None:
    clock = ManualClock(START)
    activity = AgentActivity(clock, limit=2)
    for name in ("a", "b", "a", "c"):
        activity.seen(name)
    assert activity.last_seen("b") is None
    assert activity.last_seen("a") == START and activity.last_seen("c") == START


def test_the_trust_domain_in_one_answer(api: Harness) -> None:
    api.server.authorities.rotate()
    found = api.get("/v1/trustdomain")
    assert found["trust_domain"] == "example.org"
    assert found["bundle_sequence"] >= 1
    active = [a for a in found["authorities"]["x509"] if a["status"] == "active"]
    assert len(active) == 1 and len(found["authorities"]["jwt"]) == 1
    life = active[0]["expires_at"] - active[0]["not_before"]
    steps = found["next_rotation"]["x509"]
    # Whole seconds of a life that need not be (the authority's not_before is backdated).
    assert abs(steps["prepare_at"] - (active[0]["expires_at"] - life / 2)) <= 1
    assert abs(steps["activate_at"] - (active[0]["expires_at"] - life / 6)) <= 1
    assert found["federated"] == []


def test_the_next_rotation_follows_the_journal_s_rules() -> None:
    from tests.unit.ca.test_datastore_contract import authority

    day = timedelta(days=1)
    active = authority("a", status="active", not_before=START, not_after=START + 6 * day)
    assert next_rotation([active]) == NextRotation(START + 3 * day, START + 5 * day)
    prepared = authority("b", status="prepared")
    assert next_rotation([active, prepared]) == NextRotation(None, START + 5 * day)
    assert next_rotation([prepared]) == NextRotation(None, None)


def test_the_watch_answers_when_a_counter_moves(api: Harness) -> None:
    async def scenario() -> None:
        following = asyncio.create_task(api.watcher.run())
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tessera") as client:
            while not api.watcher.following:
                await asyncio.sleep(0.01)
            first = (await client.get("/v1/watch")).json()
            assert first["changed"] == [] and len(first["token"].split(".")) == 4
            quiet = (await client.get("/v1/watch", params={"since": first["token"],
                                                           "timeout": 0})).json()
            assert quiet == {"token": first["token"], "changed": []}
            waiting = asyncio.create_task(client.get(
                "/v1/watch", params={"since": first["token"], "timeout": 30}))
            await client.post("/v1/entries", json={
                "parent_id": f"{TD}/node/a", "spiffe_id": f"{TD}/new",
                "selectors": ["unix:uid:1"]})
            moved = (await waiting).json()
            assert moved["changed"] == ["entries"] and moved["token"] != first["token"]
            bad = await client.get("/v1/watch", params={"since": "1.2.3"})
            assert bad.status_code == 400 and "four numbers" in bad.text
            too_long = await client.get("/v1/watch", params={"since": "0.0.0.0",
                                                             "timeout": 61})
            assert too_long.status_code == 400
        following.cancel()

    asyncio.run(scenario())


def test_node_api_answers_are_counted_by_endpoint_and_status(api: Harness) -> None:
    from prometheus_client import REGISTRY

    from ca.api.node import create_node_app

    node = create_node_app(store=api.server.store, authorities=api.server.authorities,
                           issuer=api.server.issuer, attestors={}, watcher=api.watcher,
                           ready=lambda: None)  # fmt: skip

    def count(endpoint: str, status: str) -> float:
        value = REGISTRY.get_sample_value("tessera_server_node_api_requests_total",
                                          {"endpoint": endpoint, "status": status})
        return value or 0.0

    before = count("/v1/agent/entries", "401"), count("other", "404")
    assert call(node, "GET", "/v1/agent/entries").status_code == 401  # type: ignore[attr-defined]
    assert call(node, "GET", "/made/up/path").status_code == 404  # type: ignore[attr-defined]
    assert (count("/v1/agent/entries", "401"), count("other", "404")) == (
        before[0] + 1, before[1] + 1)
