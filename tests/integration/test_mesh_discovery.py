"""Mesh discovery and health with real processes: a server, two agents, and workloads
registering instances over each agent's socket (``tessera.agent.v1.Mesh``).

The test process is the workload: entries give its uid the ``users`` identity on agent
A's node and the ``orders`` identity on agent B's. What a user watches is what is
asserted: ``tessera mesh services``, the Register call's updates, and what another
agent's ``WatchMesh`` sees.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from sdk._proto import mesh_agent_pb2
from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess, tessera
from tests.support.processes import poll

pytestmark = pytest.mark.integration

pb: Any = mesh_agent_pb2
UID = os.getuid()
NODE_A = "spiffe://example.org/node/a"
NODE_B = "spiffe://example.org/node/b"
USERS_ID = "spiffe://example.org/users"
ORDERS_ID = "spiffe://example.org/orders"
METADATA = (("workload.spiffe.io", "true"),)
DEADLINE = 15.0
SERVICE = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users}}
spec:
  spiffeIds: [{USERS_ID}]
  ports: [{{number: 80, protocol: HTTP}}]
  healthCheck: {{tcp: {{}}, interval: 1s, timeout: 1s}}
"""
StartAgent = Callable[..., AgentProcess]


@pytest.fixture
def leased_server(start_server: Any, tmp_path: Path) -> ServerProcess:
    config = tmp_path / "server.toml"
    config.write_text('mesh_instance_lease = "3s"\n')
    server: ServerProcess = start_server(extra=("--config", str(config)))
    return server


@pytest.fixture
def app() -> Iterator[socket.socket]:
    """What the agent health-checks: a listening TCP socket (close it to fail the check)."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def mesh(server: ServerProcess, *args: str, stdin: str | None = None) -> str:
    return tessera("mesh", *args, "--data-dir", str(server.data_dir), input=stdin).stdout


def services(server: ServerProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(mesh(server, "services", "--output", "json"))
    return found


def create_entry(server: ServerProcess, parent: str, spiffe_id: str) -> None:
    server.cli("entry", "create", "--parent-id", parent, "--spiffe-id", spiffe_id,
               "--selector", f"unix:uid:{UID}")


def register(agent: AgentProcess, *, service: str, spiffe_id: str, address: str,
             check: str) -> tuple[grpc.Channel, Any]:
    """Open a Register call; returns the channel and the call (an iterator of updates)."""
    channel = grpc.insecure_channel(f"unix://{agent.socket}")
    call = channel.unary_stream(
        "/tessera.agent.v1.Mesh/Register",
        request_serializer=pb.RegisterRequest.SerializeToString,
        response_deserializer=pb.RegisterUpdate.FromString,
    )(pb.RegisterRequest(service=service, spiffe_id=spiffe_id, address=address,
                         check_address=check, labels={"version": "v1"}),
      metadata=METADATA, timeout=60)
    return channel, call


def refusal(agent: AgentProcess, **request: str) -> tuple[grpc.StatusCode, str]:
    channel, call = register(agent, **request)
    with channel, pytest.raises(grpc.RpcError) as caught:
        next(call)
    return caught.value.code(), caught.value.details()


def until_health(call: Any, health: str) -> Any:
    """The updates of a Register call until one says ``health``."""
    for update in call:
        if update.health == health:
            return update
    raise AssertionError(f"the Register call ended before the instance was {health}")


def watch(agent: AgentProcess) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix://{agent.socket}")
    call = channel.unary_stream(
        "/tessera.agent.v1.Mesh/WatchMesh",
        request_serializer=pb.WatchMeshRequest.SerializeToString,
        response_deserializer=pb.MeshSnapshot.FromString,
    )(pb.WatchMeshRequest(), metadata=METADATA, timeout=60)
    return channel, call


def until_seen(call: Any, want: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    for snapshot in call:
        instances: list[dict[str, Any]] = json.loads(snapshot.instances_json)
        if want(instances):
            return instances
    raise AssertionError("the WatchMesh call ended")


def report_as(agent: AgentProcess, server: ServerProcess, instances: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """``PUT /v1/agent/instances`` with the agent's own SVID, as a compromised agent could."""
    context = ssl.create_default_context(cafile=str(agent.trust_bundle))
    context.check_hostname = False  # the server's certificate names its SPIFFE ID, no host
    context.load_cert_chain(agent.data_dir / "agent-svid.pem", agent.data_dir / "agent-svid.key")
    answer = httpx.put(f"https://{server.address}/v1/agent/instances",
                       json={"instances": instances}, verify=context, timeout=10)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def test_only_an_agent_hosting_the_services_identity_registers_its_instances(
    leased_server: ServerProcess, start_agent: StartAgent, app: socket.socket
) -> None:
    server = leased_server
    mesh(server, "apply", "-f", "-", stdin=SERVICE)
    agent_a = start_agent(server, alias=NODE_A, name="a")
    agent_b = start_agent(server, alias=NODE_B, name="b")
    create_entry(server, NODE_A, USERS_ID)
    create_entry(server, NODE_B, ORDERS_ID)
    check = f"127.0.0.1:{app.getsockname()[1]}"

    # A workload with the users identity, through the agent of its node: accepted, then
    # healthy once the agent's TCP check connects.
    channel, call = poll(lambda: _registered(agent_a, check), DEADLINE,
                         "agent A accepting the users workload's registration")
    with channel:
        assert until_health(call, "healthy").detail == f"TCP {check}: connected"
        [instance] = services(server)
        assert {k: instance[k] for k in ("service", "address", "labels", "health")} == {
            "service": "users", "address": "10.0.0.1:8443", "labels": {"version": "v1"},
            "health": "healthy"}
        assert instance["node"].startswith("spiffe://example.org/tessera/agent/join_token/")
        assert (instance["spiffeId"], instance["detail"]) == (USERS_ID, None)

        # Agent B's workload holds no users SVID: B refuses before asking the server.
        code, details = poll(
            lambda: _refused_with_svid(agent_b, service="users", spiffe_id=USERS_ID,
                                       address="10.0.0.2:8443", check=check),
            DEADLINE, "agent B serving the orders workload")
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith(f"this process holds no SVID for {USERS_ID}; it holds "
                                  f"{ORDERS_ID}")
        # With its own identity, the Service refuses it at the server.
        code, details = refusal(agent_b, service="users", spiffe_id=ORDERS_ID,
                                address="10.0.0.2:8443", check=check)
        assert (code, details) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"Service users may be served by {USERS_ID}, not by {ORDERS_ID} (its "
            "spec.spiffeIds)")
        # And an agent that lies about its node is refused by the server all the same.
        answer = report_as(agent_b, server, [{
            "service": "users", "address": "10.0.0.2:8443", "spiffe_id": USERS_ID,
            "labels": {}, "health": "healthy"}])
        [refused] = answer["refused"]
        assert refused["reason"].endswith(
            f"hosts no workload with SPIFFE ID {USERS_ID} (no registration entry gives a "
            "workload on its node that ID)")
        assert [i["address"] for i in services(server)] == ["10.0.0.1:8443"]

        # The instance turning unhealthy reaches the other agent.
        watch_channel, snapshots = watch(agent_b)
        with watch_channel:
            until_seen(snapshots, lambda found: [i["health"] for i in found] == ["healthy"])
            app.close()
            refused = f"connection refused by {check}"
            assert until_health(call, "unhealthy").detail == refused
            until_seen(snapshots, lambda found: [i["health"] for i in found] == ["unhealthy"])
            # Why, for whoever lists the catalog; and no audit event for a health change.
            [unhealthy] = services(server)
            assert (unhealthy["health"], unhealthy["detail"]) == ("unhealthy", refused)
            row = mesh(server, "services").splitlines()[1]
            assert row.split()[4] == "unhealthy" and row.endswith(f"   {refused}"), row
            events = server.cli_json("audit", "list")["events"]
            assert {e["action"] for e in events if e["action"].startswith("mesh.instance")} \
                == {"mesh.instance.register"}  # type: ignore[union-attr]

            # Agent A stops: its instance outlives it by the lease, then leaves the catalog.
            agent_a.stop()
            until_seen(snapshots, lambda found: found == [])
        assert services(server) == []
    assert "stopped reporting: its mesh instances leave the catalog (users 10.0.0.1:8443)" \
        in server.log()


