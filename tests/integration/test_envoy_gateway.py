"""The mission's example through a real Envoy fed by a real agent: a gateway whose
bootstrap comes from ``mesh.envoy.build_bootstrap`` gets its listener, routes and
clusters over ADS, rendered from the agent's view of the mesh.

Only the gateway's side: with no instance of users-service registered, the route is
taken and answered 503 by Envoy (no healthy upstream); any other path is 404 at the
gateway, as ``tessera mesh explain --gateway`` says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mesh.envoy import build_bootstrap
from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess, free_port, tessera
from tests.integration.test_agent import NODE, create_entry
from tests.support.envoy import EnvoyProcess
from tests.unit.mesh.documents import MISSION, USERS_SERVICE

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

GATEWAY_ID = "spiffe://example.org/gateway"
StartAgent = Callable[..., AgentProcess]


def test_the_missions_gateway_routes_by_uri_in_a_real_envoy(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path
) -> None:
    tessera("mesh", "apply", "-f", "-", "--data-dir", str(server.data_dir),
            input=USERS_SERVICE + "---\n" + MISSION)
    create_entry(server, GATEWAY_ID, f"unix:uid:{os.getuid()}", parent=NODE)
    agent = start_agent(server)
    port = free_port()
    document = build_bootstrap(
        node_id="gateway-1", node_cluster="ingress", agent_socket=str(agent.socket),
        admin_port=0, metadata={
            "tessera.proxy": "gateway",
            "tessera.labels": json.dumps({"istio": "ingressgateway"}),
            "tessera.host": "127.0.0.1",
            "tessera.port_offset": str(port - 80),
        },
    )
    with EnvoyProcess.start(tmp_path, document) as envoy:
        url = f"http://127.0.0.1:{port}"

        def answer(path: str) -> int | None:
            try:
                return httpx.get(url + path, timeout=5).status_code
            except httpx.TransportError:
                return None  # the listener is not there yet

        assert envoy.wait_until(lambda: answer("/api/v2/orders"), "the gateway listening") == 404
        assert answer("/api/v1/users") == 503  # routed to users-service: no instance yet
        listeners = envoy.config_dump("dynamic_listeners")
        assert [listener["name"] for listener in listeners] == ["gateway_80"]
    assert "gets no mesh configuration" not in agent.log()
