"""The node API remembers agents between requests, yet an agent banned or evicted
through this server is refused on its very next request, even on a connection that
was served from memory a moment before."""

from __future__ import annotations

import pytest

from tests.integration.conftest import ServerProcess
from tests.integration.test_server import NodeApiAgent

pytestmark = pytest.mark.integration


def test_a_remembered_agent_is_refused_at_once_after_a_ban_or_an_eviction(
    server: ServerProcess,
) -> None:
    token = str(server.cli_json("token", "generate")["token"])
    agent = NodeApiAgent(server)
    agent.attest(token)
    with agent.client() as client:
        synced = client.get("/v1/agent/entries").json()
        for _ in range(3):  # idle syncs, answered from memory
            idle = client.get("/v1/agent/entries", params={
                "since": synced["revision"], "bundle": synced["bundle_sequence"]})
            assert idle.status_code == 200, idle.text
            assert idle.json()["entries"] == []

        server.cli("agent", "ban", "--spiffe-id", agent.spiffe_id)
        banned = client.get("/v1/agent/entries", params={"since": synced["revision"]})
        assert banned.status_code == 403
        assert banned.json()["error"]["message"] == f"agent {agent.spiffe_id} is banned"

        server.cli("agent", "unban", "--spiffe-id", agent.spiffe_id)
        assert client.get("/v1/agent/entries").status_code == 200

        server.cli("agent", "evict", "--spiffe-id", agent.spiffe_id)
        evicted = client.get("/v1/agent/entries", params={"since": synced["revision"]})
        assert evicted.status_code == 403
        assert evicted.json()["error"]["message"] == (
            f"{agent.spiffe_id} is not an attested agent; it must attest again")