def test_an_instance_leaves_the_catalog_as_soon_as_its_registration_ends(
    server: ServerProcess, start_agent: StartAgent, app: socket.socket
) -> None:
    mesh(server, "apply", "-f", "-", stdin=SERVICE)
    agent = start_agent(server, alias=NODE_A, name="a")
    create_entry(server, NODE_A, USERS_ID)
    check = f"127.0.0.1:{app.getsockname()[1]}"
    channel, call = poll(lambda: _registered(agent, check), DEADLINE,
                         "the agent accepting the registration")
    with channel:
        until_health(call, "healthy")
        assert len(services(server)) == 1
        call.cancel()
    poll(lambda: services(server) == [] or None, DEADLINE, "the instance leaving the catalog")
    events = server.cli_json("audit", "list")["events"]
    assert [(e["action"], e["target"]) for e in events[:2]] == [  # type: ignore[index]
        ("mesh.instance.deregister", "users 10.0.0.1:8443"),
        ("mesh.instance.register", "users 10.0.0.1:8443"),
    ]


def _registered(agent: AgentProcess, check: str) -> tuple[grpc.Channel, Any] | None:
    """A Register call whose first update arrived, or None while the agent has no SVID
    for the workload yet."""
    channel, call = register(agent, service="users", spiffe_id=USERS_ID,
                             address="10.0.0.1:8443", check=check)
    try:
        first = next(call)
    except grpc.RpcError:
        channel.close()
        return None
    assert first.health in ("unknown", "healthy")
    return channel, call


def _refused_with_svid(agent: AgentProcess, **request: str) -> tuple[grpc.StatusCode, str] | None:
    code, details = refusal(agent, **request)
    return None if details.startswith("no identity issued") else (code, details)
