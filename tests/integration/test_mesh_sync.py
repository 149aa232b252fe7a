"""The mesh configuration from ``tessera mesh apply`` to the agents, with real processes.

A real server and a real agent started from the CLI; the configuration is applied
with ``tessera mesh apply`` and the agent is watched the way a user would: its
``tessera_agent_mesh_revision`` and ``tessera_agent_mesh_resources`` metrics on
``/metrics``. And what ``tessera mesh`` prints back to the user who applied it (its
``get``, ``delete``, ``explain`` and a refused ``apply``), from the server's own store.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess, tessera
from tests.support.processes import poll
from tests.unit.mesh.documents import MISSION

pytestmark = pytest.mark.integration

StartAgent = Callable[..., AgentProcess]

SERVICE = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users-service}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
"""
LEARN_DEADLINE = 10.0


def mesh(server: ServerProcess, *args: str, stdin: str | None = None, check: bool = True
         ) -> str:
    result = tessera("mesh", *args, "--data-dir", str(server.data_dir), input=stdin,
                     check=check)
    return result.stdout if check else result.stderr


def mesh_run(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``tessera mesh ARGS`` whatever its exit status: status, stdout and stderr."""
    return tessera("mesh", *args, "--data-dir", str(server.data_dir), check=False)


def agent_mesh(agent: AgentProcess) -> tuple[int, int]:
    """(mesh revision, resources) as the agent's /metrics shows them."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name: int(sample.value)
        for family in text_string_to_metric_families(
            httpx.get(agent.health_url + "/metrics", timeout=5).text)
        for sample in family.samples
        if sample.name.startswith("tessera_agent_mesh_")
    }
    return values["tessera_agent_mesh_revision"], values["tessera_agent_mesh_resources"]


def learns(agent: AgentProcess, expected: tuple[int, int]) -> float:
    """Seconds until the agent shows ``expected``; fails after the deadline."""
    began = time.monotonic()
    poll(lambda: agent_mesh(agent) == expected or None, LEARN_DEADLINE,
         f"the agent at mesh revision and resources {expected}")
    return time.monotonic() - began


def test_an_agent_learns_each_apply_and_delete_at_once(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path
) -> None:
    agent = start_agent(server)
    assert agent_mesh(agent) == (0, 0)
    config = tmp_path / "mesh.yaml"
    config.write_text(SERVICE + "---\n" + MISSION)

    assert mesh(server, "apply", "-f", str(config)) == (
        "Service users-service created\n"
        "Gateway microservice-gateway created\n"
        "VirtualService microservice-virtual-service created\n")
    took = [learns(agent, (1, 3))]

    changed = MISSION.replace("/api/v1/users", "/api/v2/users")
    assert mesh(server, "apply", "-f", "-", stdin=changed) == (
        "Gateway microservice-gateway unchanged\n"
        "VirtualService microservice-virtual-service configured\n")
    took.append(learns(agent, (2, 3)))

    assert mesh(server, "delete", "vs", "microservice-virtual-service") == (
        "VirtualService microservice-virtual-service deleted\n")
    took.append(learns(agent, (3, 2)))
    print("the agent learned each change after " + ", ".join(f"{t:.2f}s" for t in took))
    # The long poll wakes on a mesh change: far sooner than the 5 s fallback poll.
    assert max(took) < 2.5, took

    listed = json.loads(mesh(server, "get", "gateway", "--output", "json"))
    assert [(r["name"], r["revision"]) for r in listed["resources"]] == [
        ("microservice-gateway", 1)]


def test_a_refused_apply_reaches_no_agent(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path
) -> None:
    agent = start_agent(server)
    config = tmp_path / "mesh.yaml"
    config.write_text(MISSION)  # no Service users-service

    assert mesh(server, "apply", "-f", str(config), check=False) == (
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service\n"
        "Error: nothing was applied: correct the problem above and apply again\n")
    assert mesh(server, "get", "gateways") == "No Gateways found.\n"
    mesh(server, "apply", "-f", "-", stdin=SERVICE)
    learns(agent, (1, 1))  # the next change is revision 1: the refused one took none


def test_an_agent_started_later_gets_the_whole_configuration(
    server: ServerProcess, start_agent: StartAgent
) -> None:
    mesh(server, "apply", "-f", "-", stdin=SERVICE + "---\n" + MISSION)
    mesh(server, "delete", "virtualservice", "microservice-virtual-service")
    agent = start_agent(server)
    learns(agent, (2, 2))


# -- what tessera mesh prints back --------------------------------------------------------


