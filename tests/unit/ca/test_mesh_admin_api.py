"""The admin API's mesh configuration endpoints, in process, on the server's real admin app.

Each test has a fresh server (SQLite, in-memory keys) that never listens; requests go
to its admin app through httpx's ASGI transport.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.api.admin import create_admin_app
from ca.config import server_config
from ca.server import Server
from mesh import MAX_INPUT_BYTES
from sdk.clock import ManualClock
from tests.unit.ca.conftest import START
from tests.unit.ca.federation_helpers import call
from tests.unit.mesh.documents import MISSION

USERS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users-service}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
"""
YAML = {"content-type": "application/yaml"}


class Harness:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.store = server.store
        self.woken = 0
        self.app = create_admin_app(
            store=server.store, authorities=server.authorities, issuer=server.issuer,
            clock=server.clock, changed=self.wake, health=server.health,
        )

    def wake(self) -> None:
        self.woken += 1

    def apply(self, text: str | bytes, status: int = 200, **params: Any) -> Any:
        body = text.encode() if isinstance(text, str) else text
        return self.request("POST", "/v1/mesh/apply", status, content=body, headers=YAML,
                            params=params)

    def request(self, method: str, path: str, status: int, **kwargs: Any) -> Any:
        response: Any = call(self.app, method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "bind": "127.0.0.1:0", "key_manager": {"memory": {}}}),
                    clock=ManualClock(START))
    try:
        yield Harness(server)
    finally:
        server.store.close()


def test_the_missions_example_with_its_service_is_applied_and_wakes_the_agents(
    api: Harness,
) -> None:
    answer = api.apply(USERS + "---\n" + MISSION, source="mission.yaml")

    assert answer == {"revision": 1, "dry_run": False, "changes": [
        {"kind": "Service", "name": "users-service", "action": "created"},
        {"kind": "Gateway", "name": "microservice-gateway", "action": "created"},
        {"kind": "VirtualService", "name": "microservice-virtual-service", "action": "created"},
    ]}
    assert api.woken == 1
    event = api.store.list_audit()[0]
    assert (event.actor, event.action, event.target) == ("admin", "mesh.apply", "3 resources")

    again = api.apply(USERS + "---\n" + MISSION)
    assert [c["action"] for c in again["changes"]] == ["unchanged"] * 3
    assert again["revision"] == 1
    assert api.woken == 1  # nothing changed: no agent is woken
    assert len(api.store.list_audit()) == 1


def test_a_dry_run_answers_what_would_change_and_stores_nothing(api: Harness) -> None:
    answer = api.apply(USERS, dry_run="true")

    assert answer == {"revision": 0, "dry_run": True, "changes": [
        {"kind": "Service", "name": "users-service", "action": "created"}]}
    assert api.store.list_mesh_resources() == []
    assert (api.woken, api.store.list_audit()) == (0, [])


def test_every_problem_is_a_field_error_and_nothing_is_stored(api: Harness) -> None:
    bad = USERS + "---\n" + MISSION.replace("exact: /api/v1/users", "regex: '(?=x)'")

    error = api.apply(bad, 400, source="mesh.yaml")["error"]

    assert error["code"] == "invalid_argument"
    assert error["field_errors"] == [
        {"kind": "VirtualService", "name": "microservice-virtual-service",
         "path": "spec.http[0].match[0].uri.regex",
         "message": "must be an RE2 regular expression: invalid perl operator: (?= (RE2 has "
                    "no lookahead)",
         "source": "mesh.yaml", "document": 3},
    ]
    assert error["message"] == (
        "VirtualService microservice-virtual-service: spec.http[0].match[0].uri.regex must be "
        "an RE2 regular expression: invalid perl operator: (?= (RE2 has no lookahead)")
    assert api.store.list_mesh_resources() == []


def test_a_reference_to_nothing_is_refused_with_the_path_of_the_field(api: Harness) -> None:
    error = api.apply(MISSION, 400)["error"]

    assert [(e["kind"], e["path"], e["message"]) for e in error["field_errors"]] == [
        ("VirtualService", "spec.http[0].route[0].destination.host",
         "host users-service names no Service"),
    ]
    assert api.store.mesh_revision() == 0
    assert api.woken == 0


def test_yaml_that_does_not_parse_names_the_line(api: Harness) -> None:
    error = api.apply("kind: [\n", 400, source="broken.yaml")["error"]

    assert error["field_errors"] == [{
        "kind": "", "name": "", "path": "",
        "message": "line 2, column 1: invalid YAML: did not find expected node content "
                   "(while parsing a flow node)",
        "source": "broken.yaml", "document": 0}]


