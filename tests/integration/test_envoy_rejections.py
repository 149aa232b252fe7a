"""An Envoy refusing its configuration, seen where a user looks: ``tessera mesh describe``.

A real server and agent (``tessera server run``, ``tessera agent run``) and a real Envoy
whose bootstrap is the one ``tessera sidecar run`` writes (:func:`mesh.envoy.build_bootstrap`)
less its runtime layer, as a hand-written one would be: Envoy then refuses a regular
expression whose RE2 program is larger than 100, which Tessera takes (up to 10,000, the
limit its bootstrap sets). So Envoy NACKs the routes of a VirtualService matching such
a path, and keeps running without them. The agent reports the NACK with its instances;
``describe`` names the Envoy, its node, what it refused and Envoy's reason, until the
Envoy goes away.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.envoy import build_bootstrap
from tests.integration.conftest import free_port, tessera
from tests.integration.sidecar_fixtures import Entry, trust_domain
from tests.support.envoy import EnvoyProcess
from tests.support.processes import poll

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

USERS = "spiffe://example.org/users"
NODE_ID = "sidecar~rejections-test~users-service"
DEADLINE = 30.0
MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: users-api}}
spec:
  hosts: [users-service]
  http:
  - match:
    - uri: {{regex: "/api/[a-z0-9]{{1,60}}"}}   # an RE2 program of 188
    route:
    - destination: {{host: users-service}}
"""


def test_mesh_describe_names_the_envoy_that_refused_its_listeners_and_envoys_reason(
    tmp_path: Path,
) -> None:
    with trust_domain(tmp_path, [Entry(USERS)]) as domain:
        data_dir = ["--data-dir", str(domain.server.data_dir)]
        tessera("mesh", "apply", "-f", "-", *data_dir, input=MESH)

        def describe(*args: str) -> str:
            return tessera("mesh", "describe", "users-service", *args, *data_dir).stdout

        assert "rejected" not in describe()
        bootstrap = build_bootstrap(
            node_id=NODE_ID, node_cluster="users-service", agent_socket=str(domain.agent.socket),
            admin_port=0, metadata={
                "tessera.proxy": "sidecar", "tessera.service": "users-service",
                "tessera.spiffe_id": USERS, "tessera.labels": "{}",
                "tessera.inbound": f"127.0.0.1:{free_port()}",
                "tessera.outbound": f"127.0.0.1:{free_port()}",
                "tessera.app": f"127.0.0.1:{free_port()}",
            },
        )  # fmt: skip
        del bootstrap["layered_runtime"]  # Envoy's own limit on regular expressions: 100
        with EnvoyProcess.start(tmp_path, bootstrap) as envoy:
            text = envoy.wait_until(
                lambda: next((line for line in describe().splitlines()
                              if line.startswith(f"Envoy {NODE_ID} ")), None),
                "tessera mesh describe naming the Envoy's NACK", DEADLINE)  # fmt: skip
            [rejection] = json.loads(describe("--output", "json"))["rejections"]
            assert (rejection["node_id"], rejection["proxy"], rejection["service"]) == (
                NODE_ID,
                "sidecar",
                "users-service",
            )
            assert rejection["agent"].startswith("spiffe://example.org/tessera/agent/join_token/")
            assert text == (
                f"Envoy {NODE_ID} on node {rejection['agent']} rejected {rejection['type']} "
                f"(version {rejection['version']}): {rejection['reason']}"
            )
            assert "program size of 188 > max program size of 100" in rejection["reason"]
        # The Envoy is gone: its agent reports at once that nothing stands any more.
        poll(
            lambda: "rejected" not in describe() or None,
            DEADLINE,
            "tessera mesh describe no longer naming the stopped Envoy",
        )