def test_get_gives_back_the_file_applied_in_its_order_without_its_comments(
    server: ServerProcess, tmp_path: Path
) -> None:
    written = (
        "kind: Service\n"
        "apiVersion: tessera.io/v1alpha1\n"
        "metadata:\n"
        "  name: users-service\n"
        "spec:\n"
        "  ports:\n"
        "  - protocol: HTTP\n"
        "    number: 80\n"
        "    name: http\n"
        "  spiffeIds:\n"
        "  - spiffe://example.org/users\n"
    )
    config = tmp_path / "users.yaml"
    config.write_text("# the users' API\n" + written.replace(
        "  spiffeIds:\n", "  spiffeIds:   # who may register instances\n"))
    mesh(server, "apply", "-f", str(config))
    assert mesh(server, "get", "service", "users-service", "--output", "yaml") == written


def test_a_refused_apply_answers_json_on_stdout(server: ServerProcess, tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(MISSION)  # no Service users-service: the server finds it
    refused = mesh_run(server, "apply", "-f", str(config), "--output", "json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {"applied": False, "dry_run": False, "errors": [
        {"kind": "VirtualService", "name": "microservice-virtual-service",
         "path": "spec.http[0].route[0].destination.host",
         "message": "host users-service names no Service", "source": "", "document": 0}]}
    assert refused.stderr == (
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service\n"
        "Error: nothing was applied: correct the problem above and apply again\n")

    config.write_text("kind: Service\nmetadata: {name: users\n")
    broken = mesh_run(server, "apply", "-f", str(config), "--output", "json")
    assert broken.returncode == 1
    assert json.loads(broken.stdout) == {"applied": False, "dry_run": False, "errors": [
        {"kind": "", "name": "", "path": "", "source": str(config), "document": 0,
         "message": "line 3, column 1: invalid YAML: did not find expected ',' or '}' (while "
                    "parsing a flow mapping)"}]}
    assert broken.stderr.endswith(
        "Error: nothing was applied: correct the problem above and apply again\n")
    assert mesh(server, "get", "gateways") == "No Gateways found.\n"


def test_a_refused_delete_names_each_resource_that_refers_to_it(server: ServerProcess) -> None:
    mesh(server, "apply", "-f", "-", stdin=SERVICE + "---\n" + MISSION)
    refused = mesh_run(server, "delete", "service", "users-service")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        "VirtualService microservice-virtual-service refers to Service users-service in "
        "spec.http[0].route[0].destination.host: change that field or delete VirtualService "
        "microservice-virtual-service first\n"
        "Error: Service users-service was not deleted: the resource above still refers to it\n")
    mesh(server, "delete", "virtualservice", "microservice-virtual-service")
    assert mesh(server, "delete", "service", "users-service") == (
        "Service users-service deleted\n")


READERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users-readers}
spec:
  selector: {matchLabels: {app: users}}
  rules:
  - from: [{source: {principals: [spiffe://example.org/orders]}}]
"""


def test_explain_before_any_instance_says_what_the_labels_decide(server: ServerProcess
                                                                  ) -> None:
    mesh(server, "apply", "-f", "-", stdin=SERVICE + "---\n" + READERS)

    orders = mesh_run(server, "explain", "--from", "spiffe://example.org/orders",
                      "--to", "users-service")
    # Allowed whatever the labels, and not served until an instance registers (exit 1).
    assert (orders.returncode, orders.stderr) == (1, "")
    assert orders.stdout.splitlines()[-2:] == [
        "allowed by users-service whatever labels its sidecars run with  "
        "[Service users-service]",
        "not served: requests get 503: no instance of users-service is registered  "
        "[Service users-service spec.ports[0]]",
    ]

    billing = mesh_run(server, "explain", "--from", "spiffe://example.org/billing",
                       "--to", "users-service")
    assert (billing.returncode, billing.stderr) == (1, "")
    assert billing.stdout.splitlines()[-4:] == [
        "no instance of users-service is registered yet: AuthorizationPolicy users-readers "
        "selects workloads by labels, so whether it applies depends on the labels its "
        "sidecars will run with  [Service users-service]",
        "with app=users: refused by users-service: no ALLOW rule matches "
        "spiffe://example.org/billing, and AuthorizationPolicy users-readers (ALLOW) selects "
        "this workload: refused by default  [AuthorizationPolicy users-readers]",
        "with labels it does not select: allowed by users-service: no ALLOW policy selects "
        "this workload and no DENY rule matches spiffe://example.org/billing  "
        "[default authorization]",
        "undecided: users-service allows it with some of these labels and refuses it with "
        "others; explain again once an instance of users-service is registered  "
        "[Service users-service]",
    ]