def test_an_empty_body_is_refused(api: Harness) -> None:
    error = api.apply("# nothing here\n", 400, source="empty.yaml")["error"]
    assert error == {"code": "invalid_argument",
                     "message": "empty.yaml holds no resources: nothing to apply"}


def test_the_apply_takes_up_to_4_mib_and_refuses_more_with_413(api: Harness) -> None:
    comment = b"# " + b"x" * 1021 + b"\n"  # 1 KiB a line
    big = comment * (2 * 1024) + USERS.encode()  # 2 MiB: over the admin API's 1 MiB
    assert [c["action"] for c in api.apply(big)["changes"]] == ["created"]

    too_big = b"#" * MAX_INPUT_BYTES + b"\n" + USERS.encode()
    error = api.apply(too_big, 413)["error"]
    assert error == {"code": "too_large",
                     "message": "request body is larger than 4194304 bytes; send less at a time"}
    # Every other endpoint keeps the 1 MiB limit.
    entry = api.request("POST", "/v1/entries", 413, content=b"{" + b" " * (1024 * 1024) + b"}",
                        headers={"content-type": "application/json"})
    assert entry["error"]["code"] == "too_large"


def test_get_lists_by_kind_in_any_case_and_shows_one(api: Harness) -> None:
    api.apply(USERS + "---\n" + MISSION)

    everything = api.request("GET", "/v1/mesh", 200)
    assert everything["revision"] == 1
    assert [(r["kind"], r["name"]) for r in everything["resources"]] == [
        ("Gateway", "microservice-gateway"),
        ("VirtualService", "microservice-virtual-service"),
        ("Service", "users-service"),
    ]
    services = api.request("GET", "/v1/mesh/SERVICE", 200)
    assert services == {"revision": 1, "resources": [{
        "kind": "Service", "name": "users-service", "revision": 1,
        "created_at": int(START.timestamp()), "updated_at": int(START.timestamp()),
        "document": {"apiVersion": "tessera.io/v1alpha1", "kind": "Service",
                     "metadata": {"name": "users-service"},
                     "spec": {"spiffeIds": ["spiffe://example.org/users"],
                              "ports": [{"number": 80, "protocol": "HTTP", "name": "http"}]}},
    }]}
    one = api.request("GET", "/v1/mesh/service/users-service", 200)
    assert one == services["resources"][0]

    missing = api.request("GET", "/v1/mesh/gateway/other", 404)["error"]
    assert missing["message"] == (
        "Gateway other does not exist; 'tessera mesh get gateway' lists the Gateways there are")
    unknown = api.request("GET", "/v1/mesh/pods", 400)["error"]
    assert unknown["message"] == (
        "'pods' is not a mesh kind; use one of gateway, virtualservice, destinationrule, "
        "authorizationpolicy, requestauthentication, service, ratelimit")


def test_delete_is_refused_while_referred_to_then_done(api: Harness) -> None:
    api.apply(USERS + "---\n" + MISSION)
    woken = api.woken

    refused = api.request("DELETE", "/v1/mesh/service/users-service", 400)["error"]
    assert [(e["kind"], e["name"], e["path"]) for e in refused["field_errors"]] == [
        ("VirtualService", "microservice-virtual-service",
         "spec.http[0].route[0].destination.host")]
    assert api.woken == woken

    deleted = api.request("DELETE", "/v1/mesh/virtualservice/microservice-virtual-service", 200)
    assert deleted == {"kind": "VirtualService", "name": "microservice-virtual-service",
                       "revision": 2, "deleted": True}
    assert api.woken == woken + 1
    event = api.store.list_audit()[0]
    assert (event.action, event.target) == ("mesh.delete",
                                            "VirtualService microservice-virtual-service")
    assert api.request("DELETE", "/v1/mesh/service/users-service", 200)["revision"] == 3
    gone = api.request("DELETE", "/v1/mesh/service/users-service", 404)["error"]
    assert gone["message"].startswith("Service users-service does not exist")


def test_the_schema_documents_the_apply_body_and_its_refusals(api: Harness) -> None:
    schema = api.request("GET", "/openapi.json", 200)
    apply = schema["paths"]["/v1/mesh/apply"]["post"]
    assert sorted(apply["requestBody"]["content"]) == ["application/yaml", "text/plain"]
    assert sorted(apply["responses"]) == ["200", "400", "412", "413"]
    detail = schema["components"]["schemas"]["ErrorDetail"]["properties"]
    assert "field_errors" in detail
